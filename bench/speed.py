"""Speed report: the suite's attention blocks against timm's own, on the same machine.

    python -m bench.speed                    # CPU, about 8 minutes on 2 quiet cores
    python -m bench.speed --device cuda      # results/bench/gpu-<device name>.md
    python -m bench.speed --quick            # tiny sizes, seconds (what the test runs)

Writes ``<out>/<device>.md`` and ``<out>/<device>.csv`` (``cpu``, or ``gpu-<name slug>``)
with four measurements and the targets they are held to:

1. Model throughput. Training steps (forward, backward, SGD step) and inference
   (``inference_mode`` forward) in images/s, and the peak memory of one step, for
   ResNet-50 and the CIFAR ResNet-20 with SE / ECA / CBAM / GC / non-local / no block.
   Each of our injected models (``modules.build_backbone`` + ``modules.inject``) runs
   beside timm's own equivalent, built in the same run: timm's ``resnet50`` with
   ``block_args=dict(attn_layer=...)``, the attention module created by timm's ResNet
   itself. timm has no CIFAR ResNet, so for ResNet-20 the timm side is the same backbone
   (timm's ``ResNet`` class, as ``build_backbone`` makes it) with ``attn_layer`` passed to
   timm's blocks. Our block options are set to timm's defaults (``BLOCK_CONFIGS``) and
   the parameter counts are compared; the ``none`` pair times two identical models, which
   shows the noise level of the machine. Non-local has no timm equivalent: ours only.
2. Block micro-benchmarks. Forward+backward of one block at each ResNet-50 stage shape,
   ours against ``timm.layers`` (SEModule, EcaModule, CbamModule, GlobalContext) with
   the same settings.
3. SDPA against the explicit N x M attention matrix, for the non-local block and DANet's
   position attention at 256 x 56 x 56: our block (which runs
   ``scaled_dot_product_attention`` through ``modules.parts.softmax_attention``) against
   the same block with that one call swapped for the explicit ``softmax(q k^T) v``
   (``explicit_attention``; the two outputs are checked to agree first).
4. The training loop (CPU only): the ``cpu`` protocol's end-to-end training throughput
   against the step of its model alone, per block of ``cifar_blocks``
   (``bench.loop_speed``), and the protocol's full runs where records exist.

Timing: every pair is warmed up, then timed interleaved (ours, timm, timm, ours, ...: the
order flips each repeat, so drift hits both sides), each repeat runs enough iterations
to last ``min_repeat_s``; the report gives medians over the repeats and the interquartile
range relative to the median. CUDA is synchronised around every timed region.

Peak memory is the peak of tensor memory allocated during one step above what was
allocated before it (weights, optimizer state and inputs excluded; activations,
gradients and workspace included). CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
allocation and free events of torch's CPU allocator recorded by ``torch.profiler``
(``profile_memory=True``), summed in time order; tracemalloc cannot see these, and the
process RSS would include the allocator's cached and the interpreter's memory. Memory
allocated inside intra-op worker threads is not recorded, which on CPU leaves out a few
kernels' scratch buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import EcaModule, GlobalContext, SEModule
from timm.layers.cbam import CbamModule
from torch import nn

from bench.loop_speed import LOOP_BLOCKS, LOOP_TARGET, loop_rows
from bench.profile import default_position
from modules import build_attention, build_backbone, inject

# --- what is compared --------------------------------------------------------------------

BLOCKS = ("none", "se", "eca", "cbam", "gc", "non_local")
MICRO_BLOCKS = ("se", "eca", "cbam", "gc")
SDPA_BLOCKS = ("non_local", "danet_position")


@dataclass(frozen=True)
class BlockConfig:
    """Our block's options set to what timm's ResNet builds for ``attn_layer``."""

    ours: dict  # arguments of modules.build_attention
    timm_attn: object  # timm's attn_layer: a create_attn name or a module class
    timm_name: str  # how the report names timm's side
    note: str = ""


# timm's ResNet calls create_attn(attn_layer, channels) with no arguments, so its blocks
# run at their defaults: SEModule rd_ratio 1/16 rounded to a multiple of 8 (at least 8),
# EcaModule's adaptive kernel (at least 3), CbamModule rd_ratio 1/16 (divisor 1, MLP
# without bias), GlobalContext with scale fusion, rd_ratio 1/8, LayerNorm.
BLOCK_CONFIGS: dict[str, BlockConfig] = {
    "se": BlockConfig({"rd_ratio": 1 / 16, "rd_divisor": 8}, "se", "attn_layer='se'"),
    "eca": BlockConfig({}, "eca", "attn_layer='eca'"),
    "cbam": BlockConfig(
        {"rd_ratio": 1 / 16, "rd_divisor": 1},
        functools.partial(CbamModule, mlp_bias=True),
        "attn_layer=partial(CbamModule, mlp_bias=True)",
        "timm's 'cbam' has no MLP biases and ours always has them, so timm's CbamModule is "
        "built with mlp_bias=True (through the same attn_layer mechanism) to match",
    ),
    "gc": BlockConfig(
        {"fusion": "scale", "rd_ratio": 1 / 8, "layer_norm": True},
        "gc",
        "attn_layer='gc'",
        "timm's key conv has a bias that the softmax cancels; ours leaves it out "
        "(1 parameter per block)",
    ),
    "non_local": BlockConfig({}, None, "", "no timm equivalent in ResNet: ours only"),
    "none": BlockConfig({}, None, "no attention"),
}

TIMM_BLOCKS = {"se": SEModule, "eca": EcaModule, "cbam": CbamModule, "gc": GlobalContext}


def timm_block(name: str, channels: int) -> nn.Module:
    """timm's module for ``name`` with the settings its ResNet (and BLOCK_CONFIGS) uses."""
    attn = BLOCK_CONFIGS[name].timm_attn
    return TIMM_BLOCKS[name](channels) if isinstance(attn, str) else attn(channels)


