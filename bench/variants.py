"""The rows of an ablation table: the ``variants`` an ablation file declares.

Each variant is ``{label, ref, match}``: ``match`` maps dotted config paths to the values
that pick a run's record for that row, ``ref`` is the row key in the paper's table. The
sweep checks that every planned run matches a row; the tables group records by them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


def config_value(config: Mapping, dotted: str, default=None):
    """``config['a']['b']`` for ``'a.b'``; list indices may appear as numbers."""
    node = config
    for key in dotted.split("."):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return default
    return node


def same_value(a, b) -> bool:
    """Config values equal, floats up to rounding (1/16 and 0.0625 are one ratio)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table."""

    label: str
    ref: str | None
    match: Mapping

    def matches(self, config: Mapping) -> bool:
        missing = object()
        return all(
            same_value(config_value(config, key, missing), value)
            for key, value in self.match.items()
        )


def variants_of(config: Mapping) -> list[Variant]:
    """The table rows an ablation config declares (its ``variants`` list)."""
    rows = config.get("variants") or []
    return [Variant(str(r["label"]), r.get("ref"), dict(r.get("match") or {})) for r in rows]
