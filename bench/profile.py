"""Parameters and multiply-accumulates of a model, total, per stage and for attention alone.

Units (per image, at the given input size):

- ``gmacs``: multiply-accumulates of convolutions and matrix products (conv, linear, mm,
  bmm, matmul/einsum, scaled-dot-product attention), in billions. This is
  ``torch.utils.flop_counter.FlopCounterMode`` total / 2 and the unit the SE, CBAM and ECA
  papers call "GFLOPs". Bias additions folded into a conv/linear are not counted, as in
  the papers.
- ``gmacs_elementwise``: ``gmacs`` plus every other arithmetic op, each counted as ONE
  MAC-equivalent per element of its largest tensor (input or output): activations,
  gating multiplies, residual adds, norms, softmax, pooling and reductions. A global
  average pool over a (C, H, W) map costs C*H*W, a sigmoid gate on it C*H*W, a 3x3 max
  pool its input size. Data movement (views, cat, copies, allocation) is free, and bias
  additions folded into a conv/linear stay uncounted here too.
  The unit is coarse on purpose: it makes blocks whose cost is mostly element-wise (CBAM's
  spatial gate, SimAM, GC's softmax pooling) visible, which the papers' count hides.

``per_stage`` splits both counts by the model's top-level children: ``stem`` (everything
before the first ``layerN``), each ``layerN``, and ``head`` (everything after). ``attention``
is the share of injected attention blocks (modules whose class is a registered block),
each counted once even when one block nests another.

Scaled-dot-product attention runs as bmm/softmax/bmm (counted as such) or, for contiguous
inputs on CPU, as ``aten._scaled_dot_product_flash_attention_for_cpu``,
which torch's flop registry does not know; it is counted here (2 * L * S * (E + Ev) FLOPs
per batch and head), so a non-local block's cost grows with (H*W)^2 as it should. Blocks
that zero-pad q/k/v to one width for the fused kernels are counted at their own widths
(``modules.parts.exact_attention_widths``).

    python -m bench.profile                                 # paper comparison table
    python -m bench.profile --backbone resnet50 --attention cbam --stride-in-1x1 --json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from bench.reference import agrees, load_reference
from modules import build_backbone, inject
from modules.parts import exact_attention_widths
from modules.registry import available, block_class, block_positions

aten = torch.ops.aten

# Ops that are arithmetic but carry neither the "pointwise" nor the "reduction" tag.
_ELEMENTWISE_EXTRA = {
    aten.native_batch_norm,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
    aten.native_layer_norm,
    aten.native_group_norm,
    aten._softmax,
    aten._safe_softmax,
    aten._log_softmax,
    aten.max_pool2d_with_indices,
    aten.max_pool3d_with_indices,
    aten.avg_pool2d,
    aten.avg_pool3d,
    aten.adaptive_max_pool2d,
    aten._adaptive_avg_pool2d,
    aten._adaptive_avg_pool3d,
    aten.upsample_nearest2d,
    aten.upsample_bilinear2d,
}
# Pointwise-tagged ops that only fill or copy memory.
_NOT_ARITHMETIC = {aten.fill_, aten.zero_, aten.copy_, aten.clone, aten.lift_fresh}


def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    """FLOPs from the shapes of q (B, heads, L, E), k (B, heads, S, E), v (B, heads, S, Ev):
    scores q k^T are (L, S), each from E products; the output scores v is (L, Ev)."""
    *batch, length, embed = query
    source, value_embed = key[-2], value[-1]
    return 2 * math.prod(batch) * length * source * (embed + value_embed)


_EXTRA_MACS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
# Fused attention kernels (query, key first, shaped (B, heads, L, E)) hide their softmax; the
# element-wise count charges it as one op per score, as the unfused math path would be.
_FUSED_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
}


def _shape(x):
    return x.shape if isinstance(x, torch.Tensor) else x


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def is_attention_block(module: nn.Module) -> bool:
    """True if ``module``'s class is one registered in ``modules.registry``."""
    name = getattr(type(module), "registry_name", None)
    return name in available() and block_class(name) is type(module)