def our_block(name: str, channels: int) -> nn.Module:
    return build_attention(name, channels, **BLOCK_CONFIGS[name].ours)


@dataclass(frozen=True)
class Backbone:
    name: str  # modules.build_backbone name
    side: int
    batch: int
    num_classes: int
    timm_model: str | None  # timm.create_model name, or None: the same backbone + attn_layer


@dataclass(frozen=True)
class Sizes:
    backbones: tuple[Backbone, ...]
    micro_batch: int
    micro_shapes: tuple[tuple[int, int, int], ...]  # (C, H, W) per ResNet-50 stage
    sdpa_batch: int
    sdpa_shape: tuple[int, int, int]
    repeats: int
    warmup: int
    min_repeat_s: float  # each repeat runs enough iterations to last this long


RESNET50_STAGES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))


# 2-core CPU: the whole report in well under 15 minutes on a quiet machine.
CPU_SIZES = Sizes(
    backbones=(
        Backbone("resnet50", 160, 8, 1000, "resnet50"),
        Backbone("resnet20_cifar", 32, 256, 10, None),
    ),
    micro_batch=8,
    micro_shapes=RESNET50_STAGES,
    sdpa_batch=8,
    sdpa_shape=(256, 56, 56),
    repeats=5,
    warmup=2,
    min_repeat_s=0.25,
)
GPU_SIZES = dataclasses.replace(
    CPU_SIZES,
    backbones=(Backbone("resnet50", 224, 128, 1000, "resnet50"), CPU_SIZES.backbones[1]),
    micro_batch=32,
    repeats=10,
    warmup=5,
    min_repeat_s=0.3,
)
# Seconds, for the test: every row of the report, at sizes that mean nothing.
QUICK_SIZES = dataclasses.replace(
    CPU_SIZES,
    backbones=(
        Backbone("resnet50", 32, 2, 1000, "resnet50"),
        Backbone("resnet20_cifar", 32, 4, 10, None),
    ),
    micro_batch=2,
    micro_shapes=((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)),
    sdpa_batch=2,
    sdpa_shape=(32, 14, 14),
    repeats=2,
    warmup=1,
    min_repeat_s=0.0,
)


def sizes_for(device: str, quick: bool) -> Sizes:
    if quick:
        return QUICK_SIZES
    return GPU_SIZES if device == "cuda" else CPU_SIZES


# --- building the models -------------------------------------------------------------------


def build_ours(backbone: Backbone, block: str) -> nn.Module:
    model = build_backbone(backbone.name, num_classes=backbone.num_classes)
    if block != "none":
        placement = {
            "block": block,
            "position": default_position(block),
            "args": dict(BLOCK_CONFIGS[block].ours),
        }
        inject(model, [placement])
    return model


def build_timm(backbone: Backbone, block: str) -> nn.Module | None:
    """timm's equivalent: its ResNet placing its own module through ``attn_layer``."""
    config = BLOCK_CONFIGS[block]
    if block != "none" and config.timm_attn is None:
        return None
    block_args = {} if block == "none" else {"block_args": {"attn_layer": config.timm_attn}}
    if backbone.timm_model is not None:
        return timm.create_model(
            backbone.timm_model, num_classes=backbone.num_classes, **block_args
        )
    return build_backbone(backbone.name, num_classes=backbone.num_classes, **block_args)


def timm_description(backbone: Backbone, block: str) -> str:
    config = BLOCK_CONFIGS[block]
    if block != "none" and config.timm_attn is None:
        return "-"
    model = (
        f"timm {backbone.timm_model}"
        if backbone.timm_model
        else f"timm ResNet ({backbone.name} layout)"
    )
    return model if block == "none" else f"{model}, {config.timm_name}"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- timing and memory ------------------------------------------------------------------------


