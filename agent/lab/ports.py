"""The lab's TCP ports: one block per slot, a fixed offset per service.

Slot ``n`` owns the ``SLOT_SIZE`` ports from ``BASE_PORT + SLOT_SIZE * n``, all
on 127.0.0.1 and all below the Linux ephemeral range (32768), so outgoing
connections never steal them. A lab in ``netns`` mode uses the same ports on
its members' own addresses (``agent.lab.network``). Inside a block:

====== ================================================================
offset service
====== ================================================================
+0     region a: postgres, agent, s3, s3_grpc, master, master_grpc,
       volume, volume_grpc, filer, filer_grpc, etcd_client, etcd_peer
       (+0 .. +11, in that order)
+20    region b: the same twelve (+20 .. +31)
+40    witness: etcd_client, etcd_peer
+60    shared: dns, prometheus
+62 .. reserved for later services (proxies)
+70    region c (a three-region lab): the same twelve (+70 .. +81)
====== ================================================================

Every port is set explicitly on every server (SeaweedFS would otherwise add
10000 for its gRPC ports and open fixed ones), so two labs on two slots never
collide. A slot is claimed by a file in ``CLAIMS_DIR`` naming the lab's root;
a claim whose lab no longer records that slot in its ``lab.json`` is stale and
is taken over. Claims are made under an ``flock`` so two labs starting at the
same moment get different slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.lab.processes import LabError

BASE_PORT = 20000
SLOT_SIZE = 100
MAX_SLOTS = 100
CLAIMS_DIR = Path(tempfile.gettempdir()) / "dragent-lab-slots"

REGION_SERVICES = (
    "postgres",
    "agent",
    "s3",
    "s3_grpc",
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "etcd_client",
    "etcd_peer",
)
_BLOCKS = {"a": 0, "b": 20, "witness": 40, "shared": 60, "c": 70}
_SERVICES = {
    "a": REGION_SERVICES,
    "b": REGION_SERVICES,
    "c": REGION_SERVICES,
    "witness": ("etcd_client", "etcd_peer"),
    "shared": ("dns", "prometheus"),
}
OFFSETS: dict[str, int] = {
    f"{where}.{service}": _BLOCKS[where] + index
    for where, services in _SERVICES.items()
    for index, service in enumerate(services)
}


def slot_ports(slot: int) -> dict[str, int]:
    """Every named port of ``slot``, keyed ``"<where>.<service>"`` (``"b.s3"``)."""
    if not 0 <= slot < MAX_SLOTS:
        raise LabError(f"lab slot {slot} is out of range 0..{MAX_SLOTS - 1}")
    base = BASE_PORT + SLOT_SIZE * slot
    return {name: base + offset for name, offset in OFFSETS.items()}


def group(ports: dict[str, int], where: str) -> dict[str, int]:
    """The ports of one region (or ``"witness"``, ``"shared"``), keyed by service."""
    prefix = f"{where}."
    return {k.removeprefix(prefix): v for k, v in ports.items() if k.startswith(prefix)}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the system has just given out on ``host`` (free when asked; no claim)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a listener could bind ``host:port`` now (SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def busy_ports(slot: int) -> list[int]:
    """The ports of the whole block of ``slot`` that something already holds."""
    base = BASE_PORT + SLOT_SIZE * slot
    return [p for p in range(base, base + SLOT_SIZE) if not port_is_free(p)]


PROBE_TIMEOUT = 1.0


async def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connection to ``host:port`` is accepted within ``PROBE_TIMEOUT``."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def http_get(port: int, path: str = "/", host: str = "127.0.0.1") -> tuple[int, bytes] | None:
    """One plain HTTP/1.0 GET to ``host:port``: ``(status, body)``, or None if nothing
    answered within ``PROBE_TIMEOUT``."""
    request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                await writer.drain()
                raw = await reader.read(65536)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), body


@contextlib.contextmanager
def _claims_locked() -> Iterator[None]:
    CLAIMS_DIR.mkdir(exist_ok=True)
    with (CLAIMS_DIR / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _claim_file(slot: int) -> Path:
    return CLAIMS_DIR / f"slot-{slot:03d}"


def claim_owner(slot: int) -> Path | None:
    """The root of the lab holding ``slot``, or None if the slot is free or its claim stale."""
    try:
        owner = Path(_claim_file(slot).read_text().strip())
        state = json.loads((owner / "lab.json").read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(state, dict) and state.get("slot") == slot else None


def claim_slot(root: Path, slot: int | None, record: Callable[[int], None]) -> int:
    """Claim ``slot`` (or the first free one) for the lab at ``root``; return it.

    ``record(slot)`` runs while the claim lock is held and must write the lab's
    ``lab.json`` naming the slot: that is what keeps the claim alive. A slot is
    free when no live lab claims it and no port of its block is in use. Raises
    ``LabError`` if the requested slot is taken or busy, or no slot is free.
    """
    with _claims_locked():
        candidates = range(MAX_SLOTS) if slot is None else [slot]
        for candidate in candidates:
            owner = claim_owner(candidate)
            if owner is not None and owner != root:
                if slot is not None:
                    raise LabError(f"lab slot {slot} is taken by the lab at {owner}")
                continue
            busy = busy_ports(candidate)
            if busy:
                if slot is not None:
                    raise LabError(
                        f"lab slot {slot} has ports in use: {busy[:8]}",
                        hint="pick another --slot or leave it out to choose a free one",
                    )
                continue
            _write_claim(candidate, root)
            record(candidate)
            return candidate
    raise LabError(f"no free lab slot among 0..{MAX_SLOTS - 1}", hint="run `dragent lab down`")


def ensure_claim(root: Path, slot: int) -> None:
    """Renew the claim of a lab that already has a slot; raise if another lab took it."""
    with _claims_locked():
        owner = claim_owner(slot)
        if owner is not None and owner != root:
            raise LabError(f"lab slot {slot} of {root} is now claimed by the lab at {owner}")
        _write_claim(slot, root)


def release_slot(root: Path, slot: int) -> None:
    """Drop the claim on ``slot`` if ``root`` holds it."""
    with _claims_locked():
        path = _claim_file(slot)
        with contextlib.suppress(OSError):
            if Path(path.read_text().strip()) == root:
                path.unlink()


def _write_claim(slot: int, root: Path) -> None:
    path = _claim_file(slot)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(f"{root}\n")
    tmp.chmod(0o666)
    tmp.replace(path)
