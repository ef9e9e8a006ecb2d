"""Runbooks and the communication plan, rendered from the live configuration.

``render_runbook(cfg, config_path, fmt="md"|"html")`` names the real
regions, endpoints, buckets, streams and targets of ``cfg`` and prints the
exact commands to run, with ``--config`` pointing at ``config_path``. Each
command is one line in a ``sh`` block, so the runbook can be executed (the
tests run the restore section). A command this build does not have is
shown with a note instead of being presented as runnable.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from agent.config import AgentConfig
from agent.runbook import comms
from agent.runbook.sections import failback, failover, overview, restore, switchover


def available_commands() -> set[str]:
    """Top-level ``dragent`` subcommands of this build."""
    from agent.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if action.dest == "command":
            return set(getattr(action, "choices", {}) or {})
    return set()


def render_markdown(cfg: AgentConfig, config_path: Path) -> str:
    have = available_commands()
    path = str(config_path)
    parts = [
        f"# DR runbook: region {cfg.region}",
        "",
        f"Generated from `{path}`. Every command below runs on region "
        f"{cfg.region}'s host unless the step names another region.",
        "",
        overview(cfg),
        restore(cfg, path, have),
        failover(cfg, path, have),
        switchover(cfg, path, have),
        failback(cfg, path, have),
        comms.plan(cfg),
    ]
    return "\n".join(parts)


def _md_to_html(md: str) -> str:
    """Just enough Markdown for our own output: headings, lists, code blocks, paragraphs."""
    out, code = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</code></pre>" if code else "<pre><code>")
            code = not code
            continue
        text = html.escape(line)
        if code:
            out.append(text)
            continue
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        match = re.match(r"^(#{1,4}) (.*)$", text)
        if match:
            level = len(match.group(1))
            out.append(f"<h{level}>{match.group(2)}</h{level}>")
        elif text.startswith(("- ", "* ")):
            out.append(f"<li>{text[2:]}</li>")
        elif re.match(r"^\d+\. ", text):
            out.append(f"<li>{text.split('. ', 1)[1]}</li>")
        elif text.startswith("| "):
            cells = [c.strip() for c in text.strip("|").split("|")]
            if not all(set(c) <= {"-", " "} for c in cells):
                out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif text.strip():
            out.append(f"<p>{text}</p>")
    return "\n".join(out)


def render_runbook(cfg: AgentConfig, config_path: Path, *, fmt: str = "md") -> str:
    md = render_markdown(cfg, config_path)
    if fmt == "md":
        return md
    body = _md_to_html(md)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>DR runbook: {html.escape(cfg.region)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto}"
        "pre{background:#f5f5f5;padding:.5rem;overflow-x:auto}td{border:1px solid #ccc;"
        "padding:.2rem .4rem}</style></head><body>"
        f"{body}</body></html>"
    )


def commands(markdown: str, section: str) -> list[str]:
    """The commands of one ``## <section>`` of a rendered runbook, in order."""
    match = re.search(rf"^## {re.escape(section)}\b.*?(?=^## |\Z)", markdown, re.M | re.S)
    if not match:
        return []
    blocks = re.findall(r"```sh\n(.*?)```", match.group(0), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


__all__ = ["commands", "render_markdown", "render_runbook"]
