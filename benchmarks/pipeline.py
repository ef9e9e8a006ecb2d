"""Seal/open throughput of replicators.segment against the bare-library limit.

Usage: ``python benchmarks/pipeline.py [--json] [--mib N] [--stream-mib M]``

On one core (the process pins itself to one CPU), for two kinds of data cut
into 8 MiB segments:

- ``wal``: PostgreSQL-WAL-like 8 KiB pages (page headers, record headers with
  LSNs, xids and CRCs, heap tuples with small varying fields), which zstd
  shrinks about 3-6x;
- ``weights``: model-weight-like 1 MiB records of random bytes, which zstd
  cannot shrink.

Each case is timed for ``seal`` and ``open_segment`` and, in the same run on
the same bytes, for the *limit*: the same per-frame work with the bare
libraries and nothing else. Seal: per 1 MiB frame the writer's decision
(a frame whose samples zstd cannot shrink by 1/8 is stored raw, untried; a
frame zstd does not shrink by 1/8 is stored raw) then one zstd compress where
it is kept and one AES-256-GCM encrypt, the frames joined into one object,
plus one xxh3-128 over the payload (already contiguous: the limit is not
charged for cutting records into frames).
Open: per frame one AES-256-GCM decrypt and one zstd decompress for the
compressed frames, plus one xxh3-128. Since ``seal`` and ``open_segment`` do
all of that and more (header, key derivation, record framing, Merkle tree), a
ratio above 1 would be noise, not a win. Throughput is MB/s
(10^6 bytes) of record payload; the ratio ours/limit is the figure of merit
(target >= 0.7). Timings are the best of several rounds.

Then ``--stream-mib`` MiB (default 256) are streamed through seal + open one
segment at a time, alternating the two kinds, while tracemalloc records the
peak of Python-level allocations: it should stay within a few segments.

``--json`` prints the figures as JSON on stdout and the table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicators.segment import DataKey, open_segment, seal

MIB = 1 << 20
SEGMENT_BYTES = 8 * MIB
FRAME_SIZE = MIB  # seal's default frame size
# seal's writer policy (replicators/segment.py): keep zstd's output only if it is <= 7/8
KEEP_NUM, KEEP_DEN = 7, 8
SAMPLE_SLICES, SAMPLE_SLICE, SAMPLE_OVER = 4, 8 << 10, 64 << 10
PAGE = 8192

_PAGE_HEADER = struct.Struct("<HHIQI4x")  # magic, info, timeline, pageaddr, rem_len
_RECORD_HEADER = struct.Struct("<IIQBB2xI")  # tot_len, xid, prev, info, rmid, crc
_BLOCK_REF = struct.Struct("<BBHIIII")  # id, fork_flags, data_len, spc, db, rel, blkno
_TUPLE = struct.Struct("<IIIHHHB3xqiqi16s")  # xmin, xmax, cid, ctid, mask, mask2, hoff,
# then id, user_id, created_at (µs), amount (cents), request uuid
_STATUSES = (b"pending", b"completed", b"failed", b"refunded", b"authorized")
_NOTES = (
    b"checkout web",
    b"checkout mobile",
    b"subscription renewal",
    b"refund requested by support",
    b"batch import 2024-q3",
)


class WalLike:
    """Deterministic PostgreSQL-WAL-like pages: mostly structure, some entropy."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.lsn = 0x16B3748
        self.xid = 7421
        self.row = 1_000_000
        self.clock = 1_732_780_800_000_000
        self.block = 100

    def _record(self) -> bytes:
        r = self.rng
        self.row += 1
        self.clock += r.randrange(50, 5000)
        self.xid += r.random() < 0.3
        self.block += r.random() < 0.02
        status, note = r.choice(_STATUSES), r.choice(_NOTES)
        tup = _TUPLE.pack(
            self.xid,
            0,
            0,
            self.block & 0xFFFF,
            r.randrange(1, 60),
            0x0802,
            0x0007,
            self.row,
            r.randrange(1, 500),
            self.clock,
            r.randrange(100, 99_999),
            r.randbytes(16) if r.random() < 0.25 else bytes(16),
        )
        data = tup + bytes([len(status) * 2 + 1]) + status + bytes([len(note) * 2 + 1]) + note
        block = _BLOCK_REF.pack(0, 0x20, len(data), 1663, 16384, 24576 + self.row % 3, self.block)
        head = _RECORD_HEADER.pack(
            24 + len(block) + len(data), self.xid, self.lsn, 0x00, 10, r.getrandbits(32)
        )
        out = head + block + data
        self.lsn += (len(out) + 7) & ~7
        return out + bytes(-len(out) % 8)

    def page(self) -> bytes:
        """One 8 KiB page: a page header, then records until the page is full."""
        parts = [_PAGE_HEADER.pack(0xD110, 0x0005, 1, self.lsn & ~(PAGE - 1), 0)]
        size = _PAGE_HEADER.size
        while size < PAGE:
            rec = self._record()
            parts.append(rec)
            size += len(rec)
        return b"".join(parts)[:PAGE]


