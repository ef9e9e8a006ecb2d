"""What it costs to run: the cost report's arithmetic, pure (no file, no clock, no network).

Input: samples of the agent's cost counters (``agent/costlog.py`` appends one to
``<data_dir>/cost.jsonl`` every few minutes and when it stops) and a price table
(``agent/reports/prices/aws-s3-2026.toml`` by default). Output: per stream and
destination, what was used over the range and what it costs per month, beside what
S3 Cross-Region Replication and pgBackRest would cost for the same data.

Definitions (every figure of the report follows from these):

- GB = 2^30 bytes (as AWS bills storage); a month = 730 hours (AWS's convention for
  monthly estimates); ``D`` = seconds between the first and last sample used;
  ``scale = 730 × 3600 / D``.
- Range: the sample nearest ``--from`` to the sample nearest ``--to``, and every sample
  between them. A counter's increase is the sum, over consecutive samples, of
  ``b − a``; when the process changed between them (another ``boot``) or the value
  fell (a reset), the later value ``b`` alone (the counter restarted at zero).
- ``n_c``: billed requests of class ``c`` (PUT, GET, HEAD, LIST, DELETE) over the
  range; ``X``: bytes across regions (every PUT into and GET from a peer's vault);
  ``W``, ``O``: bytes and objects written into the vault; ``R``: raw record bytes
  sealed (for a PostgreSQL stream, WAL bytes); ``S̄``: the time-weighted (trapezoid)
  average of the stored-bytes gauge over the range.
- dragent, per month:
  ``requests = scale × Σ_c n_c × p_c / 1000`` (``p_PUT = p_LIST`` = the PUT/COPY/POST/LIST
  price, ``p_GET = p_HEAD`` = the GET-and-other price, ``p_DELETE`` = the DELETE price);
  ``transfer = scale × X / GB × t`` (``t``: inter-region transfer per GB);
  ``storage = S̄ / GB × s`` (``s``: storage per GB-month; already a monthly rate, not
  scaled); ``monthly = requests + transfer + storage``.
- S3 Cross-Region Replication of the same objects (one replication request, billed as
  a PUT, per object written; the same bytes across regions; the same bytes stored at
  the destination):
  ``crr = scale × (O × p_PUT / 1000 + W / GB × t) + storage``;
  with Replication Time Control ``crr_rtc = crr + scale × W / GB × r`` (``r``: RTC per
  GB). It leaves out the source bucket the objects would first be written to, and
  dragent's GETs (a replica is not read back across regions).
- pgBackRest, for a PostgreSQL stream, with the same retention (so the same WAL and
  base backups kept: ``storage`` as dragent's) and the same compressed bytes sent
  (``W``): WAL archived as 16 MiB files, one PUT each, at least one file per
  ``archive_timeout`` (a forced WAL switch still archives a whole file):
  ``files = max(R / 16 MiB, D / archive_timeout)``;
  ``pgbackrest = scale × (files × p_PUT / 1000 + W / GB × t) + storage``.
  Base backups are the same in both and are not counted apart.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

GB = float(1 << 30)
MONTH_SECONDS = 730 * 3600.0
WAL_FILE = 16 << 20
CLASSES = ("PUT", "GET", "HEAD", "LIST", "DELETE")
COUNTERS = ("cross_region_bytes", "written_objects", "written_bytes", "raw_bytes")

FORMULAS = (
    "GB = 2^30 bytes; month = 730 h; D = seconds between the first and last sample used; "
    "scale = 730 h / D",
    "dragent requests = scale × Σ n_class × price_class / 1000 "
    "(PUT and LIST at the PUT/COPY/POST/LIST price; GET and HEAD at the GET-and-other "
    "price; DELETE at the DELETE price)",
    "dragent transfer = scale × bytes across regions / GB × inter-region price",
    "storage = time-weighted average of stored bytes / GB × price per GB-month",
    "dragent monthly = requests + transfer + storage",
    "S3 CRR = scale × (objects written × PUT price / 1000 + bytes written / GB × "
    "inter-region price) + storage; with RTC + scale × bytes written / GB × RTC price",
    "pgBackRest (PostgreSQL streams) = scale × (WAL files × PUT price / 1000 + bytes "
    "written / GB × inter-region price) + storage, WAL files = max(raw WAL bytes / 16 MiB, "
    "D / archive_timeout); same retention, so the same storage",
    "stored bytes: a running sum of bytes put minus bytes deleted (a delete of unknown "
    "size is not counted); requests: as the agent sent them (botocore retries not seen)",
)


class PriceError(ValueError):
    """A price table that cannot be used; the message names the file, the key and what
    was expected."""


@dataclass(frozen=True)
class Prices:
    put_per_1000: float
    get_per_1000: float
    delete_per_1000: float
    storage_gb_month: float
    transfer_gb: float
    rtc_gb: float
    region: str
    read: str
    currency: str = "USD"
    source: str = ""
    """The file the table was read from."""
    url: str = ""
    """Where its figures were read (``[meta] source``)."""

    def per_request(self, cls: str) -> float:
        """Dollars per request of a billing class."""
        per_1000 = {
            "PUT": self.put_per_1000,
            "LIST": self.put_per_1000,
            "GET": self.get_per_1000,
            "HEAD": self.get_per_1000,
            "DELETE": self.delete_per_1000,
        }.get(cls, self.get_per_1000)  # any other request is billed as GET-and-other
        return per_1000 / 1000.0


_PRICE_KEYS = {
    "put_per_1000": ("requests", "put_copy_post_list"),
    "get_per_1000": ("requests", "get_and_other"),
    "delete_per_1000": ("requests", "delete"),
    "storage_gb_month": ("storage", "gb_month"),
    "transfer_gb": ("transfer", "inter_region_gb"),
    "rtc_gb": ("replication", "rtc_gb"),
}


def parse_prices(data: Mapping[str, Any], source: str) -> Prices:
    """A price table from parsed TOML (the schema of ``prices/aws-s3-2026.toml``)."""

    def table(name: str) -> Mapping[str, Any]:
        value = data.get(name)
        if not isinstance(value, Mapping):
            raise PriceError(f"{source}: [{name}]: expected a table, found {value!r}")
        return value

    values: dict[str, float] = {}
    for attr, (tbl, key) in _PRICE_KEYS.items():
        value = table(tbl).get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PriceError(
                f"{source}: [{tbl}] {key}: expected a number of dollars ≥ 0, found {value!r}"
            )
        values[attr] = float(value)
    meta = table("meta")
    text: dict[str, str] = {}
    for key in ("region", "read"):
        value = meta.get(key)
        if not isinstance(value, str) or not value:
            raise PriceError(
                f"{source}: [meta] {key}: expected a non-empty string, found {value!r}"
            )
        text[key] = value
    currency = meta.get("currency", "USD")
    if not isinstance(currency, str):
        raise PriceError(f"{source}: [meta] currency: expected a string, found {currency!r}")
    url = str(meta.get("source", ""))
    return Prices(**values, **text, currency=currency, source=source, url=url)


# -- usage over a range ------------------------------------------------------------------


@dataclass
class Usage:
    """What one stream used at one destination over a range of samples."""

    stream: str
    destination: str
    kind: str = ""
    seconds: float = 0.0
    requests: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))
    cross_region_bytes: float = 0.0
    written_objects: float = 0.0
    written_bytes: float = 0.0
    raw_bytes: float = 0.0
    stored_bytes: float = 0.0
    """At the last sample."""
    stored_bytes_avg: float = 0.0
    """Time-weighted over the range."""


def _series(sample: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(s["stream"], s["destination"]): s for s in sample.get("series", [])}


def _value(series: Mapping[str, Any] | None, name: str) -> float:
    if series is None:
        return 0.0
    if name in CLASSES:
        return float(series.get("requests", {}).get(name, 0.0))
    return float(series.get(name, 0.0))


def increase(points: Sequence[tuple[str, float]]) -> float:
    """A counter's increase over ``(boot, value)`` points in time order: the sum of the
    rises; after a restart (another boot) or a fall, the new value alone."""
    total = 0.0
    for (boot_a, a), (boot_b, b) in itertools.pairwise(points):
        total += b if boot_b != boot_a or b < a else b - a
    return total


def time_average(points: Sequence[tuple[float, float]]) -> float:
    """The trapezoid average of ``(time, value)`` points; the value itself for one point."""
    if not points:
        return 0.0
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return points[-1][1]
    area = sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(points))
    return area / span


def select(samples: Sequence[Mapping[str, Any]], start: float, end: float) -> list[Any]:
    """The samples from the one nearest ``start`` to the one nearest ``end`` (samples in
    time order)."""
    if not samples:
        return []
    times = [float(s["t"]) for s in samples]
    first = min(range(len(times)), key=lambda i: (abs(times[i] - start), i))
    last = min(range(len(times)), key=lambda i: (abs(times[i] - end), -i))
    return list(samples[first : last + 1]) if last >= first else []


def usage(samples: Sequence[Mapping[str, Any]]) -> list[Usage]:
    """Per stream and destination, what the samples (time order) say was used."""
    if not samples:
        return []
    keys: dict[tuple[str, str], str] = {}
    for sample in samples:
        for key, s in _series(sample).items():
            keys[key] = s.get("kind") or keys.get(key, "")
    seconds = float(samples[-1]["t"]) - float(samples[0]["t"])
    parsed = [(str(s.get("boot", "")), float(s["t"]), _series(s)) for s in samples]
    out = []
    for key, kind in sorted(keys.items()):
        u = Usage(stream=key[0], destination=key[1], kind=kind, seconds=seconds)
        for name in (*CLASSES, *COUNTERS):
            points = [(boot, _value(series.get(key), name)) for boot, _, series in parsed]
            if name in CLASSES:
                u.requests[name] = increase(points)
            else:
                setattr(u, name, increase(points))
        stored = [(t, _value(series.get(key), "stored_bytes")) for _, t, series in parsed]
        u.stored_bytes = stored[-1][1]
        u.stored_bytes_avg = time_average(stored)
        out.append(u)
    return out


# -- prices applied ----------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Monthly dollars, by what they pay for."""

    requests: float
    transfer: float
    storage: float
    rtc: float = 0.0

    @property
    def monthly(self) -> float:
        return self.requests + self.transfer + self.storage + self.rtc


