"""Injection of attention blocks into timm ResNets (BasicBlock and Bottleneck).

A placement says which registered block goes where::

    {"block": "cbam", "stages": [1, 2, 3, 4], "blocks": "all", "position": "residual",
     "args": {"rd_ratio": 1 / 16}, "stage_args": {4: {"kernel_size": 7}}}

Positions, relative to one residual unit ``out = act(F(x) + S(x))``:

- ``residual``: on F(x) after its last norm, before the addition (SENet/CBAM standard;
  timm's ``se`` slot).
- ``pre``: on the input of F only; the shortcut sees the unmodified x (SE-PRE).
- ``post``: on ``out``, after the addition and the final activation (SE-POST).
- ``identity``: on S(x), after the projection where there is one (SE-Identity).
- ``after_conv1`` / ``after_conv2``: inside F, after the first / second convolution's norm
  and activation (``after_conv2`` exists only in a Bottleneck).
- ``stage_end``: once after the last unit of a stage.
- ``unit_input``: on the unit's input x, before both F and S, i.e. a block between the
  previous unit and this one (where the non-local paper puts its blocks: ``blocks: last,
  stages: [3]`` is "one block right before the last residual unit of res4"; our stages
  1..4 are the papers' res2..res5). Unlike ``pre``, the shortcut sees the block's output.
- ``before_convs``: one block before every convolution of the unit: conv1, conv2, conv3
  (Bottleneck) and the projection conv of the shortcut where there is one. Each is its
  own block, at that convolution's input width; the projection's block is not shared
  with conv1's although both see x. This is GCT's placement (z-x-yang/GCT,
  ``PyTorch/resnet.py``: ``nn.Sequential(GCT(c), Conv2d(...))`` for conv1/conv2/conv3 and
  ``downsample = nn.Sequential(GCT(in_channels), Conv2d(...), bn)``).
- ``stem``: one block before the stem's first convolution, on the image itself (GCT's
  ``GCT(3)`` in the official ``BaseStem``). It belongs to no stage: ``stages``,
  ``blocks`` and ``stage_args`` must be left out (the normalised form has ``stages: []``);
  its summary row has stage 0 and its path is ``conv1.attention.<i>``.

Blocks are added by wrapping the unit's own submodules (``se``, ``conv1``, ``conv2``,
``conv3``, ``act1``, ``act2``/``act3``, ``downsample`` and the projection conv inside it),
the unit itself (``unit_input``) or the stem's ``conv1`` in ``WithAttention``, never by
rewriting timm's forward. A wrapped module keeps its original as ``.layer`` (so its
state-dict keys gain a ``.layer``). Every block in a stage lives at a path
``layer<stage>.<...>.attention.<i>``, so a profiler finds the blocks by type
(``attention_modules``) and their stage by the path's first part; the stem's block is under
``conv1``, the stem's own top-level child. Everything is validated (keys, names, stages,
indices, positions, argument names and values) before the model is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backbones import BackboneSpec, StageSpec, backbone_spec, describe_backbone, residual_units
from .registry import (
    POSITIONS,
    available,
    block_class,
    block_positions,
    build_attention,
    check_arguments,
)

PLACEMENT_KEYS = ("block", "stages", "blocks", "position", "args", "stage_args")
BLOCK_CHOICES = ("all", "first", "last")

# Positions with one site per unit: the unit's submodule each wraps, and whether the
# attention runs before it. (stage_end, unit_input, before_convs and stem are placed apart.)
_SITES: dict[str, dict[str, tuple[str, bool]]] = {
    "basic": {
        "residual": ("se", False),
        "pre": ("conv1", True),
        "after_conv1": ("act1", False),
        "post": ("act2", False),
        "identity": ("downsample", False),
    },
    "bottleneck": {
        "residual": ("se", False),
        "pre": ("conv1", True),
        "after_conv1": ("act1", False),
        "after_conv2": ("act2", False),
        "post": ("act3", False),
        "identity": ("downsample", False),
    },
}


# before_convs: the unit's convolutions, in the order their sites are listed.
_CONVS = {"basic": ("conv1", "conv2"), "bottleneck": ("conv1", "conv2", "conv3")}
PROJECTION = "downsample"


class WithAttention(nn.Module):
    """``layer`` (possibly None, i.e. identity) with attention blocks run before or after it."""

    def __init__(self, layer: nn.Module | None, before: bool):
        super().__init__()
        self.layer = layer
        self.before = before
        self.attention = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.attention(x)
        if self.before:
            return self.layer(self.attention(x))
        return self.attention(self.layer(x))

    def extra_repr(self) -> str:
        return "attention before layer" if self.before else "attention after layer"


@dataclass(frozen=True)
class InjectedBlock:
    """One row of the summary: one block instance in the model."""

    placement: int  # index in the list of placements
    block: str
    stage: int  # 1-based; 0 for position stem
    block_index: int | None  # None for stage_end and stem
    position: str
    channels: int
    params: int
    path: str


class InjectionSummary(list):
    """The rows ``inject`` returns (a list of ``InjectedBlock``), with totals and a table."""

    def total_params(self) -> int:
        return sum(row.params for row in self)

    def params_by_stage(self) -> dict[str, int]:
        """Parameters per ``layer<N>``, and ``stem`` for blocks at position ``stem``."""
        totals: dict[str, int] = {}
        for row in self:
            key = _stage_label(row)
            totals[key] = totals.get(key, 0) + row.params
        return totals

    def to_dicts(self) -> list[dict]:
        return [asdict(row) for row in self]

    def table(self) -> str:
        """Rows that differ only in the unit index are merged into one line."""
        groups: list[list[InjectedBlock]] = []
        for row in self:
            if groups and row.block_index is not None and _group(groups[-1][0]) == _group(row):
                groups[-1].append(row)
            else:
                groups.append([row])
        header = ("#", "block", "stage", "units", "position", "channels", "params", "n", "total")
        lines = [header]
        for group in groups:
            first = group[0]
            units = (
                "-" if first.position == "stem" else _index_ranges([r.block_index for r in group])
            )
            lines.append(
                (
                    str(first.placement),
                    first.block,
                    _stage_label(first),
                    units,
                    _position_label(first),
                    str(first.channels),
                    f"{first.params:,}",
                    str(len(group)),
                    f"{first.params * len(group):,}",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        ]
        text.append(f"attention parameters: {self.total_params():,} in {len(self)} blocks")
        return "\n".join(text)


def _group(row: InjectedBlock) -> tuple:
    return (row.placement, row.block, row.stage, _position_label(row), row.channels, row.params)


def _stage_label(row: InjectedBlock) -> str:
    return "stem" if row.stage == 0 else f"layer{row.stage}"


def _position_label(row: InjectedBlock) -> str:
    """The position, and for ``before_convs`` which convolution (read off the path)."""
    if row.position != "before_convs":
        return row.position
    conv = next(p for p in row.path.split(".") if p in (*_CONVS["bottleneck"], PROJECTION))
    return f"before_convs:{conv}"


def _index_ranges(indices: list[int | None]) -> str:
    if indices == [None]:
        return "end"
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# --- validation ----------------------------------------------------------------------


def _plain(value):
    """Plain dicts and lists out of any Mapping/Sequence (e.g. OmegaConf containers)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        converted = [_plain(item) for item in value]
        return tuple(converted) if isinstance(value, tuple) else converted
    return value


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _closest(word, choices) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _spec(backbone) -> BackboneSpec:
    if isinstance(backbone, BackboneSpec):
        return backbone
    if isinstance(backbone, str):
        return backbone_spec(backbone)
    if isinstance(backbone, nn.Module):
        return describe_backbone(backbone)
    raise ValueError(
        f"backbone must be a backbone name, a BackboneSpec or a built timm ResNet, "
        f"got {type(backbone).__name__}"
    )


