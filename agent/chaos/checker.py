"""The chaos checker: a verdict from a whole history (docs/chaos.md, "The verdict").

Pure: `check` takes the parsed events (`history.read_history`) and returns the
verdict dict; nothing here reads a clock or a file. Every rule below is one
small function so each can be read against the contract on its own.

Safety argument, in short: a write the client saw acknowledged must survive
unless it was lost across a failover, within the RPO target, in async mode;
two regions must never both acknowledge writes at the same time; the gauges
must never claim a smaller RPO than the loss a failover actually caused.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations, pairwise
from typing import Any

Event = dict[str, Any]
Interval = tuple[str, int, float, float]  # region, epoch, first ack t, last ack t

RPO_WINDOW = 10.0  # seconds before a (region, epoch)'s last ack whose RPO samples count


def of_type(events: list[Event], kind: str) -> list[Event]:
    """The events of ``kind``, in history order."""
    return [e for e in events if e["type"] == kind]


def start_of(events: list[Event]) -> Event:
    """The run's `start` event; ValueError if the history has none."""
    starts = of_type(events, "start")
    if not starts:
        raise ValueError("history has no start line")
    return starts[0]


def acknowledged(events: list[Event]) -> list[Event]:
    """Acknowledged writes (``ok`` true), ordered by ack time."""
    return sorted((e for e in of_type(events, "write") if e.get("ok")), key=lambda e: e["t"])


def write_counts(events: list[Event]) -> dict[str, int]:
    """How many writes were acknowledged and how many failed."""
    writes = of_type(events, "write")
    ok = sum(1 for w in writes if w.get("ok"))
    return {"acknowledged": ok, "failed": len(writes) - ok}


def last_acks(acks: list[Event]) -> dict[tuple[str, int], float]:
    """The ack time of the last write each (region, epoch) acknowledged."""
    last: dict[tuple[str, int], float] = {}
    for w in acks:
        if key := ack_key(w):
            last[key] = max(last.get(key, w["t"]), w["t"])
    return last


def final_of(events: list[Event]) -> Event | None:
    """The last `final` event, or None when the run never collected one."""
    finals = of_type(events, "final")
    return finals[-1] if finals else None


def ack_key(write: Event) -> tuple[str, int] | None:
    """The (region, epoch) that acknowledged ``write``, or None when it was not recorded."""
    if write.get("region") is None or write.get("epoch") is None:
        return None
    return (write["region"], write["epoch"])


def lost_writes(acks: list[Event], final: Event | None) -> list[Event]:
    """Acknowledged writes absent from the final primary, each with its age.

    Without a `final` line nothing was found present, so every acknowledged
    write is lost. A write with no (region, epoch) has age 0.0.
    """
    present = set(final["present"]) if final else set()
    last = last_acks(acks)
    lost = []
    for w in (w for w in acks if w["id"] not in present):
        key = ack_key(w)
        age = last[key] - w["t"] if key else 0.0
        region, epoch = w.get("region"), w.get("epoch")
        lost.append(
            {"id": w["id"], "client": w["client"], "region": region, "epoch": epoch, "age": age}
        )
    return lost


def superseded(loss: Event, final: Event | None) -> bool:
    """Whether a lost write's epoch is older than the final epoch (lost across a failover)."""
    final_epoch = final.get("epoch") if final else None
    return loss["epoch"] is not None and final_epoch is not None and loss["epoch"] < final_epoch


def lost_ok(lost: list[Event], final: Event | None, start: Event) -> bool:
    """Sync: no loss at all. Async: every loss superseded and no older than rpo_target."""
    if start.get("sync"):
        return not lost
    target = float(start.get("rpo_target", 0.0))
    return all(superseded(loss, final) and loss["age"] <= target for loss in lost)


def intervals(acks: list[Event]) -> list[Interval]:
    """Per (region, epoch): first and last ack time, ordered by first ack."""
    first: dict[tuple[str, int], float] = {}
    last = last_acks(acks)
    for w in acks:
        if key := ack_key(w):
            first[key] = min(first.get(key, w["t"]), w["t"])
    spans = [(r, e, first[(r, e)], last[(r, e)]) for r, e in last]
    return sorted(spans, key=lambda s: (s[2], s[0], s[1]))


def overlap(x: Interval, y: Interval) -> bool:
    """Closed intervals of different regions sharing at least one instant."""
    return x[0] != y[0] and max(x[2], y[2]) <= min(x[3], y[3])


