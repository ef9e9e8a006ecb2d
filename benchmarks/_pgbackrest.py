"""pgBackRest as the PostgreSQL benchmarks run it: a repository in the lab's SeaweedFS
through the HTTPS front (``_s3count.CountingProxy``), commands as the postgres user.

pgBackRest's S3 driver speaks only HTTPS and the lab's SeaweedFS only plain HTTP, so
every repository here points at the front (``127.0.0.1:<proxy port>``, TLS not
verified: the front's certificate is a throw-away self-signed one), path-style, in the
vault's bucket under a prefix of its own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.lab.seaweed import S3Credentials
from replicators.settings import S3Config


def s3_repo(index: int, proxy_port: int, vault: S3Config, creds: S3Credentials, path: str) -> str:
    """The ``repo<index>-*`` lines of a repository at ``/<path>`` in ``vault``'s bucket,
    reached through the HTTPS front listening on ``proxy_port``."""
    r = f"repo{index}"
    return (
        f"{r}-type=s3\n{r}-s3-endpoint=127.0.0.1\n"
        f"{r}-storage-port={proxy_port}\n{r}-storage-verify-tls=n\n"
        f"{r}-s3-bucket={vault.bucket}\n{r}-s3-region={vault.region_name}\n"
        f"{r}-s3-uri-style=path\n"
        f"{r}-s3-key={creds.access_key_file.read_text().strip()}\n"
        f"{r}-s3-key-secret={creds.secret_key_file.read_text().strip()}\n"
        f"{r}-path=/{path}\n"
    )


def archive_command(conf: Path, stanza: str) -> str:
    """PostgreSQL's ``archive_command`` pushing into the stanza's repositories."""
    return f"pgbackrest --config={conf} --stanza={stanza} archive-push %p"


async def run_pgbackrest(conf: Path, stanza: str, *command: str) -> str:
    """Run one pgBackRest command as the postgres user; its stdout. Exits the benchmark
    (``SystemExit`` naming the command and pgBackRest's error) if it fails."""
    proc = await asyncio.create_subprocess_exec(
        "runuser", "-u", "postgres", "--", "pgbackrest", f"--config={conf}",
        f"--stanza={stanza}", *command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"pgBackRest {' '.join(command)} failed: {err.decode()[-500:]}")
    return out.decode()
