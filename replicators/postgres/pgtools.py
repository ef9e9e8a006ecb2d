"""Running PostgreSQL's own programs, as the cluster's OS user when the agent is root."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from pathlib import Path

import psycopg2.extensions

from replicators.errors import SourceError
from replicators.postgres.options import PostgresOptions


def installed_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin, else wherever ``pg_ctl`` is on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def bin_dir(options: PostgresOptions) -> Path:
    """The configured program directory, else ``installed_bin_dir()``."""
    if found := options.bin_dir or installed_bin_dir():
        return found
    raise SourceError("PostgreSQL programs not found: set [streams.postgres] bin_dir")


def owner_command(options: PostgresOptions, *argv: str) -> list[str]:
    """``argv`` run as ``options.os_user`` (through runuser when we are root)."""
    prefix = ["runuser", "-u", options.os_user, "--"] if os.geteuid() == 0 else []
    return [*prefix, *argv]


def command(options: PostgresOptions, program: str, *args: str) -> list[str]:
    """argv running PostgreSQL's ``program`` as ``options.os_user``."""
    return owner_command(options, str(bin_dir(options) / program), *args)


def give_to_owner(options: PostgresOptions, path: Path, mode: int = 0o700) -> None:
    """Create ``path`` if needed and hand it to the PostgreSQL OS user (when root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam(options.os_user)
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)


def share_with_database(options: PostgresOptions, path: Path) -> None:
    """Make ``path`` (a WAL spool) shared by this process and the database's OS user only:
    group of that user, mode 2770 (set-group-id: files made in it take the group), the
    files already there group-readable and no more. WAL is the database's data: never
    world-readable. The group is set when root or a member of it; otherwise it is left,
    and the database's user must reach the spool some other way."""
    path.mkdir(parents=True, exist_ok=True)
    gid = pwd.getpwnam(options.os_user).pw_gid
    if os.geteuid() == 0 or gid in os.getgroups():
        os.chown(path, -1, gid)
        for entry in path.iterdir():
            if entry.is_file():
                os.chown(entry, -1, gid)
                entry.chmod(0o640)
    path.chmod(0o2770)


async def run(options: PostgresOptions, program: str, *args: str, cwd: Path | None = None) -> str:
    """Run a PostgreSQL program to completion; return its output, raise ``SourceError``
    with the output's tail on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        *command(options, program, *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd or "/",
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode:
        tail = "\n".join("    " + s for s in text.splitlines()[-15:])
        raise SourceError(f"{program} failed (exit {proc.returncode}):\n{tail}")
    return text


def conninfo_and_env(dsn: str) -> tuple[str, dict[str, str]]:
    """A connection string without its password, and the environment carrying it
    (``PGPASSWORD``): a password never shows on a command line."""
    params = psycopg2.extensions.parse_dsn(dsn)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    return psycopg2.extensions.make_dsn(**params), env
