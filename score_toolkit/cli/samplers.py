"""The ``samplers`` command: ``score-toolkit samplers [--json] [--strict]`` lists the registered samplers."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

__all__ = ["add_samplers_parser", "cmd_samplers"]


def add_samplers_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "samplers",
        help="list the registered samplers (built-in, plugins, in-process)",
        description=(
            "List every sampler found in the entry-point group 'score_toolkit.samplers': its origin "
            "(built-in or the plugin distribution), description, declared properties and load status. "
            "Broken plugins are listed with their error; the exit code is 0 unless --strict is given "
            "(or SCORE_TOOLKIT_STRICT_PLUGINS=1 is set) and a plugin is broken."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit code 1) at the first broken plugin (same as SCORE_TOOLKIT_STRICT_PLUGINS=1)",
    )
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(args: argparse.Namespace) -> int:
    from ..registry import PluginLoadError, SamplerPluginWarning, sampler_info

    with warnings.catch_warnings(record=True) as caught:
        # broken plugins and duplicate names are shown in the table itself
        warnings.simplefilter("always", SamplerPluginWarning)
        try:
            records = sampler_info(strict=True if args.strict else None)
        except (PluginLoadError, RuntimeError) as exc:
            print(f"score-toolkit samplers: error: {exc}", file=sys.stderr)
            return 1
    for w in caught:
        if not issubclass(w.category, SamplerPluginWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.json:
        print(json.dumps(records, indent=2, default=repr))
    else:
        print(_samplers_table(records))
    return 0


def _properties_summary(props: dict[str, Any] | None) -> str:
    if props is None:
        return "-"
    parts = ["stochastic" if props.get("stochastic") else "deterministic"]
    order = props.get("order")
    parts.append(f"order {order:g}" if order is not None else "no order")
    if props.get("adaptive"):
        parts.append("adaptive")
    if props.get("fixed_grid"):
        parts.append("fixed grid")
    if not props.get("per_sample", True):
        parts.append("couples samples")
    if props.get("needs_energy"):
        parts.append("needs energy")
    if props.get("final_time", "t_min") != "t_min":
        parts.append(f"ends at {props['final_time']} t")
    return ", ".join(parts)


def _samplers_table(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no samplers registered"
    header = ("NAME", "ORIGIN", "STATUS", "PROPERTIES", "DESCRIPTION")
    rows = [
        (
            r["name"],
            r["origin"],
            "ok" if r["status"] == "ok" else "ERROR",
            _properties_summary(r["properties"]),
            r["description"] or "-",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []

    def fmt(row) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1])

    lines.append(fmt(header))
    for r, row in zip(records, rows):
        lines.append(fmt(row).rstrip())
        if r["status"] != "ok":
            lines.append(f"    error: {r['status']}")
        for other in r.get("shadows", []):
            lines.append(f"    note: also declared by {other}, which is not used")
    broken = sum(r["status"] != "ok" for r in records)
    lines.append(f"\n{len(records)} samplers, {broken} broken")
    return "\n".join(lines)