def scale_of(seconds: float) -> float:
    """From the range to a month: 730 h / D (0 for an empty range: nothing to scale)."""
    return MONTH_SECONDS / seconds if seconds > 0 else 0.0


def storage_month(u: Usage, p: Prices) -> float:
    return u.stored_bytes_avg / GB * p.storage_gb_month


def dragent_cost(u: Usage, p: Prices) -> Estimate:
    k = scale_of(u.seconds)
    requests = sum(n * p.per_request(c) for c, n in u.requests.items())
    return Estimate(
        requests=k * requests,
        transfer=k * u.cross_region_bytes / GB * p.transfer_gb,
        storage=storage_month(u, p),
    )


def crr_cost(u: Usage, p: Prices, *, rtc: bool) -> Estimate:
    k = scale_of(u.seconds)
    return Estimate(
        requests=k * u.written_objects * p.per_request("PUT"),
        transfer=k * u.written_bytes / GB * p.transfer_gb,
        storage=storage_month(u, p),
        rtc=k * u.written_bytes / GB * p.rtc_gb if rtc else 0.0,
    )


def wal_files(u: Usage, archive_timeout: float) -> float:
    by_volume = u.raw_bytes / WAL_FILE
    by_time = u.seconds / archive_timeout if archive_timeout > 0 else 0.0
    return max(by_volume, by_time)