def wal_segment(gen: WalLike) -> list[bytes]:
    return [gen.page() for _ in range(SEGMENT_BYTES // PAGE)]


def weights_segment() -> list[bytes]:
    return [os.urandom(MIB) for _ in range(SEGMENT_BYTES // MIB)]


def best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class Case:
    name: str
    record_size: int
    payload_mb: float
    stored_ratio: float
    seal_mbps: float
    seal_limit_mbps: float
    open_mbps: float
    open_limit_mbps: float

    @property
    def seal_ratio(self) -> float:
        return self.seal_mbps / self.seal_limit_mbps

    @property
    def open_ratio(self) -> float:
        return self.open_mbps / self.open_limit_mbps


def _worth_it(packed: int, raw: int) -> bool:
    return packed * KEEP_DEN <= raw * KEEP_NUM


def _policy(frame: bytes, cctx: zstandard.ZstdCompressor) -> tuple[bytes, bool]:
    """The segment writer's policy for one frame, with the bare library: a frame over
    64 KiB whose four 8 KiB samples zstd does not shrink by 1/8 is kept raw, untried;
    otherwise it is compressed, and kept compressed only if that shrank it by 1/8."""
    if len(frame) > SAMPLE_OVER:
        view, step = memoryview(frame), len(frame) // SAMPLE_SLICES
        sample = b"".join(view[i * step : i * step + SAMPLE_SLICE] for i in range(SAMPLE_SLICES))
        if not _worth_it(len(cctx.compress(sample)), len(sample)):
            return frame, False
    packed = cctx.compress(frame)
    return (packed, True) if _worth_it(len(packed), len(frame)) else (frame, False)


def _limit_fns(payload: bytes) -> tuple[Callable[[], object], Callable[[], object]]:
    """The least work a segment can cost, with the bare libraries on the same bytes: per
    1 MiB frame of the payload (already contiguous) the same compress-or-keep-raw
    decision as ``seal`` (so a frame ``seal`` stores raw is not compressed here either)
    and one AES-256-GCM call, the frames joined into one object; one xxh3-128 over the
    whole payload. Open: per frame one AES-256-GCM call and, for the frames
    kept compressed, one zstd decompress; one xxh3-128. No header, key derivation,
    record framing or Merkle tree: ``seal``/``open_segment`` do strictly more."""
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=False)
    dctx = zstandard.ZstdDecompressor()
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    frames = [payload[i : i + FRAME_SIZE] for i in range(0, len(payload), FRAME_SIZE)]
    sealed = []
    for frame in frames:
        body, packed = _policy(frame, cctx)
        sealed.append((aead.encrypt(nonce, body, b""), packed))

    def seal_limit() -> None:
        b"".join([aead.encrypt(nonce, _policy(frame, cctx)[0], b"") for frame in frames])
        xxhash.xxh3_128_digest(payload)

    def open_limit() -> None:
        for blob, packed in sealed:
            body = aead.decrypt(nonce, blob, b"")
            if packed:
                dctx.decompress(body)
        xxhash.xxh3_128_digest(payload)

    return seal_limit, open_limit


def sealer(records: list[bytes], key: DataKey, stream: str, seq: int) -> Callable[[], bytes]:
    """``seal`` of one benchmark segment, ready to call."""
    return partial(
        seal, records, stream=stream, epoch=1, seq=seq, start="0", end=str(len(records)),
        first_source_time=0.0, last_source_time=1.0, data_key=key, created_at=0.0,
    )  # fmt: skip


def _measure(name: str, segments: list[list[bytes]], key: DataKey, rounds: int) -> Case:
    """Time ours and the limit on each segment, interleaved, so drift hits both alike."""
    totals = dict.fromkeys(("seal", "open", "seal_limit", "open_limit"), 0.0)
    payload_bytes = stored = 0
    for seq, records in enumerate(segments):
        seal_ours = sealer(records, key, name, seq)
        blob = seal_ours()
        seal_limit, open_limit = _limit_fns(b"".join(records))
        totals["seal"] += best(seal_ours, rounds)
        totals["seal_limit"] += best(seal_limit, rounds)
        totals["open"] += best(partial(open_segment, blob, key.plaintext), rounds)
        totals["open_limit"] += best(open_limit, rounds)
        payload_bytes += sum(map(len, records))
        stored += len(blob)
    mb = payload_bytes / 1e6
    return Case(
        name,
        len(segments[0][0]),
        round(mb, 1),
        round(stored / payload_bytes, 3),
        *(round(mb / totals[k], 1) for k in ("seal", "seal_limit", "open", "open_limit")),
    )


def stream_memory(total_mib: int, key: DataKey) -> dict[str, float]:
    """Seal + open ``total_mib`` MiB one segment at a time; report the allocation peak."""
    templates = {"wal": wal_segment(WalLike(11)), "weights": weights_segment()}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    count = max(1, total_mib * MIB // SEGMENT_BYTES)
    for seq, kind in zip(range(count), _alternate(), strict=False):
        blob = sealer(templates[kind], key, kind, seq)()
        opened = open_segment(blob, key.plaintext, expect_seq=seq)
        del blob, opened
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "streamed_mib": count * SEGMENT_BYTES / MIB,
        "segments": count,
        "segment_mib": SEGMENT_BYTES / MIB,
        "peak_traced_mib": round(peak / MIB, 1),
        "peak_in_segments": round(peak / SEGMENT_BYTES, 2),
        "ru_maxrss_delta_mib": round((rss1 - rss0) / 1024, 1),
        "seconds": round(elapsed, 2),
    }


def _alternate() -> Iterator[str]:
    while True:
        yield "wal"
        yield "weights"


def _pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"cpu {cpu}"
    return "not pinned"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(mib: int, stream_mib: int, rounds: int) -> dict[str, Any]:
    pinned = _pin_one_core()
    key = DataKey("bench", os.urandom(32), b"wrapped")
    memory = stream_memory(stream_mib, key)  # first, so earlier data does not mask the peak
    count = max(1, mib * MIB // SEGMENT_BYTES)
    wal = WalLike()
    cases = [
        _measure("wal", [wal_segment(wal) for _ in range(count)], key, rounds),
        _measure("weights", [weights_segment() for _ in range(count)], key, rounds),
    ]
    return {
        "machine": {
            "python": platform.python_version(),
            "cpu": _cpu_model(),
            "pinned": pinned,
            "zstd_level": 3,
            "frame_size": FRAME_SIZE,
            "segment_bytes": SEGMENT_BYTES,
        },
        "cases": [
            asdict(c) | {"seal_ratio": round(c.seal_ratio, 2), "open_ratio": round(c.open_ratio, 2)}
            for c in cases
        ],
        "memory": memory,
        "target_ratio": 0.7,
    }


def table(res: dict[str, Any]) -> str:
    head = f"{'case':<8} {'record':>7} {'MB':>6} {'stored':>7} {'op':<5}"
    head += f" {'ours MB/s':>10} {'limit MB/s':>11} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for c in res["cases"]:
        rec = f"{c['record_size'] // 1024} KiB"
        for op in ("seal", "open"):
            lines.append(
                f"{c['name']:<8} {rec:>7} {c['payload_mb']:>6} {c['stored_ratio']:>7} {op:<5}"
                f" {c[op + '_mbps']:>10} {c[op + '_limit_mbps']:>11} {c[op + '_ratio']:>6}"
            )
    m, info = res["memory"], res["machine"]
    lines += [
        "",
        f"streamed {m['streamed_mib']:.0f} MiB ({m['segments']} segments of"
        f" {m['segment_mib']:.0f} MiB) through seal+open in {m['seconds']} s:"
        f" peak traced {m['peak_traced_mib']} MiB = {m['peak_in_segments']} segments;"
        f" ru_maxrss grew {m['ru_maxrss_delta_mib']} MiB",
        "stored = stored bytes / payload bytes; MB = 10^6 bytes of record payload;"
        " ratio = ours / limit (target >= 0.7)",
        f"one core ({info['pinned']}, {info['cpu']}), Python {info['python']},"
        f" zstd level {info['zstd_level']}, frames of {info['frame_size'] >> 10} KiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--mib", type=int, default=64, help="MiB per case for throughput")
    parser.add_argument("--stream-mib", type=int, default=256, help="MiB for the memory run")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    args = parser.parse_args(argv)
    res = run(args.mib, args.stream_mib, args.rounds)
    if args.json:
        print(table(res), file=sys.stderr)
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