def _stages(where: str, value, spec: BackboneSpec) -> list[int]:
    """Stage numbers 1..n. Negative numbers count from the end (-1 is the last stage) and
    ``all_but_last`` drops the last, so one placement reads the same on a 4-stage ImageNet
    ResNet and a 3-stage CIFAR ResNet (GC's "last three stages", BAM's bottlenecks)."""
    n = spec.num_stages
    accepted = (
        f"'all', 'all_but_last', or stage numbers 1..{n} (negatives count from the end: -1 "
        f"is the last; {spec.name} has {n} stages)"
    )
    if value == "all":
        return list(range(1, n + 1))
    if value == "all_but_last":
        return list(range(1, n))
    items = [value] if _is_index(value) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{where}: stages={value!r} is not accepted; use {accepted}")
    for stage in items:
        if not _is_index(stage) or not (1 <= stage <= n or -n <= stage <= -1):
            raise ValueError(f"{where}: stage {stage!r} is out of range; use {accepted}")
    items = [stage if stage > 0 else n + 1 + stage for stage in items]
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: stages={value!r} names a stage twice")
    return sorted(items)


def _blocks(where: str, value):
    accepted = "'all', 'first', 'last', or a list of 0-based unit indices (negative from the end)"
    if value in BLOCK_CHOICES:
        return value
    items = [value] if _is_index(value) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{where}: blocks={value!r} is not accepted; use {accepted}")
    if not all(_is_index(i) for i in items):
        raise ValueError(f"{where}: blocks={value!r} is not accepted; use {accepted}")
    return list(items)