@dataclass
class Stats:
    """Seconds per iteration of each repeat, and the peak memory of one call (bytes)."""

    seconds: list[float]
    iterations: int
    peak_bytes: float | None = None

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def iqr_pct(self) -> float:
        q1, q3 = np.percentile(self.seconds, [25, 75])
        return float(100 * (q3 - q1) / self.median)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop chatter on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> float | None:
    """Peak of torch's CPU allocations during ``fn()`` above the level at its start."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as p:
        fn()
    try:
        events = p.profiler.kineto_results.events()
    except AttributeError:  # the profiler's internals moved: say so rather than guess
        return None
    changes = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in changes:
        level += nbytes
        peak = max(peak, level)
    return float(peak)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        return cpu_peak_bytes(fn)
    return None


def measure(
    fns: dict[str, Callable[[], object]],
    sizes: Sizes,
    device: torch.device,
    memory: bool = True,
) -> dict[str, Stats]:
    """Warm up, take each side's peak memory, then time the sides interleaved."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    names = list(fns)
    single = dict.fromkeys(names, 0.0)
    for _ in range(max(1, sizes.warmup)):
        for name in names:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            single[name] = time.perf_counter() - start
    peaks = {name: peak_bytes(fns[name], device) if memory else None for name in names}
    slowest = max(single.values())
    iterations = max(1, math.ceil(sizes.min_repeat_s / slowest)) if slowest > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(sizes.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            for _ in range(iterations):
                fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) / iterations)
    return {name: Stats(samples[name], iterations, peaks[name]) for name in names}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        model.train()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        model.eval()
        with torch.inference_mode():
            model(x)

    return step


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return step


# --- the explicit N x M reference for the SDPA comparison ------------------------------------


