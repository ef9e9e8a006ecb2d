"""Artifacts benchmark: dragent against restic on two versions of a checkpoint.

Usage: ``python benchmarks/artifacts.py [--size-mib 1024] [--changed 0.10] [--json]``

Writes a synthetic checkpoint laid out like a safetensors file (v1), then a
second version with ``--changed`` of its tensors rewritten (v2). In one run,
on the same files (both read from the page cache):

- dragent: the artifacts source ships v1 then v2 to region b's vault in a lab
  (real SeaweedFS S3 over HTTP): chunking, SHA-256, packing, zstd where it
  pays, AES-256-GCM, PUTs, then each manifest through a sealed segment;
- restic (Debian ``restic``): ``restic backup`` of v1 then v2 into a local
  repository with its defaults (content-defined chunking, zstd "auto",
  AES-256-CTR + Poly1305).

Both are timed the same way, two ways. Cold (the headline): each a whole
command from a fresh process; for dragent, one Python process per version
that imports, reads the configuration, opens the vault and the keys, recovers
the stream's state and ships the version (the agent itself is a daemon, so
this charges it start-up costs it pays once), against ``restic backup``.
Warm: start-up left out; for dragent, the shipper already running in this
process; for restic, which has no daemon, the backup's time less its start-up
measured right after it on the same repository (``restic cat config``:
process start, repository open, key derivation).

All run ``--rounds`` times, alternating, on one lab; medians are reported
(the machine may be shared with other work: the load average is printed).
Reported per version: seconds, throughput (MB/s, 10^6 bytes of checkpoint
per second), bytes stored (the vault's packs and segments for dragent, the
repository directory for restic) and CPU seconds (dragent's process and,
separately, region b's SeaweedFS that receives the packs; restic's process),
plus the bytes dragent shipped for v2 as a share of v2's size. Targets:
throughput at least restic's, bytes stored at most 1.1x restic's, shipped for
v2 at most 20 %.

An extra row, ``dragent>disk``, runs the same source with its vault on local
disk (``benchmarks/dirstore.py``, fsynced like restic's local backend): a
benchmark-only store, shown beside the real figures, never instead of them
(``--no-disk`` leaves it out).

The module also provides the checkpoint generator the tests use.

Synthetic model checkpoints laid out like safetensors files:

``write_checkpoint(path, size, seed)`` writes one file: an 8-byte
little-endian header length, a JSON header naming every tensor (dtype, shape,
byte range) and the tensors' bytes, as a transformer's layers would hold them
(attention projections, MLP matrices, norms). Tensor bytes are a keystream
(AES-CTR keyed by the tensor's name and seed), so they are reproducible,
incompressible like trained fp16 weights nearly are, and cheap to make.
``changed(...)`` picks the tensors a "fine-tune" rewrites.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._proccpu import pid_file_cpu


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 2  # float16
        for d in self.shape:
            n *= d
        return n


def tensors(size: int, hidden: int = 1024) -> list[Tensor]:
    """Tensors of a decoder stack of about ``size`` bytes (fp16)."""
    out = [Tensor("embed.weight", (8192, hidden))]
    layer = 0
    while sum(t.nbytes for t in out) < size:
        p = f"layers.{layer}"
        out += [
            Tensor(f"{p}.norm1.weight", (hidden,)),
            Tensor(f"{p}.attn.q.weight", (hidden, hidden)),
            Tensor(f"{p}.attn.k.weight", (hidden, hidden)),
            Tensor(f"{p}.attn.v.weight", (hidden, hidden)),
            Tensor(f"{p}.attn.o.weight", (hidden, hidden)),
            Tensor(f"{p}.norm2.weight", (hidden,)),
            Tensor(f"{p}.mlp.up.weight", (4 * hidden, hidden)),
            Tensor(f"{p}.mlp.down.weight", (hidden, 4 * hidden)),
        ]
        layer += 1
    return out


def changed(ts: list[Tensor], fraction: float, seed: int) -> set[str]:
    """``fraction`` of the tensors (by count), chosen at random with ``seed``."""
    k = max(1, round(len(ts) * fraction))
    return {t.name for t in random.Random(seed).sample(ts, k)}


def _bytes(name: str, seed: int, n: int) -> bytes:
    key = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(n))


def write_checkpoint(
    path: Path, size: int, seed: int = 1, rewrite: set[str] | None = None, new_seed: int = 2
) -> list[Tensor]:
    """Write a checkpoint of about ``size`` bytes; tensors in ``rewrite`` get ``new_seed``."""
    ts = tensors(size)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ts:
        header[t.name] = {
            "dtype": "F16",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in ts:
            f.write(_bytes(t.name, new_seed if rewrite and t.name in rewrite else seed, t.nbytes))
    return ts


def write_version(directory: Path, size: int, rewrite: set[str] | None = None) -> None:
    """A registry version directory: the weights, a config and a marker-free layout."""
    write_checkpoint(directory / "model.safetensors", size, rewrite=rewrite)
    (directory / "config.json").write_text(json.dumps({"hidden_size": 1024, "dtype": "float16"}))


# -- the benchmark ------------------------------------------------------------------------------

MIB = 1 << 20


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _restic(repo: str, source: Path, env: dict[str, str]) -> tuple[float, float]:
    """Back ``source`` up; return (seconds, CPU seconds of restic)."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        ["restic", "--repo", repo, "backup", "--quiet", str(source)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, cpu