class _CostMode(TorchDispatchMode):
    """Counts FLOPs of matrix ops and element-wise ops under the current (stage, attention)."""

    def __init__(self):
        super().__init__()
        self.stage = "stem"
        self.in_attention = 0
        self.flops = defaultdict(int)  # (stage, in_attention) -> matmul FLOPs
        self.elementwise = defaultdict(int)  # (stage, in_attention) -> element ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        out = func(*args, **kwargs)
        where = (self.stage, self.in_attention > 0)
        if packet in flop_registry:
            self.flops[where] += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet in _EXTRA_MACS:
            self.flops[where] += _EXTRA_MACS[packet](*[_shape(a) for a in args], **kwargs)
        if packet in _FUSED_ATTENTION:
            query, key = args[0].shape, args[1].shape
            self.elementwise[where] += math.prod(query[:-1]) * key[-2]
        elif packet not in _NOT_ARITHMETIC and (
            packet in _ELEMENTWISE_EXTRA
            or torch.Tag.pointwise in func.tags
            or torch.Tag.reduction in func.tags
        ):
            sizes = [t.numel() for t in _tensors((args, kwargs, out))]
            self.elementwise[where] += max(sizes, default=0)
        return out


def _stage_of_children(model: nn.Module) -> dict[str, str]:
    """Top-level child name -> stem / layerN / head, by registration order."""
    groups, seen_stage = {}, False
    for name, _ in model.named_children():
        if re.fullmatch(r"layer\d+", name):
            groups[name], seen_stage = name, True
        else:
            groups[name] = "head" if seen_stage else "stem"
    return groups


def _count_params(modules: list[nn.Module]) -> int:
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in seen.values())


def _attention_roots(model: nn.Module) -> list[nn.Module]:
    """Attention blocks not nested inside another attention block."""
    roots, inside = [], set()
    for module in model.modules():
        if id(module) in inside or not is_attention_block(module):
            continue
        roots.append(module)
        inside.update(id(m) for m in module.modules())
    return roots


def _install_hooks(model: nn.Module, mode: _CostMode) -> list:
    groups = _stage_of_children(model)
    handles = []
    state = {"seen_stage": False}

    def enter_child(name):
        def hook(module, args):
            mode.stage = groups[name]
            if groups[name].startswith("layer"):
                state["seen_stage"] = True

        return hook

    def leave_child(module, args, output):
        mode.stage = "head" if state["seen_stage"] else "stem"

    def enter_attention(module, args):
        mode.in_attention += 1

    def leave_attention(module, args, output):
        mode.in_attention -= 1

    for name, child in model.named_children():
        handles.append(child.register_forward_pre_hook(enter_child(name)))
        handles.append(child.register_forward_hook(leave_child))
    for module in model.modules():
        if is_attention_block(module):
            handles.append(module.register_forward_pre_hook(enter_attention))
            handles.append(module.register_forward_hook(leave_attention))
    return handles


def profile(
    model: nn.Module,
    input_size: tuple[int, ...] = (3, 224, 224),
    batch_size: int = 1,
    throughput: bool = False,
) -> dict:
    """Count the cost of one forward pass of ``model`` on a ``batch_size`` x ``input_size`` input.

    Returns a dict (all MAC figures per image, see the module docstring for the units):
    ``params`` (int), ``gmacs``, ``gmacs_elementwise``, ``input_size``, ``per_stage``
    ({stage: {"params", "gmacs", "gmacs_elementwise"}}), ``attention`` (the same three for
    injected attention blocks alone, plus ``blocks``: how many) and, if ``throughput``,
    ``throughput`` in images/s measured on the model's device.

    The model is put in eval mode for the count and its mode restored afterwards. A model
    on the meta device is counted without computing anything (fast, same numbers).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.randn(batch_size, *input_size, device=device)
    mode = _CostMode()
    handles = _install_hooks(model, mode)
    try:
        # exact widths: count the attention products the papers count, not a fused
        # kernel's zero-padded ones (modules.parts.softmax_attention)
        with torch.no_grad(), exact_attention_widths(), mode:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    def gmacs(counts, where=lambda key: True) -> float:
        return sum(v for k, v in counts.items() if where(k)) / 2 / 1e9 / batch_size

    def costs(where) -> dict:
        plain = gmacs(mode.flops, where)
        # Element ops count one MAC-equivalent each, hence the * 2 against the /2 in gmacs.
        extra = 2 * gmacs(mode.elementwise, where)
        return {"gmacs": plain, "gmacs_elementwise": plain + extra}

    groups = _stage_of_children(model)
    stage_names = [
        "stem",
        *sorted({g for g in groups.values() if g.startswith("layer")}, key=lambda s: int(s[5:])),
        "head",
    ]
    per_stage = {}
    for stage in stage_names:
        children = [c for n, c in model.named_children() if groups[n] == stage]
        per_stage[stage] = {
            "params": _count_params(children),
            **costs(lambda k, s=stage: k[0] == s),
        }

    roots = _attention_roots(model)
    result = {
        "params": _count_params([model]),
        **costs(lambda k: True),
        "input_size": list(input_size),
        "per_stage": per_stage,
        "attention": {
            "blocks": len(roots),
            "params": _count_params(roots),
            **costs(lambda k: k[1]),
        },
    }
    if throughput and device.type != "meta":
        result["throughput"] = measure_throughput(model, input_size, batch_size)
    return result


def measure_throughput(
    model: nn.Module, input_size=(3, 224, 224), batch_size: int = 32, steps: int = 5
) -> float:
    """Images per second of eval-mode forward passes on the model's device (one warm-up)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        with torch.no_grad():
            model(x)
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                model(x)
            sync()
    finally:
        model.train(was_training)
    return steps * batch_size / (time.perf_counter() - start)