def explicit_softmax_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` with the (B, N, M) matrix written out, at the blocks'
    own widths: what ``modules.parts.softmax_attention`` computes through SDPA."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


@contextlib.contextmanager
def explicit_attention(block: nn.Module):
    """Within this context ``block`` computes its attention with the explicit matrix: the
    ``softmax_attention`` its module calls is swapped for ``explicit_softmax_attention``,
    so everything else (embeddings, pooling, output) stays the block's own code."""
    module = sys.modules[type(block).__module__]
    original = getattr(module, "softmax_attention", None)
    if original is None:
        raise ValueError(
            f"{type(block).__name__} does not call modules.parts.softmax_attention, so it "
            "has no SDPA path to compare"
        )
    module.softmax_attention = explicit_softmax_attention
    try:
        yield
    finally:
        module.softmax_attention = original


class ExplicitPath(nn.Module):
    """The block run with its attention matrix written out (shares the block's weights)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with explicit_attention(self.block):
            return self.block(x)


def sdpa_block(name: str, channels: int) -> nn.Module:
    """The block with its zero-initialised output scale set to 1, so that the attention
    term reaches the output (the cost is the same either way)."""
    block = build_attention(name, channels)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
            if isinstance(getattr(module, "gamma", None), nn.Parameter):
                module.gamma.fill_(1.0)
    return block


def attention_positions(name: str, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(N, M): query and key positions of the block at (C, H, W)."""
    _, H, W = shape
    if name == "non_local":  # 2x2 max-pool on the keys, ceil mode
        return H * W, math.ceil(H / 2) * math.ceil(W / 2)
    return H * W, H * W


# --- the three measurements -----------------------------------------------------------------


@dataclass
class Run:
    device: torch.device
    sizes: Sizes
    channels_last: bool
    progress_total: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tick(self, label: str, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        width = len(str(self.progress_total))
        print(
            f"[{self.done:{width}d}/{self.progress_total}] {elapsed:6.0f}s  {label}: {text}",
            file=sys.stderr,
            flush=True,
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def tensor(self, *shape: int) -> torch.Tensor:
        x = torch.randn(*shape, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_rows(run: Run) -> list[dict]:
    rows = []
    for backbone in run.sizes.backbones:
        shape = (backbone.batch, 3, backbone.side, backbone.side)
        for block in BLOCKS:
            torch.manual_seed(0)
            models = {"ours": run.prepare(build_ours(backbone, block))}
            torch.manual_seed(0)
            theirs = build_timm(backbone, block)
            if theirs is not None:
                models["timm"] = run.prepare(theirs)
            params = {side: count_params(m) for side, m in models.items()}
            x = run.tensor(*shape)
            y = torch.randint(0, backbone.num_classes, (backbone.batch,), device=run.device)
            row = {
                "section": "model",
                "backbone": backbone.name,
                "input": f"{backbone.side}x{backbone.side}",
                "batch": backbone.batch,
                "block": block,
                "timm_equivalent": timm_description(backbone, block),
                "params_ours": params["ours"],
                "params_timm": params.get("timm", ""),
                "params_diff": params["ours"] - params["timm"] if "timm" in params else "",
            }
            for mode in ("train", "infer"):
                fns = {
                    side: train_step(m, x, y) if mode == "train" else infer_step(m, x)
                    for side, m in models.items()
                }
                stats = measure(fns, run.sizes, run.device)
                ours = backbone.batch / stats["ours"].median
                row[f"{mode}_ours_img_s"] = round(ours, 2)
                row[f"{mode}_ours_iqr_pct"] = round(stats["ours"].iqr_pct, 1)
                row[f"{mode}_ours_peak_mb"] = _round(stats["ours"].peak_mb)
                text = f"ours {ours:.1f} img/s (IQR {stats['ours'].iqr_pct:.1f}%)"
                if "timm" in stats:
                    theirs_rate = backbone.batch / stats["timm"].median
                    row[f"{mode}_timm_img_s"] = round(theirs_rate, 2)
                    row[f"{mode}_timm_iqr_pct"] = round(stats["timm"].iqr_pct, 1)
                    row[f"{mode}_timm_peak_mb"] = _round(stats["timm"].peak_mb)
                    row[f"{mode}_ratio"] = round(ours / theirs_rate, 3)
                    text += f", timm {theirs_rate:.1f} img/s, ratio {ours / theirs_rate:.3f}"
                else:
                    row[f"{mode}_timm_img_s"] = row[f"{mode}_timm_iqr_pct"] = ""
                    row[f"{mode}_timm_peak_mb"] = row[f"{mode}_ratio"] = ""
                run.tick(f"{backbone.name} {block} {mode}", text)
            rows.append(row)
            del models, fns
    return rows


def _round(value: float | None, digits: int = 1):
    return "" if value is None else round(value, digits)


def pair_fields(stats: dict[str, Stats], a: str, b: str, ms_digits: int) -> dict:
    """The CSV fields of two timed sides: ms each, the ratio a/b, IQRs and peak memory."""
    a_ms, b_ms = stats[a].median * 1e3, stats[b].median * 1e3
    return {
        f"{a}_ms": round(a_ms, ms_digits),
        f"{b}_ms": round(b_ms, ms_digits),
        "time_ratio": round(a_ms / b_ms, 3),
        f"{a}_iqr_pct": round(stats[a].iqr_pct, 1),
        f"{b}_iqr_pct": round(stats[b].iqr_pct, 1),
        f"{a}_peak_mb": _round(stats[a].peak_mb),
        f"{b}_peak_mb": _round(stats[b].peak_mb),
    }


def block_rows(run: Run) -> list[dict]:
    rows = []
    batch = run.sizes.micro_batch
    for block in MICRO_BLOCKS:
        for stage, (channels, height, width) in enumerate(run.sizes.micro_shapes, start=1):
            torch.manual_seed(0)
            modules = {
                "ours": run.prepare(our_block(block, channels)),
                "timm": run.prepare(timm_block(block, channels)),
            }
            x = run.tensor(batch, channels, height, width).requires_grad_()
            grad = run.tensor(batch, channels, height, width)
            fns = {side: forward_backward(m, x, grad) for side, m in modules.items()}
            stats = measure(fns, run.sizes, run.device)
            ours_ms, timm_ms = stats["ours"].median * 1e3, stats["timm"].median * 1e3
            rows.append(
                {
                    "section": "block",
                    "block": block,
                    "stage": f"layer{stage}",
                    "shape": f"{channels}x{height}x{width}",
                    "batch": batch,
                    "params_ours": count_params(modules["ours"]),
                    "params_timm": count_params(modules["timm"]),
                    **pair_fields(stats, "ours", "timm", ms_digits=3),
                }
            )
            run.tick(
                f"block {block} {channels}x{height}x{width}",
                f"ours {ours_ms:.2f} ms, timm {timm_ms:.2f} ms, ratio {ours_ms / timm_ms:.3f}",
            )
    return rows


def check_explicit(name: str, block: nn.Module, shape: tuple[int, int, int], device) -> float:
    """Largest difference of the two paths' attention terms (output minus input), relative
    to the largest term, on a small input."""
    channels, height, width = shape
    side = (min(height, 14), min(width, 14))
    x = torch.randn(1, channels, *side, device=device)
    was_training = block.training
    block.eval()
    with torch.no_grad():
        ours, reference = block(x), ExplicitPath(block)(x)
    block.train(was_training)
    difference = float((ours - reference).abs().max() / (ours - x).abs().max())
    if difference > 1e-3:
        raise RuntimeError(f"{name}: the explicit reference differs from the block ({difference})")
    return difference


def memory_limit(device: torch.device) -> float:
    """Bytes of memory the device has: GPU memory, or the machine's RAM."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with contextlib.suppress(OSError, ValueError):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return float("nan")


def fit_side(name: str, shape, batch: int, sdpa_peak: float, explicit_peak: float, limit: float):
    """Extrapolate both peaks from the measured side to the smallest side at which the
    explicit path would need more than ``limit``: SDPA's peak grows with H*W, the explicit
    path's excess over SDPA with N*M (as many N x M matrices as were measured)."""
    channels, height, width = shape
    n, m = attention_positions(name, shape)
    matrices = max(1.0, (explicit_peak - sdpa_peak) / (batch * n * m * 4))
    side = height
    while side < 64 * height:
        side += 1
        scale = side * side / (height * width)
        n_s, m_s = attention_positions(name, (channels, side, side))
        sdpa_s = sdpa_peak * scale
        explicit_s = sdpa_s + matrices * batch * n_s * m_s * 4
        if explicit_s > limit:
            return side, sdpa_s, explicit_s, matrices
    return None, None, None, matrices


def try_at_side(run: Run, name: str, channels: int, side: int) -> dict[str, str]:
    """CUDA only: run both paths at ``side`` for real; the explicit one should run out of
    memory and the SDPA one fit."""
    outcome = {}
    block = run.prepare(sdpa_block(name, channels))
    for path, module in (("sdpa", block), ("explicit", ExplicitPath(block))):
        try:
            x = run.tensor(run.sizes.sdpa_batch, channels, side, side).requires_grad_()
            torch.cuda.reset_peak_memory_stats(run.device)
            module(x).sum().backward()
            torch.cuda.synchronize(run.device)
            peak = torch.cuda.max_memory_allocated(run.device) / 2**30
            outcome[path] = f"ran, peak {peak:.1f} GiB"
        except torch.OutOfMemoryError:
            outcome[path] = "out of memory"
        x = None
        block.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return outcome


def sdpa_rows(run: Run) -> list[dict]:
    rows = []
    batch, shape = run.sizes.sdpa_batch, run.sizes.sdpa_shape
    channels, height, width = shape
    limit = memory_limit(run.device)
    for name in SDPA_BLOCKS:
        torch.manual_seed(0)
        block = run.prepare(sdpa_block(name, channels))
        difference = check_explicit(name, block, shape, run.device)
        x = run.tensor(batch, channels, height, width).requires_grad_()
        grad = run.tensor(batch, channels, height, width)
        fns = {
            "sdpa": forward_backward(block, x, grad),
            "explicit": forward_backward(ExplicitPath(block), x, grad),
        }
        stats = measure(fns, run.sizes, run.device)
        n, m = attention_positions(name, shape)
        sdpa_ms, explicit_ms = stats["sdpa"].median * 1e3, stats["explicit"].median * 1e3
        row = {
            "section": "sdpa",
            "block": name,
            "shape": f"{channels}x{height}x{width}",
            "batch": batch,
            "positions_n_m": f"{n}x{m}",
            **pair_fields(stats, "sdpa", "explicit", ms_digits=2),
            "matrix_mb": round(batch * n * m * 4 / 2**20, 1),
            "max_rel_diff": f"{difference:.1e}",
            "memory_limit_gb": round(limit / 2**30, 1),
        }
        if stats["sdpa"].peak_bytes is not None and stats["explicit"].peak_bytes is not None:
            side, sdpa_s, explicit_s, matrices = fit_side(
                name, shape, batch, stats["sdpa"].peak_bytes, stats["explicit"].peak_bytes, limit
            )
            row["explicit_matrices"] = round(matrices, 1)
            row["fit_side"] = side or ""
            row["fit_sdpa_gb"] = "" if sdpa_s is None else round(sdpa_s / 2**30, 2)
            row["fit_explicit_gb"] = "" if explicit_s is None else round(explicit_s / 2**30, 1)
            if run.device.type == "cuda" and side is not None:
                torch.cuda.empty_cache()
                tried = try_at_side(run, name, channels, side)
                row["fit_check"] = "; ".join(f"{k}: {v}" for k, v in tried.items())
                row["fit_shown"] = tried["sdpa"].startswith("ran") and tried["explicit"] == (
                    "out of memory"
                )
        rows.append(row)
        run.tick(
            f"sdpa {name} {channels}x{height}x{width}",
            f"sdpa {sdpa_ms:.1f} ms {_fmt(stats['sdpa'].peak_mb)} MB, explicit "
            f"{explicit_ms:.1f} ms {_fmt(stats['explicit'].peak_mb)} MB",
        )
        del block, fns
    return rows


# --- targets --------------------------------------------------------------------------------

MODEL_TARGET = 0.98  # our throughput / timm's, at least
BLOCK_TARGET = 1.05  # our forward+backward time / timm's, at most


def _verdict(met: bool, gap_pct: float, noise_pct: float) -> str:
    if met:
        return "met"
    return "missed (within noise)" if gap_pct <= noise_pct else "missed"


def target_rows(
    models: list[dict], blocks: list[dict], sdpa: list[dict], loops: Sequence[dict] = ()
) -> list[dict]:
    rows = []
    alone = {}  # block -> its forward+backward time ratios by stage, from section 2
    for row in blocks:
        alone.setdefault(row["block"], []).append(f"{row['time_ratio']}")
    identical = {
        (row["backbone"], mode): row[f"{mode}_ratio"]
        for row in models
        if row["block"] == "none"
        for mode in ("train", "infer")
    }
    for row in models:
        for mode in ("train", "infer"):
            ratio = row.get(f"{mode}_ratio")
            if ratio in ("", None) or row["block"] == "none":
                continue
            noise = row[f"{mode}_ours_iqr_pct"] + row[f"{mode}_timm_iqr_pct"]
            gap = 100 * (MODEL_TARGET - ratio) / MODEL_TARGET
            notes = [f"identical models: {identical.get((row['backbone'], mode), '-')}"]
            if row["block"] in alone:
                notes.append(f"block alone, time by stage: {' '.join(alone[row['block']])}")
            rows.append(
                {
                    "section": "target",
                    "target": f"model throughput >= {MODEL_TARGET}x timm",
                    "case": f"{row['backbone']} {row['block']} {mode}",
                    "value": ratio,
                    "threshold": MODEL_TARGET,
                    "margin_pct": round(-gap, 1),
                    "noise_pct": round(noise, 1),
                    "verdict": _verdict(ratio >= MODEL_TARGET, gap, noise),
                    "note": "; ".join(notes),
                }
            )
    for row in blocks:
        ratio = row["time_ratio"]
        noise = row["ours_iqr_pct"] + row["timm_iqr_pct"]
        gap = 100 * (ratio - BLOCK_TARGET) / BLOCK_TARGET
        rows.append(
            {
                "section": "target",
                "target": f"block forward+backward <= {BLOCK_TARGET}x timm's time",
                "case": f"{row['block']} {row['shape']}",
                "value": ratio,
                "threshold": BLOCK_TARGET,
                "margin_pct": round(-gap, 1),
                "noise_pct": round(noise, 1),
                "verdict": _verdict(ratio <= BLOCK_TARGET, gap, noise),
            }
        )
    for row in sdpa:
        if row.get("sdpa_peak_mb") in ("", None):
            verdict = "not measured (no memory figures on this device)"
        elif not row.get("fit_side"):
            verdict = "not reached (the explicit path fits up to 64x the measured side)"
        elif "fit_shown" in row:  # tried for real (CUDA)
            verdict = "met" if row["fit_shown"] else "missed"
            verdict += f" (tried at that side: {row['fit_check']})"
        else:
            fits = row["fit_sdpa_gb"] < row["memory_limit_gb"]
            verdict = ("met" if fits else "missed") + " (extrapolated)"
        rows.append(
            {
                "section": "target",
                "target": "SDPA fits where the explicit matrix would not",
                "case": f"{row['block']} at side {row.get('fit_side') or '?'}",
                "value": row.get("fit_sdpa_gb", ""),
                "threshold": row["memory_limit_gb"],
                "margin_pct": "",
                "noise_pct": "",
                "verdict": verdict,
                "note": (
                    f"GiB at batch {row['batch']}: SDPA {row.get('fit_sdpa_gb', '-')}, explicit "
                    f"{row.get('fit_explicit_gb', '-')} (extrapolated); measured at "
                    f"{row['shape']}: SDPA {row['sdpa_peak_mb']} MB, explicit "
                    f"{row['explicit_peak_mb']} MB"
                ),
            }
        )
    for row in loops:
        ratio = row["loop_ratio"]
        gap = 100 * (LOOP_TARGET - ratio) / LOOP_TARGET
        compiled = ", compiled" if row["compiled"] else ""
        rows.append(
            {
                "section": "target",
                "target": f"training loop >= {LOOP_TARGET}x the model-alone step",
                "case": f"{row['protocol']} {row['block']} ({row['precision']}{compiled})",
                "value": ratio,
                "threshold": LOOP_TARGET,
                "margin_pct": round(-gap, 1),
                "noise_pct": row["model_iqr_pct"],
                "verdict": _verdict(ratio >= LOOP_TARGET, gap, row["model_iqr_pct"]),
                "note": (
                    f"full runs: {row['full_img_s']} img/s, {row['full_ratio']}x "
                    f"(n={row['full_runs']})"
                    if row["full_runs"]
                    else "no full runs of this protocol version recorded"
                ),
            }
        )
    return rows


# --- the report ------------------------------------------------------------------------------


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def device_description(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical CPUs, {threads} torch threads"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    header = "| " + " | ".join(columns.values()) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [str(row.get(key, "")) if row.get(key, "") != "" else "-" for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MODEL_COLUMNS = {
    "backbone": "backbone",
    "input": "input",
    "batch": "batch",
    "block": "block",
    "train_ours_img_s": "train ours img/s",
    "train_timm_img_s": "train timm img/s",
    "train_ratio": "train ours/timm",
    "train_ours_iqr_pct": "IQR ours %",
    "train_timm_iqr_pct": "IQR timm %",
    "infer_ours_img_s": "infer ours img/s",
    "infer_timm_img_s": "infer timm img/s",
    "infer_ratio": "infer ours/timm",
    "infer_ours_iqr_pct": "IQR ours %",
    "infer_timm_iqr_pct": "IQR timm %",
}
MEMORY_COLUMNS = {
    "backbone": "backbone",
    "block": "block",
    "train_ours_peak_mb": "train peak MB ours",
    "train_timm_peak_mb": "train peak MB timm",
    "infer_ours_peak_mb": "infer peak MB ours",
    "infer_timm_peak_mb": "infer peak MB timm",
    "params_ours": "params ours",
    "params_timm": "params timm",
    "params_diff": "params ours-timm",
    "timm_equivalent": "timm side",
}
BLOCK_COLUMNS = {
    "block": "block",
    "stage": "stage",
    "shape": "C x H x W",
    "batch": "batch",
    "ours_ms": "ours ms",
    "timm_ms": "timm ms",
    "time_ratio": "time ours/timm",
    "ours_iqr_pct": "IQR ours %",
    "timm_iqr_pct": "IQR timm %",
    "ours_peak_mb": "peak MB ours",
    "timm_peak_mb": "peak MB timm",
    "params_ours": "params ours",
    "params_timm": "params timm",
}
SDPA_COLUMNS = {
    "block": "block",
    "shape": "C x H x W",
    "batch": "batch",
    "positions_n_m": "N x M",
    "sdpa_ms": "SDPA ms",
    "explicit_ms": "explicit ms",
    "time_ratio": "time SDPA/explicit",
    "sdpa_iqr_pct": "IQR SDPA %",
    "explicit_iqr_pct": "IQR explicit %",
    "sdpa_peak_mb": "peak MB SDPA",
    "explicit_peak_mb": "peak MB explicit",
    "matrix_mb": "one N x M matrix MB",
    "max_rel_diff": "max rel. diff",
}
FIT_COLUMNS = {
    "block": "block",
    "explicit_matrices": "N x M matrices held (measured)",
    "fit_side": "side where explicit exceeds memory",
    "fit_explicit_gb": "explicit GiB there",
    "fit_sdpa_gb": "SDPA GiB there",
    "memory_limit_gb": "memory GiB",
    "fit_check": "tried for real",
}
LOOP_COLUMNS = {
    "protocol": "protocol",
    "block": "block",
    "batch": "batch",
    "precision": "precision",
    "compiled": "compiled",
    "loop_img_s": "loop img/s",
    "model_img_s": "model alone img/s",
    "model_iqr_pct": "IQR %",
    "loop_ratio": "loop / model",
    "full_img_s": "full runs img/s",
    "full_runs": "n",
    "full_ratio": "full / model",
}

TARGET_COLUMNS = {
    "case": "case",
    "value": "measured",
    "threshold": "target",
    "margin_pct": "margin %",
    "noise_pct": "IQR ours+timm %",
    "verdict": "verdict",
    "note": "context",
}


def _noise_line(models: list[dict]) -> str:
    """The ratios of the ``none`` pairs: two identical models, so only noise moves them."""
    cases = [
        f"{row['backbone']} {mode} {row[f'{mode}_ratio']}"
        for row in models
        if row["block"] == "none"
        for mode in ("train", "infer")
        if row.get(f"{mode}_ratio") not in ("", None)
    ]
    if not cases:
        return ""
    return (
        "- Noise reference: the `none` pairs time two identical models, and came out at "
        + ", ".join(cases)
        + " (ours/timm throughput; 1 is no difference)."
    )


def _target_summary(targets: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(row["target"] for row in targets):
        group = [row for row in targets if row["target"] == name]
        met = sum(row["verdict"].startswith("met") for row in group)
        noise = sum(row["verdict"] == "missed (within noise)" for row in group)
        lines.append(
            f"- **{name}**: met in {met} of {len(group)} cases"
            + (f"; {noise} of the misses are within the repeats' spread" if noise else "")
            + "."
        )
    return lines


def render_markdown(meta: dict, models: list[dict], blocks, sdpa, loops, targets) -> str:
    out = [
        f"# Speed report: {meta['device']}",
        "",
        f"Generated by `python -m bench.speed {meta['argv']}` on {meta['date']} "
        f"(commit {meta['commit']}), torch {torch.__version__}, timm {timm.__version__}.",
        "",
        f"- Device: {meta['description']}",
        f"- Total wall time: {meta['wall_s']:.0f} s ({meta['wall_s'] / 60:.1f} min)",
        f"- Load average (1 min) at the start {meta['load_start']:.2f}, at the end "
        f"{meta['load_end']:.2f}: on a quiet machine the first is near 0 and the second near "
        "the number of threads; more means other processes shared the CPUs.",
        f"- Timing: {meta['warmup']} warm-up call(s) per side, then {meta['repeats']} repeats "
        "interleaved (ours and timm alternate, the order flipping each repeat), each repeat "
        f"at least {meta['min_repeat_s']} s; medians, and the interquartile range of the "
        "repeats relative to the median (IQR %).",
        f"- Memory format: {'channels_last' if meta['channels_last'] else 'contiguous (NCHW)'}, "
        "float32.",
        "",
        "## Targets",
        "",
        *_target_summary(targets),
        _noise_line(models),
        "",
        "Margin: how far the measured value is on the good side of the target (negative: "
        "missed by that much). A miss counts as within noise when it is smaller than the "
        "two sides' IQRs together. The `none` rows below time two identical models and show "
        "what ratio the noise alone produces.",
        "",
    ]
    for name in dict.fromkeys(row["target"] for row in targets):
        out += [f"### {name}", ""]
        out += [markdown_table([r for r in targets if r["target"] == name], TARGET_COLUMNS), ""]
    notes = [
        f"- `{block}`: {config.note}." for block, config in BLOCK_CONFIGS.items() if config.note
    ]
    out += [
        "## 1. Model throughput",
        "",
        "Training: forward, cross-entropy, backward, SGD step (momentum 0.9), gradients set "
        "to None. Inference: forward under `torch.inference_mode()`, eval mode. Throughput "
        "ratio ours/timm: above 1 means ours is faster.",
        "",
        markdown_table(models, MODEL_COLUMNS),
        "",
        "Peak memory of one step and parameter counts (ours: `build_backbone` + `inject`, "
        "block options set to timm's defaults; the difference must be 0 except where noted):",
        "",
        markdown_table(models, MEMORY_COLUMNS),
        "",
        "timm has no CIFAR ResNet: for resnet20_cifar the timm side is the same backbone with "
        "`attn_layer` passed to timm's blocks, i.e. timm's module placed by timm's own "
        "mechanism. Block settings:",
        "",
        *notes,
        "",
        "## 2. Blocks, forward+backward",
        "",
        "One block on a (batch, C, H, W) input at each ResNet-50 stage shape, with the same "
        "settings as in section 1. Time ratio ours/timm: below 1 means ours is faster.",
        "",
        markdown_table(blocks, BLOCK_COLUMNS),
        "",
        "## 3. SDPA against the explicit N x M matrix",
        "",
        "Forward+backward of the block as the library runs it (`scaled_dot_product_attention` "
        "via `modules.parts.softmax_attention`, which zero-pads q/k/v to one width) against "
        "the same block with that call swapped for `softmax(q k^T * scale) v` with the matrix "
        "written out (`bench.speed.explicit_attention`; max rel. diff: the two attention "
        "terms compared on a small input). "
        "Non-local: embedded Gaussian, keys 2x2 max-pooled (M = N/4); DANet position "
        "attention: M = N.",
        "",
        markdown_table(sdpa, SDPA_COLUMNS),
        "",
        "Where the explicit path stops fitting, extrapolated from the measured peaks (SDPA's "
        "grows with H*W; the explicit path's excess over SDPA with N*M, counted as the number "
        "of N x M matrices it held at the measured size), at batch "
        f"{sdpa[0]['batch'] if sdpa else '-'}:",
        "",
        markdown_table(sdpa, FIT_COLUMNS),
        "",
        "## 4. The training loop against the model alone",
        "",
        "The loop: a real `bench.train` run of the protocol (data, augmentation, metrics, "
        "logging, LR schedule, callbacks), two epochs cut short, its second epoch timed "
        "(compilation left out). The model alone: the same model, loss, optimizer, precision "
        "and compilation stepped on one fixed batch in memory (median of the steps). Full "
        "runs: the throughput recorded by the protocol's complete `cifar_blocks` runs of this "
        "version and precision (epochs 2 to the last), where there are some. Sections 1-3 "
        "run in float32; this one in the protocol's precision.",
        "",
        markdown_table(loops, LOOP_COLUMNS) if loops else "(not run on this device)",
        "",
        "## Memory measure",
        "",
        "Peak memory is the peak of tensor memory allocated during one step above what was "
        "allocated before it: activations, gradients and workspace, not weights, optimizer "
        "state or inputs. "
        + (
            "CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`."
            if meta["device"].startswith("gpu")
            else "CPU: the allocation/free events of torch's CPU allocator recorded by "
            "`torch.profiler` (`profile_memory=True`), summed in time order (tracemalloc does "
            "not see torch's allocations; RSS would include allocator caches). Allocations "
            "made inside intra-op worker threads are not recorded."
        ),
        "",
    ]
    return "\n".join(out)