def _unit_indices(where: str, blocks, stage: StageSpec) -> list[int]:
    n = stage.num_blocks
    if blocks == "all":
        return list(range(n))
    if blocks == "first":
        return [0]
    if blocks == "last":
        return [n - 1]
    resolved = []
    for i in blocks:
        if not -n <= i < n:
            raise ValueError(
                f"{where}: block index {i} is out of range for stage {stage.index}, which has "
                f"{n} blocks (use 0..{n - 1} or -{n}..-1)"
            )
        resolved.append(i % n)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"{where}: blocks={blocks!r} names a block of stage {stage.index} twice")
    return sorted(resolved)


def _channels(stage: StageSpec, position: str, unit: int | None, conv: str | None) -> int:
    if position in ("pre", "unit_input"):
        return stage.in_channels[unit]
    if position in ("after_conv1", "after_conv2"):
        return stage.width
    if position == "before_convs":
        return stage.in_channels[unit] if conv in ("conv1", PROJECTION) else stage.width
    return stage.out_channels


@dataclass(frozen=True)
class _Site:
    placement: int
    block: str
    stage: StageSpec | None  # None for position stem
    unit: int | None  # None for stage_end and stem
    position: str
    channels: int
    args: dict
    conv: str | None = None  # before_convs: conv1, conv2, conv3 or downsample

    @property
    def stage_index(self) -> int:
        return 0 if self.stage is None else self.stage.index


def _unit_sites(position: str, stage: StageSpec, units: list[int]) -> list[tuple]:
    """(unit, conv) of every block a placement puts in ``stage``. ``before_convs`` lists
    all units' conv1 sites, then all conv2 sites, ..., then the projections, so that the
    summary table merges each kind of site into one line."""
    if position == "stage_end":
        return [(None, None)]
    if position != "before_convs":
        return [(u, None) for u in units]
    sites = [(u, conv) for conv in _CONVS[stage.block] for u in units]
    return sites + [(u, PROJECTION) for u in units if stage.has_projection(u)]


def _resolve(where: str, name: str, args: dict, spec: BackboneSpec, stage) -> dict:
    """The block's own resolution of arguments that depend on the backbone and stage."""
    resolve = getattr(block_class(name), "resolve_arguments", None)
    if resolve is None:
        return args
    try:
        return resolve(dict(args), spec, stage)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _normalise_stem(where: str, placement: dict, spec: BackboneSpec, head: str, index: int):
    """Position ``stem``: one block before the stem's first convolution, in no stage."""
    for key, empty in (("stages", []), ("blocks", "all"), ("stage_args", {})):
        if key in placement and placement[key] not in (empty, None):
            raise ValueError(
                f"{where}: position 'stem' places one block before the stem's first "
                f"convolution, outside the stages; leave out {key!r} "
                f"(got {key}={placement[key]!r})"
            )
    args = placement.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"{where}: args must be a mapping of block arguments, got {args!r}")
    name = placement["block"]
    try:
        check_arguments(name, args)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    merged = _resolve(f"{head} ({name}, stem)", name, args, spec, None)
    normalised = {
        "block": name,
        "stages": [],
        "blocks": "all",
        "position": "stem",
        "args": args,
        "stage_args": {},
    }
    return normalised, [_Site(index, name, None, None, "stem", spec.in_channels, merged)]


