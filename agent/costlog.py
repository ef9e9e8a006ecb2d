"""The agent's cost log: its cost counters, one JSON line at a time, in ``<data_dir>/cost.jsonl``.

Every ``every`` seconds (five minutes), when it starts and when it stops, the agent
appends one line::

    {"t": <unix>, "boot": "<id of this process>", "region": "a",
     "series": [{"stream": "pg", "destination": "b", "kind": "postgres",
                 "requests": {"PUT": 120, "GET": 0, "HEAD": 0, "LIST": 2, "DELETE": 1},
                 "cross_region_bytes": ..., "stored_bytes": ..., "written_objects": ...,
                 "written_bytes": ..., "raw_bytes": ...}]}

with the values of the counters of ``replicators/store_metrics.py`` (cumulative since
the process started) and the raw record bytes the shippers sealed
(``dragent_segment_bytes_total{kind="raw"}``). ``dragent report cost`` takes the
increase between the samples nearest its ``--from`` and ``--to`` (a new ``boot``
restarts the counters from zero: agent/reports/cost.py). The stored-bytes gauge is
seeded at start from the last line (so it survives a restart; what was put after
that line and before a crash is not counted). The file is appended to, never
rewritten; it grows by about one line per five minutes (a few hundred bytes per
stream and destination).

The status page's figure (``status()``): this month's samples and a live one,
through ``month_estimate`` at the default prices, recomputed at most every 30 s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.reports.cost import CLASSES, PriceError, Prices, month_estimate, parse_prices
from replicators import logs
from replicators.metrics import Metrics
from replicators.store_metrics import StoreMetrics

DEFAULT_PRICES = Path(__file__).parent / "reports" / "prices" / "aws-s3-2026.toml"
EVERY = 300.0
FILE = "cost.jsonl"


def load_prices(path: Path | None = None) -> Prices:
    """A price table from a TOML file (default: the repository's AWS S3 table).
    Raises ``PriceError`` naming the file, the key and what was expected."""
    path = path or DEFAULT_PRICES
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PriceError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"{path}: expected TOML: {exc}") from None
    return parse_prices(data, str(path))


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The samples of a cost log in time order; a torn or foreign line is skipped."""
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if isinstance(sample, dict) and isinstance(sample.get("t"), int | float):
            out.append(sample)
    out.sort(key=lambda s: float(s["t"]))
    return out


def _samples(counter: Any) -> Iterator[tuple[dict[str, str], float]]:
    for family in counter.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                yield s.labels, s.value


def month_start(now: float) -> float:
    d = dt.datetime.fromtimestamp(now, dt.UTC)
    return d.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


class CostLog:
    def __init__(
        self,
        path: Path,
        store_metrics: StoreMetrics,
        metrics: Metrics | None,
        region: str,
        kinds: Callable[[], dict[str, str]],
        every: float = EVERY,
    ) -> None:
        self.path = path
        self._sm = store_metrics
        self._metrics = metrics
        self._region = region
        self._kinds = kinds
        self.every = every
        self.boot = secrets.token_hex(6)
        self.log = logs.get("costlog")
        self._month: list[dict[str, Any]] = []
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._prices: Prices | str | None = None

    def seed(self, now: float | None = None) -> None:
        """Read the log: the stored-bytes gauges from its last line, this month's samples."""
        now = time.time() if now is None else now
        samples = read_samples(self.path)
        if samples:
            for s in samples[-1].get("series", []):
                stored = float(s.get("stored_bytes", 0.0))
                if stored:
                    self._sm.stored.labels(s["stream"], s["destination"]).set(stored)
        start = month_start(now)
        self._month = [s for s in samples if float(s["t"]) >= start]

    def sample(self, now: float | None = None) -> dict[str, Any]:
        """The counters now, as one line of the log."""
        now = time.time() if now is None else now
        kinds = self._kinds()
        series: dict[tuple[str, str], dict[str, Any]] = {}

        def row(labels: dict[str, str], dest_label: str = "destination") -> dict[str, Any]:
            key = (labels["stream"], labels[dest_label])
            if key not in series:
                series[key] = {
                    "stream": key[0],
                    "destination": key[1],
                    "kind": kinds.get(key[0], ""),
                    "requests": dict.fromkeys(CLASSES, 0.0),
                    "cross_region_bytes": 0.0,
                    "stored_bytes": 0.0,
                    "written_objects": 0.0,
                    "written_bytes": 0.0,
                    "raw_bytes": 0.0,
                }
            return series[key]

        for labels, value in _samples(self._sm.billed):
            row(labels)["requests"][labels["class"]] = value
        for name, counter in (
            ("cross_region_bytes", self._sm.cross_region),
            ("stored_bytes", self._sm.stored),
            ("written_objects", self._sm.written_objects),
            ("written_bytes", self._sm.written_bytes),
        ):
            for labels, value in _samples(counter):
                row(labels)[name] = value
        if self._metrics is not None:
            for labels, value in _samples(self._metrics.bytes):
                if labels.get("kind") == "raw" and labels.get("peer") != "vault":
                    row(labels, "peer")["raw_bytes"] = value
        return {
            "t": round(now, 3),
            "boot": self.boot,
            "region": self._region,
            "series": [series[k] for k in sorted(series)],
        }

    def write(self, now: float | None = None) -> dict[str, Any]:
        line = self.sample(now)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError as exc:
            self.log.warning("cost sample not written", path=str(self.path), error=str(exc))
        if self._month and month_start(line["t"]) != month_start(float(self._month[-1]["t"])):
            self._month = []
        self._month.append(line)
        self._cached = None
        return line

    async def run(self) -> None:
        """Sample now, every ``every`` seconds, and once more when cancelled."""
        self.seed()
        try:
            while True:
                self.write()
                await asyncio.sleep(self.every)
        finally:
            self.write()

    def status(self, now: float | None = None) -> dict[str, Any]:
        """This month's estimate for the status page (``{"error": ...}`` if no prices)."""
        now = time.time() if now is None else now
        if self._cached is not None and now - self._cached[0] < 30:
            return self._cached[1]
        if self._prices is None:
            try:
                self._prices = load_prices()
            except PriceError as exc:
                self._prices = str(exc)
        if isinstance(self._prices, str):
            out: dict[str, Any] = {"error": self._prices}
        else:
            start = month_start(now)
            samples = [s for s in self._month if float(s["t"]) >= start]
            out = month_estimate([*samples, self.sample(now)], self._prices)
            out |= {
                "month": dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m"),
                "prices": f"{self._prices.region}, read {self._prices.read}",
            }
        self._cached = (now, out)
        return out