def pgbackrest_cost(u: Usage, p: Prices, *, archive_timeout: float) -> Estimate:
    k = scale_of(u.seconds)
    return Estimate(
        requests=k * wal_files(u, archive_timeout) * p.per_request("PUT"),
        transfer=k * u.written_bytes / GB * p.transfer_gb,
        storage=storage_month(u, p),
    )


def _money(e: Estimate) -> dict[str, float]:
    return {
        "requests": round(e.requests, 6),
        "transfer": round(e.transfer, 6),
        "storage": round(e.storage, 6),
        "rtc": round(e.rtc, 6),
        "monthly": round(e.monthly, 6),
    }


def cost_report(
    samples: Sequence[Mapping[str, Any]],
    prices: Prices,
    start: float,
    end: float,
    *,
    archive_timeout: float = 60.0,
) -> dict[str, Any]:
    """The report over ``[start, end]`` (unix seconds), as ``--json`` prints it."""
    chosen = select(samples, start, end)
    rows = []
    totals = dict.fromkeys(("dragent", "crr", "crr_rtc", "pgbackrest"), 0.0)
    for u in usage(chosen):
        mine, crr = dragent_cost(u, prices), crr_cost(u, prices, rtc=False)
        crr_rtc = crr_cost(u, prices, rtc=True)
        pg = (
            pgbackrest_cost(u, prices, archive_timeout=archive_timeout)
            if u.kind == "postgres"
            else None
        )
        hours = u.seconds / 3600 if u.seconds > 0 else math.nan
        row = asdict(u) | {
            "requests_per_hour": {
                c: (round(n / hours, 3) if u.seconds > 0 else None) for c, n in u.requests.items()
            },
            "cost": _money(mine),
            "crr": _money(crr),
            "crr_rtc": _money(crr_rtc),
            "pgbackrest": _money(pg) if pg is not None else None,
        }
        if pg is not None:
            row["pgbackrest"]["wal_files"] = round(wal_files(u, archive_timeout), 3)
            totals["pgbackrest"] += pg.monthly
        totals["dragent"] += mine.monthly
        totals["crr"] += crr.monthly
        totals["crr_rtc"] += crr_rtc.monthly
        rows.append(row)
    first = float(chosen[0]["t"]) if chosen else None
    last = float(chosen[-1]["t"]) if chosen else None
    return {
        "requested": {"from": start, "to": end},
        "from": first,
        "to": last,
        "seconds": (last - first) if chosen else 0.0,
        "samples": len(chosen),
        "archive_timeout": archive_timeout,
        "prices": asdict(prices),
        "streams": rows,
        "total_monthly": {k: round(v, 6) for k, v in totals.items()},
        "formulas": list(FORMULAS),
    }