def _normalise(index: int, raw, spec: BackboneSpec, prefix: str) -> tuple[dict, list[_Site]]:
    head = where = f"{prefix}[{index}]"
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{where}: a placement must be a mapping with keys {', '.join(PLACEMENT_KEYS)}, "
            f"got {type(raw).__name__}"
        )
    placement = _plain(raw)
    for key in placement:
        if key not in PLACEMENT_KEYS:
            raise ValueError(
                f"{where}: unknown key {key!r}{_closest(key, PLACEMENT_KEYS)}; "
                f"accepted: {', '.join(PLACEMENT_KEYS)}"
            )
    if "block" not in placement:
        raise ValueError(f"{where}: 'block' is required; one of {', '.join(available())}")
    name = placement["block"]
    if not isinstance(name, str):
        raise ValueError(f"{where}: block must be a name, one of {', '.join(available())}")
    try:
        block_class(name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    where = f"{where} ({name})"

    position = placement.get("position", "residual")
    if position not in POSITIONS:
        raise ValueError(
            f"{where}: position={position!r} is not accepted{_closest(position, POSITIONS)}; "
            f"choose one of {', '.join(POSITIONS)}"
        )
    allowed = block_positions(name)
    if position not in allowed:
        hint = ""
        if position == "pre" and "unit_input" in allowed:
            hint = (
                " ('pre' is on the residual branch's input only, so the shortcut skips the "
                "block; 'unit_input' runs it on the whole unit's input, between units)"
            )
        raise ValueError(
            f"{where}: block {name!r} cannot be placed at position {position!r}; "
            f"it allows {', '.join(allowed)}{hint}"
        )
    if position == "stem":
        return _normalise_stem(where, placement, spec, head, index)

    stages = _stages(where, placement.get("stages", "all"), spec)
    blocks = _blocks(where, placement.get("blocks", "all"))
    if position == "stage_end" and blocks != "all":
        raise ValueError(
            f"{where}: position 'stage_end' places one block after each stage's last unit, "
            f"so blocks must be 'all', got {blocks!r}"
        )

    args = placement.get("args") or {}
    raw_stage_args = placement.get("stage_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"{where}: args must be a mapping of block arguments, got {args!r}")
    if not isinstance(raw_stage_args, dict):
        raise ValueError(
            f"{where}: stage_args must map stage numbers to argument mappings, "
            f"got {raw_stage_args!r}"
        )
    stage_args = {}
    for key, overrides in raw_stage_args.items():
        stage = int(key) if isinstance(key, str) and key.isdigit() else key
        if stage not in stages:
            raise ValueError(
                f"{where}: stage_args has stage {key!r}, which is not among its stages "
                f"{stages}; use one of those"
            )
        if not isinstance(overrides, dict):
            raise ValueError(
                f"{where}: stage_args[{stage}] must be a mapping of block arguments, "
                f"got {overrides!r}"
            )
        stage_args[stage] = overrides
    try:
        check_arguments(name, args)
        for overrides in stage_args.values():
            check_arguments(name, overrides)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None

    sites = []
    for stage_number in stages:
        stage = spec.stages[stage_number - 1]
        stage_where = f"{head} ({name}, stage {stage_number})"
        if position == "after_conv2" and stage.block == "basic":
            raise ValueError(
                f"{stage_where}: position 'after_conv2' needs a Bottleneck, but stage "
                f"{stage_number} of {spec.name} has BasicBlocks, whose second convolution "
                f"ends the residual branch; use position 'residual'"
            )
        units = [] if position == "stage_end" else _unit_indices(stage_where, blocks, stage)
        merged = {**args, **stage_args.get(stage_number, {})}
        merged = _resolve(stage_where, name, merged, spec, stage)
        sites += [
            _Site(index, name, stage, u, position, _channels(stage, position, u, c), merged, c)
            for u, c in _unit_sites(position, stage, units)
        ]
    normalised = {
        "block": name,
        "stages": stages,
        "blocks": blocks,
        "position": position,
        "args": args,
        "stage_args": stage_args,
    }
    return normalised, sites


def _check_values(sites: list[_Site], prefix: str) -> None:
    """Build each distinct (block, channels, arguments) once, so that a bad argument value
    is reported with its placement before the model is touched."""
    seen = set()
    # Throwaway builds must not shift the random stream that initialises the real blocks.
    with torch.random.fork_rng(devices=[]):
        for site in sites:
            key = (site.block, site.channels, repr(sorted(site.args.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                build_attention(site.block, site.channels, **site.args)
            except (ValueError, TypeError) as err:
                stage = "stem" if site.stage is None else f"stage {site.stage.index}"
                raise ValueError(
                    f"{prefix}[{site.placement}] ({site.block}, {stage}): {err}"
                ) from None


def _plan(placements, backbone, prefix: str) -> tuple[list[dict], list[_Site]]:
    spec = _spec(backbone)
    if placements is None:
        return [], []
    if isinstance(placements, Mapping):
        placements = [placements]
    if isinstance(placements, (str, bytes)) or not isinstance(placements, Sequence):
        raise ValueError(
            f"{prefix} must be a list of placements (mappings), got {type(placements).__name__}"
        )
    normalised, sites = [], []
    for index, raw in enumerate(placements):
        placement, placement_sites = _normalise(index, raw, spec, prefix)
        normalised.append(placement)
        sites += placement_sites
    _check_values(sites, prefix)
    return normalised, sites


def validate_placements(placements, backbone, prefix: str = "attention") -> list[dict]:
    """Check a list of placements against a backbone (a name from ``backbone_names()``, a
    ``BackboneSpec`` or a built timm ResNet, which is only read) and return them normalised:
    plain dicts with every key present, ``stages`` as a sorted list of ints and
    ``stage_args`` keyed by int. Raises a ValueError naming the placement and the key."""
    return _plan(placements, backbone, prefix)[0]


# --- injection -----------------------------------------------------------------------


def _wrap(parent: nn.Module, attr: str, before: bool, block: nn.Module) -> None:
    """Append ``block`` to the ``WithAttention`` around ``parent.<attr>``, wrapping it first
    if it is not wrapped yet."""
    holder = getattr(parent, attr)
    if not isinstance(holder, WithAttention):
        holder = WithAttention(holder, before)
        setattr(parent, attr, holder)
    holder.attention.append(block)


def _projection_conv(unit: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the shortcut's projection convolution, looking through the
    ``WithAttention`` that position ``identity`` puts around the whole downsample."""
    downsample = unit.downsample
    if isinstance(downsample, WithAttention) and downsample.layer is not None:
        downsample = downsample.layer
    for attr, child in downsample.named_children():
        inner = child.layer if isinstance(child, WithAttention) else child
        if isinstance(inner, nn.Conv2d):
            return downsample, attr
    raise ValueError(f"the unit's downsample has no convolution: {downsample}")


def _attach(model: nn.Module, site: _Site, block: nn.Module) -> None:
    """Put ``block`` at ``site``."""
    if site.position == "stem":
        return _wrap(model, "conv1", True, block)
    stage = getattr(model, site.stage.name)
    if site.position == "stage_end":
        if not hasattr(stage, "attention"):
            stage.add_module("attention", nn.Sequential())
        return stage.attention.append(block)
    unit = residual_units(stage)[site.unit]
    if site.position == "unit_input":
        name = next(n for n, m in stage.named_children() if getattr(m, "layer", m) is unit)
        return _wrap(stage, name, True, block)
    if site.position == "before_convs" and site.conv == PROJECTION:
        return _wrap(*_projection_conv(unit), True, block)
    if site.position == "before_convs":
        return _wrap(unit, site.conv, True, block)
    attr, before = _SITES[site.stage.block][site.position]
    return _wrap(unit, attr, before, block)


def inject(model: nn.Module, placements, prefix: str = "attention") -> InjectionSummary:
    """Add the attention blocks of ``placements`` to a built timm ResNet, in list order
    (several blocks at one spot run in that order), and return what went where.

    The summary's paths are those after this call. A later call that wraps a module holding
    blocks of this one (``unit_input`` wraps the unit, ``identity`` the downsample) moves
    those blocks under the wrapper's ``.layer``; ``attention_modules`` always has the
    current paths.

    Nothing is changed unless every placement is valid. New blocks take the model's
    device, dtype and train/eval mode.
    """
    _, sites = _plan(placements, model, prefix)
    reference = next(model.parameters(), None)
    blocks = []
    for site in sites:
        block = build_attention(site.block, site.channels, **site.args)
        if reference is not None:
            block.to(device=reference.device, dtype=reference.dtype)
        block.train(model.training)
        _attach(model, site, block)
        blocks.append(block)
    # Paths are read once everything is in place: a later site may wrap a module that
    # holds an earlier block (unit_input wraps the unit, identity the downsample).
    paths = {id(module): path for path, module in model.named_modules()}
    return InjectionSummary(
        InjectedBlock(
            site.placement,
            site.block,
            site.stage_index,
            site.unit,
            site.position,
            site.channels,
            sum(p.numel() for p in block.parameters()),
            paths[id(block)],
        )
        for site, block in zip(sites, blocks, strict=True)
    )


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every registered attention block in ``model``, outermost only."""
    classes = tuple(block_class(name) for name in available())
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, classes) and not any(
            path.startswith(outer + ".") for outer, _ in found
        ):
            found.append((path, module))
    return found
