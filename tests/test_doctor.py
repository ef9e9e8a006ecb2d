"""``dragent config check --online``: every endpoint reached, every failure named."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from agent.config import SyntheticOptions, load_config
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper
from replicators.keys import build_key_provider, generate_key_file
from replicators.s3 import S3Store
from replicators.synthetic import SyntheticSource
from replicators.vault import Vault

pytestmark = pytest.mark.lab


def check_online(path: Path) -> tuple[int, list[dict[str, object]], str]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(path), "--online", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    body = out.stdout.split("\n", 1)[1]  # after the offline "ok" line
    return out.returncode, json.loads(body)["checks"], out.stdout + out.stderr


async def one_segment(lab: Lab, stream: str, tmp_path: Path) -> None:
    """A segment of ``stream`` in region b's vault, sealed by a for b's key."""
    peer = load_config(lab.config_path("a")).peers[0]
    store = await S3Store.open(peer.vault)
    keys = build_key_provider(peer.keys)
    try:
        source = SyntheticSource(SyntheticOptions(rate=500))
        shipper = lab_shipper(stream, "synthetic", source, Vault(store), keys, tmp_path / "s.json")
        await shipper.recover()
        assert await shipper.sync_once(asyncio.Event())
    finally:
        await keys.aclose()
        await store.aclose()


def b_config(lab: Lab, stream: str) -> dict[str, object]:
    data = tomllib.loads(lab.config_path("b").read_text())
    data["streams"] = [{"name": stream, "kind": "synthetic", "synthetic": {"rate": 10}}]
    return data


async def test_a_good_configuration_reaches_everything(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    await one_segment(lab, unique, tmp_path)
    data = b_config(lab, unique)
    data["etcd"] = {"endpoints": lab.etcd_endpoints, "prefix": "/dragent-doctor"}
    path = tmp_path / "b.toml"
    path.write_text(tomli_w.dumps(data))
    code, checks, text = await asyncio.to_thread(check_online, path)
    assert code == 0, text
    names = [str(c["check"]) for c in checks]
    assert any(n.startswith("vault b ") for n in names)
    assert any(n.startswith("vault a ") for n in names)
    assert "key b" in names and "key for a" in names
    key = next(c for c in checks if c["check"] == "key b")
    assert str(key["detail"]).endswith("opens the oldest segment of 1 of 1 streams")
    assert sum(n.startswith("etcd ") for n in names) == 3


async def test_a_wrong_secret_a_wrong_key_and_a_dead_etcd_are_all_named(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    await one_segment(lab, unique, tmp_path)
    data = b_config(lab, unique)
    wrong_key = tmp_path / "other.key"
    generate_key_file(wrong_key)  # not the key b's vault segments were sealed for
    data["keys"]["key_file"] = str(wrong_key)
    secret = tmp_path / "wrong-secret"
    secret.write_text("not-the-secret\n")
    secret.chmod(0o600)
    data["peers"][0]["vault"]["secret_key"] = f"file:{secret}"
    data["etcd"] = {"endpoints": ["http://127.0.0.1:9"], "prefix": "/dragent-doctor"}
    path = tmp_path / "b.toml"
    path.write_text(tomli_w.dumps(data))
    code, checks, text = await asyncio.to_thread(check_online, path)
    assert code == 1, text
    failed = {str(c["check"]): str(c["detail"]) for c in checks if not c["ok"]}
    assert set(failed) == {
        next(n for n in failed if n.startswith("vault a ")),
        "key b",
        "etcd http://127.0.0.1:9",
    }, failed
    assert "AccessDenied" in failed[next(n for n in failed if n.startswith("vault a "))]
    assert failed["key b"].startswith(("KeyAccessError", "IntegrityError")), failed["key b"]
    assert "not-the-secret" not in text