def month_estimate(samples: Iterable[Mapping[str, Any]], prices: Prices) -> dict[str, Any]:
    """The status page's figure: this month's samples (and a live one last) scaled to a
    month, in total and per stream."""
    rows = usage(list(samples))
    per = {}
    total = 0.0
    for u in rows:
        m = dragent_cost(u, prices).monthly
        per[f"{u.stream}->{u.destination}"] = round(m, 4)
        total += m
    seconds = rows[0].seconds if rows else 0.0
    return {
        "monthly": round(total, 4),
        "currency": prices.currency,
        "seconds": seconds,
        "streams": per,
    }


# -- text ----------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def to_text(report: Mapping[str, Any]) -> str:
    """The report for a terminal, its formulas in the footer."""
    p = report["prices"]
    lines = [
        f"dragent cost, {report['samples']} samples over {report['seconds']:.0f} s "
        f"(from {report['from']} to {report['to']}); prices: {p['region']}, read {p['read']} "
        f"({p['url'] or p['source']}), {p['currency']}",
        "",
    ]
    head = (
        f"{'stream -> destination':<32} {'PUT':>8} {'GET':>8} {'HEAD':>6} {'LIST':>7} "
        f"{'DEL':>6} {'across regions':>15} {'stored':>12} {'$/month':>10} {'CRR':>10} "
        f"{'CRR+RTC':>10} {'pgBackRest':>10}"
    )
    lines.append(head)
    for r in report["streams"]:
        q = r["requests"]
        pg = f"{r['pgbackrest']['monthly']:.4f}" if r["pgbackrest"] else "–"
        lines.append(
            f"{r['stream'] + ' -> ' + r['destination']:<32} {q['PUT']:>8.0f} {q['GET']:>8.0f} "
            f"{q['HEAD']:>6.0f} {q['LIST']:>7.0f} {q['DELETE']:>6.0f} "
            f"{_bytes(r['cross_region_bytes']):>15} {_bytes(r['stored_bytes']):>12} "
            f"{r['cost']['monthly']:>10.4f} {r['crr']['monthly']:>10.4f} "
            f"{r['crr_rtc']['monthly']:>10.4f} "
            f"{pg:>10}"
        )
    t = report["total_monthly"]
    lines += [
        "",
        f"total per month: dragent {t['dragent']:.4f}, S3 CRR {t['crr']:.4f}, "
        f"S3 CRR with RTC {t['crr_rtc']:.4f}, pgBackRest (PostgreSQL streams) "
        f"{t['pgbackrest']:.4f} {p['currency']}",
        "",
        "How the figures are made:",
        *(f"  - {f}" for f in report["formulas"]),
        f"  - pgBackRest archive_timeout assumed: {report['archive_timeout']:g} s",
    ]
    return "\n".join(lines) + "\n"
