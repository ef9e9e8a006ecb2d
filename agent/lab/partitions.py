"""Cutting links between lab members: nftables inside each member's namespace.

Each namespace of a ``netns`` lab has the table ``inet dragent_lab``: a set
``cut`` of addresses and two chains that drop, silently, every packet from
(input) and to (output) an address in the set. ``partition(a, b)`` is then
``b`` in a's set and ``a`` in b's: both directions drop, so TCP sees
timeouts, never resets, as across a real partition; traffic with the host
(the bridge address) and with every other member goes on. Healing removes
the addresses again; established connections resume if they have not timed
out.

``install(net)`` creates the table in every member's namespace (keeping a
set that exists); ``cut``, ``restore`` and ``links`` are what ``Lab.partition``,
``Lab.heal`` and ``Lab.partitions`` do. The sets are the only record of the
partitions. Every change rewrites a set in one nft transaction, so it is
atomic and idempotent. Calls are synchronous (one short ``nft`` run each).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Collection
from pathlib import Path

from agent.lab import netns
from agent.lab.network import HOST_INDEX, Network, ip_program
from agent.lab.processes import LabError

MEMBERS = tuple(HOST_INDEX)

TABLE = "dragent_lab"
SET = "cut"
NFT_TIMEOUT = 5.0

IN, OUT = "cut_in", "cut_out"
"""One-way cuts: a namespace drops what arrives from an address in ``cut_in`` and what it
sends to an address in ``cut_out`` (``cut_one_way``)."""

_RULESET = f"""\
table inet {TABLE} {{
    set {SET} {{
        type ipv4_addr
    }}
    set {IN} {{
        type ipv4_addr
    }}
    set {OUT} {{
        type ipv4_addr
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr @{SET} drop
        ip saddr @{IN} drop
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr @{SET} drop
        ip daddr @{OUT} drop
    }}
}}
"""


def nft_program() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"


def check_available() -> None:
    """Raise ``LabError`` naming the package if ``nft`` is missing."""
    if not Path(nft_program()).exists():
        raise LabError(
            "nftables' `nft` is not installed: the netns lab cuts links with it",
            hint="apt-get install nftables (deploy/lab/install-system-deps.sh installs it)",
        )


def _nft(ns: str, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [ip_program(), "netns", "exec", ns, nft_program(), *args]
    try:
        return subprocess.run(
            argv, input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"nft in namespace {ns} failed: {exc}") from None


def _apply(ns: str, script: str) -> None:
    done = _nft(ns, "-f", "-", script=script)
    if done.returncode:
        raise LabError(f"nft in namespace {ns} refused the rules: {done.stderr.strip()}")


def ensure_table(ns: str) -> None:
    """Create the table, its sets and chains in ``ns`` unless they exist (a set
    that exists keeps its addresses; a table from before the one-way sets is
    replaced)."""
    if _nft(ns, "list", "table", "inet", TABLE).returncode != 0:
        _apply(ns, _RULESET)
    elif _nft(ns, "list", "set", "inet", TABLE, IN).returncode != 0:
        _apply(ns, f"delete table inet {TABLE}\n" + _RULESET)


def cut_off(ns: str, name: str = SET) -> set[str]:
    """The addresses ``ns`` drops every packet to and from (``name``: or one way)."""
    done = _nft(ns, "-j", "list", "set", "inet", TABLE, name)
    if done.returncode:
        raise LabError(f"cannot read the partitions of namespace {ns}: {done.stderr.strip()}")
    found: set[str] = set()
    for item in json.loads(done.stdout).get("nftables", []):
        for element in item.get("set", {}).get("elem", []):
            if isinstance(element, str):
                found.add(element)
    return found


def set_cut_off(ns: str, addresses: Collection[str], name: str = SET) -> None:
    """Make ``ns`` drop exactly the traffic with ``addresses`` (empty: heal all)."""
    script = f"flush set inet {TABLE} {name}\n"
    if addresses:
        script += f"add element inet {TABLE} {name} {{ {', '.join(sorted(addresses))} }}\n"
    _apply(ns, script)


def cut_one_way(net: Network, x: str, y: str) -> None:
    """Drop every packet from ``x`` to ``y`` (y's packets still reach x; TCP then
    stalls both ways, while datagrams from y get through)."""
    _check_pair(x, y)
    out, into = net.namespace(x), net.namespace(y)
    set_cut_off(out, cut_off(out, OUT) | {net.address(y)}, OUT)
    set_cut_off(into, cut_off(into, IN) | {net.address(x)}, IN)


def restore_one_way(net: Network) -> None:
    """Heal every one-way cut."""
    for member in MEMBERS:
        ns = net.namespace(member)
        for name in (IN, OUT):
            if cut_off(ns, name):
                set_cut_off(ns, (), name)


def install(net: Network) -> None:
    """The table in every member's namespace (see ``ensure_table``)."""
    check_available()
    for member in MEMBERS:
        ensure_table(net.namespace(member))


def cut(net: Network, x: str, y: str) -> None:
    """Drop everything between members ``x`` and ``y``, both ways."""
    _check_pair(x, y)
    for me, other in ((x, y), (y, x)):
        ns = net.namespace(me)
        set_cut_off(ns, cut_off(ns) | {net.address(other)})


def restore(net: Network, x: str | None = None, y: str | None = None) -> None:
    """Restore the link ``x``–``y``; every link of ``x`` if ``y`` is None; all if both are."""
    if x is None:
        x, y = y, None
    if x is not None and y is not None:
        _check_pair(x, y)
    elif x is not None:
        _check_member(x)
    for me in MEMBERS:
        ns = net.namespace(me)
        now = cut_off(ns)
        if x is None or (y is None and me == x):
            keep: set[str] = set()
        elif y is None:
            keep = now - {net.address(x)}
        else:
            other = {x: y, y: x}.get(me)
            keep = now - {net.address(other)} if other else now
        if keep != now:
            set_cut_off(ns, keep)


def links(net: Network) -> list[tuple[str, str]]:
    """The cut links as member pairs, in member order. Namespaces that do not exist
    (before ``up``, after a reboot) have none."""
    pairs: set[tuple[str, str]] = set()
    for me in MEMBERS:
        if not netns.exists(net.namespace(me)):
            continue
        for address in cut_off(net.namespace(me)):
            other = net.member_at(address)
            if other is not None:
                pairs.add((me, other) if MEMBERS.index(me) < MEMBERS.index(other) else (other, me))
    return sorted(pairs, key=lambda p: (MEMBERS.index(p[0]), MEMBERS.index(p[1])))


def _check_member(member: str) -> None:
    if member not in MEMBERS:
        raise LabError(f"unknown member {member!r}: expected one of {', '.join(MEMBERS)}")


def _check_pair(x: str, y: str) -> None:
    _check_member(x)
    _check_member(y)
    if x == y:
        raise LabError(f"a link joins two members: {x} and {y} are the same")