def run_restic(work: Path, versions: list[Path]) -> list[dict[str, float]]:
    """restic into a local repository directory: the issue's baseline."""
    import shutil

    repo = work / "restic-repo"
    shutil.rmtree(repo, ignore_errors=True)
    return _restic_runs(str(repo), versions, work, {}, lambda: _dir_size(repo))


async def run_restic_s3(
    lab: Any, work: Path, versions: list[Path], name: str
) -> list[dict[str, float]]:
    """restic into region b's SeaweedFS, the store dragent's vault is on (the extra row):
    the same tool against the same store, so the store's share of the time shows."""
    import asyncio

    from agent.config import load_config
    from replicators.s3 import S3Store

    vault = load_config(lab.config_path("a")).peers[0].vault
    creds = lab.s3_credentials
    env = {
        "AWS_ACCESS_KEY_ID": creds.access_key_file.read_text().strip(),
        "AWS_SECRET_ACCESS_KEY": creds.secret_key_file.read_text().strip(),
    }
    repo = f"s3:{vault.endpoint}/{vault.bucket}/restic/{name}"
    store = await S3Store.open(vault.model_copy(update={"prefix": f"restic/{name}/"}))
    loop = asyncio.get_running_loop()

    def stored() -> int:
        async def size() -> int:
            return sum([i.size async for i in store.list("")])

        return asyncio.run_coroutine_threadsafe(size(), loop).result()

    server = lab.region_dir("b") / "s3" / "weed.pid"
    try:
        return await asyncio.to_thread(_restic_runs, repo, versions, work, env, stored, server)
    finally:
        await store.aclose()