# --- tables and the command line ------------------------------------------------------


def format_table(rows: list[dict], title: str | None = None) -> str:
    """An aligned plain-text table of ``rows`` (dicts sharing keys; the keys are the header).

    Floats print as they are given: format them before if a column needs fixed decimals.
    Columns whose cells all look numeric are right-aligned.
    """
    if not rows:
        return title or ""
    header = list(rows[0])
    cells = [[str(row.get(key, "")) for key in header] for row in rows]

    def numeric(text: str) -> bool:
        return text in ("", "-") or text.replace(".", "", 1).replace(",", "").lstrip("-").isdigit()

    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    right = [all(numeric(c[i]) for c in cells) for i in range(len(header))]

    def line(values):
        parts = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)]
    return "\n".join(out)


def build_model(
    backbone: str,
    attention: str = "none",
    block_args: dict | None = None,
    stride_in_1x1: bool = False,
    cifar_stem: bool = False,
    num_classes: int = 1000,
    position: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A named backbone with ``attention`` (a registry name or "none") in every stage.

    ``position`` defaults to ``default_position(attention)``. Build on ``device="meta"``
    to count without allocating weights.
    """
    with torch.device(device):
        model = build_backbone(
            backbone, num_classes=num_classes, cifar_stem=cifar_stem, stride_in_1x1=stride_in_1x1
        )
        if attention != "none":
            placement = {
                "block": attention,
                "position": position or default_position(attention),
                "args": dict(block_args or {}),
            }
            inject(model, [placement])
    return model


def default_position(attention: str) -> str:
    """``residual`` (SE/CBAM's place) where the block allows it, else ``stage_end`` (one
    block per stage, as for non-local), else the first position it allows."""
    allowed = block_positions(attention)
    for position in ("residual", "stage_end"):
        if position in allowed:
            return position
    return allowed[0]


def paper_costs(backbone: str, attention: str) -> dict | None:
    """The published params/GMACs of an ImageNet model at 224, from CBAM Table 4 or else
    SENet Table 2, with the source; None if neither paper lists it."""
    for paper in ("cbam", "senet"):
        data = load_reference(paper)
        for row in data["tables"]["imagenet"]["rows"].values():
            if row.get("backbone") == backbone and row.get("attention") == attention:
                return {
                    "params_m": row.get("params_m"),
                    "gmacs": row.get("gmacs"),
                    "source": f"{data['paper']} {data['tables']['imagenet']['source']}",
                }
    return None


def comparison_row(backbone: str, attention: str, costs: dict) -> dict:
    """One line of the paper comparison: measured costs beside the published ones.

    ``match`` is "ok" when both measured numbers round to the paper's at the precision it
    printed, otherwise it names the ones that do not.
    """

    paper = paper_costs(backbone, attention) or {}
    params_m = costs["params"] / 1e6
    published_params, published_gmacs = paper.get("params_m"), paper.get("gmacs")
    differ = [
        name
        for name, measured, published in (
            ("params", params_m, published_params),
            ("GMACs", costs["gmacs"], published_gmacs),
        )
        if published is not None and not agrees(measured, published)
    ]
    return {
        "model": backbone,
        "attention": attention,
        "params M": f"{params_m:.3f}",
        "paper M": "-" if published_params is None else str(published_params),
        "GMACs": f"{costs['gmacs']:.4f}",
        "paper GMACs": "-" if published_gmacs is None else str(published_gmacs),
        "match": "-" if not paper else (" ".join(differ) + " DIFF" if differ else "ok"),
        "GMACs+elem": f"{costs['gmacs_elementwise']:.4f}",
        "attn params M": f"{costs['attention']['params'] / 1e6:.3f}",
        "attn GMACs": f"{costs['attention']['gmacs']:.4f}",
    }


DEFAULT_COMPARISON = [(b, a) for b in ("resnet18", "resnet50") for a in ("none", "se", "cbam")]


def default_comparison(device: str = "meta") -> tuple[list[dict], list[dict]]:
    """CBAM Table 4's models at 224 with stride_in_1x1: (table rows, raw profiles)."""
    rows, raw = [], []
    for backbone, attention in DEFAULT_COMPARISON:
        model = build_model(backbone, attention, stride_in_1x1=True, device=device)
        costs = profile(model)
        rows.append(comparison_row(backbone, attention, costs))
        raw.append({"backbone": backbone, "attention": attention, **costs})
    return rows, raw


_UNITS_NOTE = (
    "GMACs: multiply-accumulates of conv/linear/matmul per image (FlopCounterMode / 2), the\n"
    "papers' 'GFLOPs'. GMACs+elem adds one MAC-equivalent per element of every other\n"
    "arithmetic op (activations, norms, gating, adds, pooling, softmax). match: measured\n"
    "values round to the paper's at the precision it printed."
)


def _stage_rows(costs: dict) -> list[dict]:
    parts = [
        *costs["per_stage"].items(),
        ("total", costs),
        ("of which attention", costs["attention"]),
    ]
    return [
        {
            "part": name,
            "params M": f"{part['params'] / 1e6:.4f}",
            "GMACs": f"{part['gmacs']:.4f}",
            "GMACs+elem": f"{part['gmacs_elementwise']:.4f}",
        }
        for name, part in parts
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description="Params and GMACs of a backbone with attention blocks. Without "
        "--backbone: CBAM Table 4's models (ResNet-18/50, baseline/SE/CBAM, 224, "
        "stride in 1x1) beside the papers' numbers.",
    )
    parser.add_argument("--backbone", help="backbone name, e.g. resnet50, resnet56_cifar")
    parser.add_argument("--attention", default="none", help="registry block name, or none")
    parser.add_argument(
        "--position",
        help="injector position (default: residual, else stage_end if the block "
        "does not allow residual)",
    )
    parser.add_argument(
        "--block-args", default="{}", help="block options as JSON, e.g. '{\"rd_ratio\": 0.125}'"
    )
    parser.add_argument(
        "--stride-in-1x1", action="store_true", help="ResNet-v1 bottlenecks (the papers')"
    )
    parser.add_argument("--input", type=int, default=None, help="input side (224; 32 for CIFAR)")
    parser.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem, no max-pool")
    parser.add_argument("--num-classes", type=int, default=None, help="1000 (10 for CIFAR nets)")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    if args.backbone is None:
        if args.attention != "none" or args.input or args.cifar_stem:
            return fail("--attention/--input/--cifar-stem need --backbone")
        rows, raw = default_comparison()
        if args.json:
            print(json.dumps(raw, indent=2))
        else:
            print(format_table(rows, "CBAM Table 4 models at 224x224, stride in 1x1 (ResNet-v1)"))
            print(f"\nPaper columns: {paper_costs('resnet50', 'cbam')['source']}.")
            print(_UNITS_NOTE)
        return 0

    try:
        block_args = json.loads(args.block_args)
    except json.JSONDecodeError as err:
        return fail(f"--block-args is not valid JSON ({err})")
    if not isinstance(block_args, dict):
        return fail("--block-args must be a JSON object")
    cifar = args.cifar_stem or args.backbone.endswith("_cifar")
    side = args.input or (32 if cifar else 224)
    if side < 1:
        return fail(f"--input must be a positive size, got {side}")
    num_classes = args.num_classes or (10 if cifar else 1000)
    try:
        model = build_model(
            args.backbone,
            args.attention,
            block_args,
            stride_in_1x1=args.stride_in_1x1,
            cifar_stem=args.cifar_stem,
            num_classes=num_classes,
            position=args.position,
            device="meta",
        )
    except ValueError as err:
        return fail(str(err).splitlines()[0])
    costs = profile(model, input_size=(3, side, side))
    where = ""
    if args.attention != "none":
        args.position = args.position or default_position(args.attention)
        where = f" ({args.position})"
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "block_args")}
        settings.update(block_args=block_args, input=side, num_classes=num_classes)
        print(json.dumps({"model": settings, **costs}, indent=2))
        return 0
    title = (
        f"{args.backbone} + {args.attention}{where} at {side}x{side}"
        f"{', stride in 1x1' if args.stride_in_1x1 else ''}{', CIFAR stem' if cifar else ''}"
    )
    print(format_table(_stage_rows(costs), title))
    if side == 224 and not cifar and paper_costs(args.backbone, args.attention):
        print()
        print(format_table([comparison_row(args.backbone, args.attention, costs)]))
        print(f"Paper columns: {paper_costs(args.backbone, args.attention)['source']}.")
        if not args.stride_in_1x1:
            print("The papers count ResNet-v1 bottlenecks: add --stride-in-1x1 to compare.")
    print(_UNITS_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