def split_brains(acks: list[Event]) -> list[dict[str, list[Any]]]:
    """Every overlapping pair of different regions' intervals; "a" began first."""
    spans = intervals(acks)
    return [{"a": list(x), "b": list(y)} for x, y in combinations(spans, 2) if overlap(x, y)]


def mirror_ok(events: list[Event]) -> bool:
    """True when every `mirror` line says equal (or there is none)."""
    return all(m.get("equal") for m in of_type(events, "mirror"))


def vault_ok(events: list[Event]) -> bool:
    """True when every `vault` line verifies, or names as damaged only segments the nemesis
    corrupted, and no corrupted segment was applied (or there is no `vault` line)."""
    return all(_vault_line_ok(v) for v in of_type(events, "vault"))


def _vault_line_ok(v: Event) -> bool:
    if v.get("applied_corrupted"):
        return False
    damaged = set(v.get("damaged") or [])
    return bool(v.get("ok")) or (bool(damaged) and damaged <= set(v.get("corrupted") or []))


def reported_rpo(events: list[Event], since: float, until: float) -> float | None:
    """The largest RPO any agent reported (any stream) in [since, until]; None if no sample.

    Every region counts: the old active's source-side RPO and its peer's replay
    lag measure the same gap, and the run records the lag under the peer's name.
    """
    values = [
        float(e["rpo"])
        for e in of_type(events, "rpo")
        if since <= e["t"] <= until and e.get("rpo") is not None
    ]
    return max(values) if values else None


def failover_losses(lost: list[Event], final: Event | None) -> dict[tuple[str, int], float]:
    """Per superseded (region, epoch) with lost writes: the largest age among them."""
    ages: dict[tuple[str, int], float] = defaultdict(float)
    for loss in lost:
        if superseded(loss, final):
            key = (loss["region"], loss["epoch"])
            ages[key] = max(ages[key], loss["age"])
    return dict(sorted(ages.items()))


def under_reported(
    events: list[Event], lost: list[Event], acks: list[Event], final: Event | None
) -> list[Event]:
    """Failovers whose loss age beat the gauges in the 10 s before the old active's last ack.

    No sample in that window counts as reporting nothing, so any loss is
    under-reported (``reported`` null).
    """
    last = last_acks(acks)
    found = []
    for (region, epoch), age in failover_losses(lost, final).items():
        until = last[(region, epoch)]
        reported = reported_rpo(events, until - RPO_WINDOW, until)
        if age > (reported or 0.0):
            found.append({"region": region, "epoch": epoch, "loss_age": age, "reported": reported})
    return found


def rpo_summary(events: list[Event], lost: list[Event], under: list[Event]) -> dict[str, Any]:
    """Largest reported RPO, largest true loss age, and the under-reported failovers."""
    reported = [float(e["rpo"]) for e in of_type(events, "rpo") if e.get("rpo") is not None]
    return {
        "reported_max": max(reported, default=0.0),
        "true_max": max((loss["age"] for loss in lost), default=0.0),
        "under_reported": under,
    }


def fault_counts(events: list[Event], start: Event) -> dict[str, int]:
    """Injected faults by name; every fault the run enabled appears, 0 if never injected."""
    counts = dict.fromkeys(start.get("faults", []), 0)
    for f in of_type(events, "fault"):
        counts[f["fault"]] = counts.get(f["fault"], 0) + 1
    return counts


def rto_max(acks: list[Event]) -> float:
    """The longest gap between consecutive acknowledged writes of the ``dns`` client."""
    times = [w["t"] for w in acks if w.get("client") == "dns"]
    return max((b - a for a, b in pairwise(times)), default=0.0)


def check(events: list[Event]) -> dict[str, Any]:
    """The verdict on a history (docs/chaos.md). ValueError if it has no `start` line."""
    start = start_of(events)
    acks = acknowledged(events)
    final = final_of(events)
    lost = lost_writes(acks, final)
    brains = split_brains(acks)
    verdict = {
        "writes": write_counts(events),
        "lost": lost,
        "lost_ok": lost_ok(lost, final, start),
        "split_brain": brains,
        "split_brain_ok": not brains,
        "mirror_ok": mirror_ok(events),
        "vault_ok": vault_ok(events),
        "rpo": rpo_summary(events, lost, under_reported(events, lost, acks, final)),
        "faults": fault_counts(events, start),
        "rto_max": rto_max(acks),
    }
    keys = ("lost_ok", "split_brain_ok", "mirror_ok", "vault_ok")
    return {"ok": all(verdict[k] for k in keys), **verdict}