def _restic_runs(
    repo: str,
    versions: list[Path],
    work: Path,
    extra_env: dict[str, str],
    stored: Any,
    server: Path | None = None,
) -> list[dict[str, float]]:
    import os
    import subprocess

    from benchmarks._baseline import require

    require("restic")
    env = {
        **os.environ,
        **extra_env,
        "RESTIC_PASSWORD": "benchmark",
        "RESTIC_CACHE_DIR": str(work / "rc"),
    }
    subprocess.run(
        ["restic", "--repo", repo, "init"], check=True, env=env, stdout=subprocess.DEVNULL
    )
    out = []
    for v in versions:
        server_before = pid_file_cpu(server) if server else None
        seconds, cpu = _restic(repo, v, env)
        row = {"seconds": seconds, "stored": stored(), "cpu": cpu}
        server_after = pid_file_cpu(server) if server else None
        started = time.perf_counter()
        subprocess.run(
            ["restic", "--repo", repo, "cat", "config"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        row["startup_seconds"] = time.perf_counter() - started
        if server_before is not None and server_after is not None:
            row["server_cpu"] = server_after - server_before
        out.append(row)
    return out


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux ``clear_refs``); return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return 0
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def run_dragent(
    lab: Any,
    work: Path,
    versions: list[Path],
    uploads: int,
    stream: str,
    disk: Path | None = None,
    already: list[Path] | None = None,
) -> list[dict[str, float]]:
    """Ship ``versions`` in order to region b's vault as a fresh stream; time each. With
    ``disk``, the vault is that local directory instead (the extra row). ``already``:
    versions this stream shipped in an earlier process (their markers stay in place)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from agent.config import load_config
    from benchmarks.dirstore import DirStore
    from replicators.artifacts.options import ArtifactsOptions
    from replicators.artifacts.packs import open_pack_store
    from replicators.artifacts.source import ArtifactsSource
    from replicators.keys import build_key_provider
    from replicators.metrics import Metrics
    from replicators.progress import StreamProgress
    from replicators.shipper import Shipper, ShipperSettings
    from replicators.store import ObjectStore
    from replicators.vault import Vault

    out = []
    peer = load_config(lab.config_path("a")).peers[0]
    store: ObjectStore = (
        DirStore(disk) if disk else await open_pack_store(peer.vault)  # as the agent opens it
    )
    server = lab.region_dir("b") / "s3" / "weed.pid"
    keys = build_key_provider(peer.keys)
    options = ArtifactsOptions(root=work / "src", marker="_COMPLETE", watch=False, uploads=uploads)
    source = ArtifactsSource(stream, options, store, keys, work / f"state-{stream}")
    shipper = Shipper(
        ShipperSettings(stream, "b", 1, 8 * MIB, 0.2),
        source,
        Vault(store),
        keys,
        work / f"state-{stream}" / "shipped.json",
        StreamProgress(stream, "artifacts", "source", "b"),
        Metrics(CollectorRegistry()).stream(stream, "b"),
    )
    for v in already or []:
        (v / "_COMPLETE").write_bytes(b"")
    try:
        await shipper.recover()
        for v in versions:
            (v / "_COMPLETE").write_bytes(b"")
            sent_before = source.bytes_sent
            server_before, cpu_before = pid_file_cpu(server), time.process_time()
            rss_before = _reset_peak_rss()
            started = time.perf_counter()
            assert await shipper.sync_once(asyncio.Event())
            seconds = time.perf_counter() - started
            rss_growth = max(0, _peak_rss() - rss_before)
            cpu, server_after = time.process_time() - cpu_before, pid_file_cpu(server)
            stored = 0
            for prefix in (f"artifacts/{stream}/", f"streams/{stream}/"):
                stored += sum([i.size async for i in store.list(prefix)])
            row = {"seconds": seconds, "stored": stored, "shipped": source.bytes_sent - sent_before}
            row["cpu"] = cpu
            row["rss_growth"] = rss_growth
            if not disk and server_before is not None and server_after is not None:
                row["server_cpu"] = server_after - server_before
            out.append(row)
    finally:
        for v in [*(already or []), *versions]:
            (v / "_COMPLETE").unlink(missing_ok=True)
        await source.aclose()
        await keys.aclose()
        await store.aclose()
    return out


def run_dragent_cold(
    lab: Any, work: Path, versions: list[Path], uploads: int, stream: str
) -> list[dict[str, float]]:
    """dragent as a whole command from a cold process, as restic runs: one fresh Python
    process per version (imports, configuration, opening the vault and the keys,
    recovering the stream's state, shipping the version, exiting), timed from the
    parent like ``restic backup``; the stream's state carries over between the two."""
    import resource
    import subprocess

    server = lab.region_dir("b") / "s3" / "weed.pid"
    out = []
    for i in range(len(versions)):
        argv = [sys.executable, __file__, "--dir", str(work), "--uploads", str(uploads)]
        argv += ["--child-ship", f"{stream}:{i}"]
        server_before = pid_file_cpu(server)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_after = pid_file_cpu(server)
        inner = json.loads(done.stdout.strip().splitlines()[-1])  # after any log lines
        row = {
            "seconds": seconds,
            "stored": inner["stored"],
            "shipped": inner["shipped"],
            "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
            "in_process_seconds": inner["seconds"],
        }
        if server_before is not None and server_after is not None:
            row["server_cpu"] = server_after - server_before
        out.append(row)
    return out


def _child_ship(work: Path, uploads: int, spec: str) -> int:
    """The cold process of ``run_dragent_cold``: ship version ``i`` of the stream."""
    import asyncio

    from agent.lab import Lab

    stream, _, index = spec.rpartition(":")
    i = int(index)
    versions = [work / "src" / "llama" / "v1", work / "src" / "llama" / "v2"]
    lab = Lab(work / "lab")  # the running lab's state file: same slot, ports, credentials
    rows = asyncio.run(run_dragent(lab, work, [versions[i]], uploads, stream, already=versions[:i]))
    print(json.dumps(rows[0]))
    return 0


async def run_rounds(
    work: Path, versions: list[Path], uploads: int, rounds: int, disk: bool = True
) -> dict[str, Any]:
    """Alternate dragent and restic (and dragent to local disk) ``rounds`` times on one lab
    (the machine may be shared: medians are reported)."""
    import asyncio
    import shutil

    from agent.lab import Lab

    lab = Lab(work / "lab")
    await lab.up()
    runs: dict[str, list[list[dict[str, float]]]] = {
        "dragent": [],
        "restic": [],
        "dragent_warm": [],
    }
    if disk:
        runs["dragent_disk"] = []
        runs["restic_s3"] = []
    try:
        for r in range(rounds):
            stream = f"bench-{int(time.time())}-{r}"
            runs["dragent"].append(
                await asyncio.to_thread(
                    run_dragent_cold, lab, work, versions, uploads, stream + "-cold"
                )
            )
            runs["restic"].append(run_restic(work, versions))
            runs["dragent_warm"].append(await run_dragent(lab, work, versions, uploads, stream))
            if disk:
                vault = work / "disk-vault"
                shutil.rmtree(vault, ignore_errors=True)
                runs["dragent_disk"].append(
                    await run_dragent(lab, work, versions, uploads, stream + "-disk", vault)
                )
                runs["restic_s3"].append(await run_restic_s3(lab, work, versions, stream))
    finally:
        await lab.down(purge=True)
    return runs


def _median(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    import statistics

    return [
        {k: statistics.median(run[i][k] for run in runs) for k in runs[0][i]}
        for i in range(len(runs[0]))
    ]


def _warm_restic(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """restic's backup time less its start-up (a ``restic cat config`` on the same
    repository: process start, repository open, key derivation): the warm estimate."""
    return [
        {"seconds": max(r["seconds"] - r["startup_seconds"], 1e-3), "stored": r["stored"]}
        for r in rows
    ]


LABELS = {
    "dragent": "dragent",
    "restic": "restic",
    "restic_s3": "restic>s3*",
    "dragent_warm": "dragent",
    "restic_warm": "restic",
    "restic_s3_warm": "restic>s3*",
    "dragent_disk": "dragent>disk*",
}


def table(res: dict[str, Any]) -> str:
    lines = [
        f"checkpoint {res['size'] / 1e6:.0f} MB, {res['changed']:.0%} of tensors changed in v2, "
        f"medians of {res['rounds']} alternating rounds, load average "
        f"{res['load'][0]:.2f} before / {res['load'][1]:.2f} after",
    ]
    head = (
        f"{'':4}{'tool':14}{'seconds':>9}{'MB/s':>9}{'stored MB':>11}{'cpu s':>8}"
        f"{'server cpu s':>14}"
    )
    modes = {
        "cold: each a whole command from a fresh process (dragent: one Python process per "
        "version, imports and vault opening included; restic backup)": (
            "dragent",
            "restic",
            "restic_s3",
        ),
        "warm: start-up left out (dragent: the shipper already running in-process; restic: "
        "backup less its start-up, a `restic cat config` on the same repository)": (
            "dragent_warm",
            "restic_warm",
            "restic_s3_warm",
            "dragent_disk",
        ),
    }
    for title, names in modes.items():
        lines += ["", title, head]
        tools = [t for t in names if t in res]
        for i, name in enumerate(("v1", "v2")):
            for tool in tools:
                r = res[tool][i]
                mbs = res["size"] / r["seconds"] / 1e6
                cpu = f"{r['cpu']:8.2f}" if "cpu" in r else f"{'-':>8}"
                server = f"{r['server_cpu']:14.2f}" if "server_cpu" in r else f"{'-':>14}"
                lines.append(
                    f"{name:4}{LABELS[tool]:14}{r['seconds']:9.2f}{mbs:9.1f}"
                    f"{r['stored'] / 1e6:11.1f}{cpu}{server}"
                )
    d, r = res["dragent"], res["restic"]
    dw, rw = res["dragent_warm"], res["restic_warm"]
    lines += [
        "",
        f"throughput dragent/restic, cold: v1 {r[0]['seconds'] / d[0]['seconds']:.2f}x, "
        f"v2 {r[1]['seconds'] / d[1]['seconds']:.2f}x; warm: v1 "
        f"{rw[0]['seconds'] / dw[0]['seconds']:.2f}x, v2 {rw[1]['seconds'] / dw[1]['seconds']:.2f}x"
        " (target >= 1)",
        f"bytes stored dragent/restic after v2: {d[1]['stored'] / r[1]['stored']:.3f} "
        "(target <= 1.1)",
        f"shipped for v2: {d[1]['shipped'] / 1e6:.1f} MB = {d[1]['shipped'] / res['size']:.1%} "
        "of its size (target <= 20%)",
    ]
    if "dragent_disk" in res:
        k = res["dragent_disk"]
        lines += [
            "* extra row, not the S3 figure: dragent (warm) with its vault on local disk "
            f"(benchmarks/dirstore.py, fsynced), v1 {rw[0]['seconds'] / k[0]['seconds']:.2f}x, "
            f"v2 {rw[1]['seconds'] / k[1]['seconds']:.2f}x restic's warm throughput"
        ]
    if "restic_s3" in res:
        k, kw = res["restic_s3"], res["restic_s3_warm"]
        lines += [
            "* extra row: restic backing up to the same SeaweedFS as dragent's vault; "
            f"dragent/restic-to-S3 throughput, cold: v1 {k[0]['seconds'] / d[0]['seconds']:.2f}x,"
            f" v2 {k[1]['seconds'] / d[1]['seconds']:.2f}x; warm: v1 "
            f"{kw[0]['seconds'] / dw[0]['seconds']:.2f}x, "
            f"v2 {kw[1]['seconds'] / dw[1]['seconds']:.2f}x"
        ]
    growth = max(run[i]["rss_growth"] for run in res["runs"]["dragent_warm"] for i in range(2))
    lines.append(
        f"memory: RSS grew by at most {growth / 2**20:.0f} MiB while dragent (warm) shipped a "
        f"version (peak RSS of the whole benchmark process {res['peak_rss'] / 2**20:.0f} MiB)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import asyncio
    import os
    import resource
    import shutil

    parser = argparse.ArgumentParser(description="artifacts: dragent against restic")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--changed", type=float, default=0.10)
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--dir", default="/tmp/dragent-bench-artifacts")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--no-disk", action="store_true", help="leave out the local-disk row")
    parser.add_argument("--child-ship", help=argparse.SUPPRESS)  # STREAM:INDEX, a cold process
    args = parser.parse_args(argv)
    if args.child_ship:
        return _child_ship(Path(args.dir).resolve(), args.uploads, args.child_ship)
    from benchmarks._baseline import require

    require("restic")
    work = Path(args.dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    size = args.size_mib * MIB
    v1, v2 = work / "src" / "llama" / "v1", work / "src" / "llama" / "v2"
    write_version(v1, size)
    write_version(v2, size, changed(tensors(size), args.changed, seed=3))
    size = _dir_size(v1)
    res: dict[str, Any] = {"size": size, "changed": args.changed, "rounds": args.rounds}
    load = os.getloadavg()[0]
    runs = asyncio.run(run_rounds(work, [v1, v2], args.uploads, args.rounds, not args.no_disk))
    res["load"] = [load, os.getloadavg()[0]]
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for tool, tool_runs in runs.items():
        res[tool] = _median(tool_runs)
    for tool in ("restic", "restic_s3"):
        if tool in res:
            res[f"{tool}_warm"] = _warm_restic(res[tool])
    res["runs"] = runs
    if args.json:
        print(table(res), file=sys.stderr)
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(table(res))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
