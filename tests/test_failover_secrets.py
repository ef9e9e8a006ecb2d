"""No password leaks from a failover: logs, errors, records, status, evidence.

Both regions' database DSNs carry a password (region a's in the URL's user
part, region b's as a ``password=`` query parameter; the lab's PostgreSQL
trusts local connections, so any password is accepted). The DSNs are secret
references (``file:``), as a configuration must give them. Region a is killed
whole while a client writes, b takes over; then everything the failover
produced is searched for either password: the output of every logger (at the
file-descriptor level), each failover record on disk, b's ``/status`` dict,
and b's evidence log, whose entries can never be deleted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.evidence.log import EvidenceLog
from agent.lab import Lab
from agent.lab.failover_drill import Drill, kill_trial

pytestmark = pytest.mark.lab

PASSWORDS = ("Pw-in-url-7f3a", "Pw-in-query-91c2")


class SecretDrill(Drill):
    """A drill whose coordinators reach their databases with password-bearing DSNs."""

    @property
    def a_dsn(self) -> str:
        return super().a_dsn.replace("://dragent@", f"://dragent:{PASSWORDS[0]}@")

    @property
    def b_dsn(self) -> str:
        return super().b_dsn + f"?password={PASSWORDS[1]}"

    def options(self, region: str) -> dict[str, Any]:
        out = super().options(region)
        # probes carry no password (it belongs in a passfile): the configuration refuses one
        out["probes"] = {k: [dsn.split("?")[0].replace(f":{PASSWORDS[0]}@", "@") for dsn in v]
                         for k, v in out["probes"].items()}  # fmt: skip
        return out


@pytest_asyncio.fixture(loop_scope="session")
async def drill(lab: Lab, unique: str, tmp_path: Path) -> AsyncIterator[SecretDrill]:
    async with SecretDrill(lab, unique, tmp_path) as d:
        await d.ready(30)
        yield d


async def test_a_failover_with_password_dsns_leaks_no_password(
    drill: SecretDrill, capfd: pytest.CaptureFixture[str]
) -> None:
    assert PASSWORDS[0] in drill.a_dsn and PASSWORDS[1] in drill.b_dsn
    trial = await kill_trial(drill)
    record = trial["record"]
    assert record["epoch"] == 2 and not record["errors"], record
    seen: dict[str, str] = {}
    out, err = capfd.readouterr()
    seen["logs"] = out + err
    assert "taking over" in seen["logs"]  # the loggers were captured
    for path in sorted(drill.workdir.glob("*/failovers/*.json")):
        seen[str(path)] = path.read_text()
    assert any("failovers" in name for name in seen), sorted(seen)
    seen["status"] = json.dumps(drill.coordinators["b"].status(), default=str)
    seen["record"] = json.dumps(record, default=str)
    log = await EvidenceLog.open(drill.config("b"))
    try:
        entries = await log.entries()
    finally:
        await log.aclose()
    assert any(e["type"] == "failover.failover" for e in entries)
    seen["evidence"] = json.dumps(entries)
    for where, text in seen.items():
        for password in PASSWORDS:
            assert password not in text, f"{where} shows a password"