def write_report(out_dir: Path, slug: str, markdown: str, rows: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{slug}.md", out_dir / f"{slug}.csv"
    md_path.write_text(markdown)
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path


SECTIONS = ("model", "block", "sdpa", "loop")


def loop_section(run: Run, quick: bool) -> list[dict]:
    """Section 4 on the CPU: the cpu protocol (quick: smoke, the plain net only)."""
    if run.device.type != "cpu":
        print("loop section: CPU only (make gpu-check runs cifar_fast itself)", file=sys.stderr)
        return []
    if quick:
        return loop_rows("smoke", ("none",), train_batches=3, model_steps=3, tick=run.tick)
    return loop_rows("cpu", tick=run.tick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.speed",
        description="Throughput, block micro-benchmarks and SDPA memory of the suite's "
        "attention blocks against timm's, written to <out>/<device>.md and .csv.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (seconds)")
    parser.add_argument("--out", default="results/bench", help="output folder")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--channels-last", action="store_true", help="NHWC models and inputs")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        return fail(f"--sections takes a subset of {', '.join(SECTIONS)}, got {args.sections!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda, but torch sees no CUDA device")
    if args.repeats is not None and args.repeats < 1:
        return fail(f"--repeats must be at least 1, got {args.repeats}")
    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        return fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sizes = sizes_for(args.device, args.quick)
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)

    counts = {
        "model": len(sizes.backbones) * len(BLOCKS) * 2,
        "block": len(MICRO_BLOCKS) * len(sizes.micro_shapes),
        "sdpa": len(SDPA_BLOCKS),
        "loop": 1 if args.quick else len(LOOP_BLOCKS),
    }
    run = Run(device, sizes, args.channels_last, sum(counts[s] for s in sections))
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    models = model_rows(run) if "model" in sections else []
    blocks = block_rows(run) if "block" in sections else []
    sdpa = sdpa_rows(run) if "sdpa" in sections else []
    loops = loop_section(run, args.quick) if "loop" in sections else []
    targets = target_rows(models, blocks, sdpa, loops)
    meta = {
        "device": device_slug(device),
        "description": device_description(device, threads),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "wall_s": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "warmup": sizes.warmup,
        "repeats": sizes.repeats,
        "min_repeat_s": sizes.min_repeat_s,
        "channels_last": args.channels_last,
    }
    markdown = render_markdown(meta, models, blocks, sdpa, loops, targets)
    md_path, csv_path = write_report(
        Path(args.out), meta["device"], markdown, [*models, *blocks, *sdpa, *loops, *targets]
    )
    print(f"wrote {md_path} and {csv_path} in {meta['wall_s']:.0f} s", file=sys.stderr)
    print("\n".join(_target_summary(targets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
