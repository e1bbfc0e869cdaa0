"""The rows of an ablation table: the ``variants`` an ablation file declares, and the
setting a run belongs to.

Each variant is ``{label, ref, match}``: ``match`` maps dotted config paths to the values
that pick a run's record for that row; ``ref`` names the row of the paper's table. The
sweep checks that every planned run matches a row; the tables group records by them.

Refs are keyed by setting, because a paper's number only describes the paper's setting.
A run's setting is ``setting_of(config)``, e.g. ``imagenet-imagenet-resnet50`` (protocol,
dataset, backbone; a key that is one of the ablation's axes is left out). The ablation's
``paper.settings`` lists the settings its paper's numbers are for; a plain ``ref: r16``
applies in those, and a mapping ``ref: {cifar-cifar10-resnet56_cifar: resnet56_se, ...}``
picks a row per setting. In any other setting a row shows no paper number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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


# Config paths that name the setting a run was trained under, in the order they appear in
# its name. A path that is an axis of the ablation is left out of the name. A protocol
# whose recipe changed carries protocol.version (shown as ``v2``), so runs of the old and
# the new recipe land in separate tables; records without one are the first version.
SETTING_KEYS = ("protocol.name", "protocol.version", "data.name", "model.name")
SETTING_PREFIXES = {"protocol.version": "v"}


def setting_of(config: Mapping) -> str:
    """A file-name-safe name for what a run was trained under, e.g. ``cifar-cifar10``."""
    axis_paths = {key for v in variants_of(config) for key in v.match}
    parts = []
    for key in SETTING_KEYS:
        if key in axis_paths or any(key.startswith(p + ".") for p in axis_paths):
            continue
        value = config_value(config, key)
        if value is not None:
            parts.append(SETTING_PREFIXES.get(key, "") + str(value))
    name = "-".join(parts) or "default"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table."""

    label: str
    ref: str | Mapping | None
    match: Mapping

    def ref_in(self, setting: str, paper_settings: Sequence[str]) -> str | None:
        """The paper's row for this variant in ``setting``, if the paper has one there."""
        if isinstance(self.ref, Mapping):
            return self.ref.get(setting)
        return self.ref if setting in paper_settings else None

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


def paper_row(config: Mapping, variant: Variant) -> str | None:
    """The paper's row for ``variant`` in the setting of the run ``config`` describes.

    Records written before refs were keyed by setting have no ``paper.settings``: their
    plain refs apply as they did then."""
    paper = config.get("paper") or {}
    if "settings" not in paper and not isinstance(variant.ref, Mapping):
        return variant.ref
    return variant.ref_in(setting_of(config), paper.get("settings") or [])
