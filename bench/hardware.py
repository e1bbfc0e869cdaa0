"""What the machine can do, detected rather than assumed: ``trainer.precision: auto`` and
``trainer.compile: auto`` are resolved here (``bench.config.resolve`` calls
``resolve_trainer``), so a run's id and record name the precision and compilation that
actually ran.

- ``precision: auto``: ``bf16-mixed`` on a CUDA device with bf16 and on a CPU with native
  bf16 instructions (x86 ``avx512_bf16`` or ``amx_bf16`` in the flags of
  ``/proc/cpuinfo``; without that file, torch's own cpuinfo check), else ``32``. Native
  matters: oneDNN also runs bf16 on plain AVX-512 by converting in software, which is
  slower than fp32. ``torch.backends.cpu.get_cpu_capability()`` says only ``AVX512``
  (the vector ISA torch's kernels were dispatched for), not whether bf16 is native.
- ``compile: auto``: ``torch.compile`` only where it was measured to pay, compile time
  included (``COMPILE_PAYS``, with the measurement in its comment).

``python -m bench.hardware`` prints what is detected; ``--time`` measures training steps
(fp32 against bf16-mixed, eager against compiled) on this machine, the numbers the
comments below come from.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")
# x86 flags of native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4 and later) and
# AMX-BF16 (Sapphire Rapids and later).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# Lightning's precision values (pytorch_lightning.Trainer(precision=...)) besides ``auto``.
PRECISIONS = (
    "32",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64",
    "64-true",
    "bf16",
    "16",
    "transformer-engine",
    "transformer-engine-float16",
)
MIXED_OR_LOW = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "bf16", "16")


class HardwareError(ValueError):
    """A trainer value that cannot be resolved; the message is one line."""


# --- detection -------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``, x86), or None
    where there is no such line (no file, another OS, another architecture)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (see the module docstring)."""
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        return bool(flags & NATIVE_BF16_FLAGS)
    if cpuinfo is not None:  # a given text without flags: nothing to fall back on
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's cpuinfo
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def uses_cuda(accelerator: Any) -> bool:
    """Whether Lightning's ``accelerator`` runs on CUDA on this machine."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def device_type(accelerator: Any) -> str:
    """``cuda`` or ``cpu`` for the accelerators we resolve; the name itself otherwise."""
    if uses_cuda(accelerator):
        return "cuda"
    return "cpu" if accelerator in ("auto", "cpu") else str(accelerator)


# bf16-mixed against fp32 on the project's 2-core AMD EPYC (avx512_bf16), measured with
# ``python -m bench.hardware --time --steps 9``: ResNet-20 training steps, batch 256,
# channels_last, interleaved medians, seconds per step fp32 -> bf16, twice (the first
# while other jobs loaded the two cores to ~6, the second to ~2-3):
#   none  3.46 -> 2.31 (1.50x) | 1.37 -> 0.93 (1.48x)
#   se    5.05 -> 3.42 (1.48x) | 1.67 -> 1.18 (1.42x)
#   eca   4.81 -> 2.68 (1.79x) | 1.65 -> 1.09 (1.52x)
#   cbam 13.01 -> 13.44 (0.97x) | 2.50 -> 2.05 (1.22x)
#   gc    4.53 -> 5.79 (0.78x) | 1.66 -> 7.80 (0.21x)
# So auto's bf16 pays for the plain network, SE and ECA, less for CBAM. GC's numbers
# disagree: bf16 slower in both of these runs, yet its eager bf16 step took 1.23 s in a
# later run (the compile rows below), faster than its fp32 1.66 s here. Re-measure GC on
# a quiet machine before trusting bf16 for it (its activations do stay channels_last).


def auto_precision(accelerator: Any, cpuinfo: str | None = None) -> str:
    """What ``precision: auto`` means for ``accelerator`` on this machine."""
    kind = device_type(accelerator)
    if kind == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    if kind == "cpu" and cpu_has_native_bf16(cpuinfo):
        return "bf16-mixed"
    return "32"


def resolve_precision(value: Any, accelerator: Any, cpuinfo: str | None = None) -> str | int:
    """A concrete Lightning precision for ``trainer.precision``; a HardwareError (one
    line) for a value Lightning would not take. Integers stay integers (``32``), so the
    run ids of configs that spelled them so do not change."""
    if value == "auto":
        return auto_precision(accelerator, cpuinfo)
    if isinstance(value, bool) or str(value) not in PRECISIONS:
        raise HardwareError(
            f"trainer.precision={value!r} is not one of auto, {', '.join(PRECISIONS)}"
        )
    return value


# --- torch.compile ---------------------------------------------------------------------

# Where torch.compile pays, compile time included: (device type, precision, backbone,
# blocks) -> whether ``compile: auto`` compiles. A key that is not here was not measured
# and stays eager (every GPU key, until ``bench.gpu_check --compile`` has run).
#
# CPU, measured on the project's 2-core AMD EPYC (avx512_bf16), torch 2.14.1, ResNet-20,
# channels_last, bf16-mixed, eager and compiled steps interleaved, medians. Seconds per
# step eager -> compiled; compile = the first compiled training step + the first compiled
# eval forward (inductor's C++ builds).
# Quiet machine (load < 1), batch 128 (the cpu protocol's), ``--steps 10``:
#   none   0.147 -> 0.151 (0.97x)  compile 29 +  8 s   never pays
#   se     0.170 -> 0.152 (1.12x)  compile 32 +  9 s   repaid after ~2,300 steps
#   eca    0.188 -> 0.163 (1.15x)  compile 22 +  5 s   repaid after ~1,100 steps
#   cbam   0.298 -> 0.188 (1.58x)  compile 51 + 15 s   repaid after ~600 steps
# Shared machine (load 5-6; times ~5-10x the quiet ones, ratios noisy), batch 256,
# ``--steps 5``: none 0.52x, se 1.92x, eca 1.23x, cbam 1.36x, gc 1.12x (compile 140 s,
# repaid after ~1,090 steps); a repeated compile is cheap (inductor's on-disk cache), the
# first one counts.
# Rule: compile where a cpu-protocol run (13 epochs x 390 steps = 5,070) saves at least
# twice the compile time: SE saves ~90 s for 41, ECA ~125 s for 27, CBAM ~560 s for 66.
# GC was only measured on the shared machine, so it stays eager.
COMPILE_PAYS: dict[tuple[str, str, str, str], bool] = {
    ("cpu", "bf16-mixed", "resnet20_cifar", "none"): False,
    ("cpu", "bf16-mixed", "resnet20_cifar", "se"): True,
    ("cpu", "bf16-mixed", "resnet20_cifar", "eca"): True,
    ("cpu", "bf16-mixed", "resnet20_cifar", "cbam"): True,
    ("cpu", "bf16-mixed", "resnet20_cifar", "gc"): False,
}


def placement_blocks(placements: Sequence[Mapping[str, Any]] | None) -> str:
    """The blocks of a run's placements as one key: ``none``, ``se``, ``se+cbam``."""
    names = sorted({str(p["block"]) for p in placements or ()})
    return "+".join(names) or "none"


def auto_compile(accelerator: Any, precision: Any, backbone: str, blocks: str) -> bool:
    """What ``compile: auto`` means: compile where ``COMPILE_PAYS`` says it pays."""
    mode = "bf16-mixed" if str(precision) in ("bf16-mixed", "bf16") else "32"
    return COMPILE_PAYS.get((device_type(accelerator), mode, backbone, blocks), False)


def resolve_trainer(config: dict[str, Any], cpuinfo: str | None = None) -> dict[str, Any]:
    """``config`` (a resolved run config, changed in place and returned) with
    ``trainer.precision`` and ``trainer.compile`` concrete."""
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        return config
    accelerator = trainer.get("accelerator", "auto")
    if "precision" in trainer:
        trainer["precision"] = resolve_precision(trainer["precision"], accelerator, cpuinfo)
    value = trainer.get("compile", False)
    if value == "auto":
        blocks = placement_blocks((config.get("attention") or {}).get("placements"))
        backbone = str((config.get("model") or {}).get("name"))
        trainer["compile"] = auto_compile(accelerator, trainer.get("precision"), backbone, blocks)
    elif not isinstance(value, bool):
        raise HardwareError(f"trainer.compile={value!r} is not one of true, false, auto")
    return config


# --- throughput and model FLOPs utilisation -------------------------------------------

# Dense peak FLOP/s of chips that Lightning's table (lightning_fabric's
# ``get_available_flops``) does not name: ``torch.cuda.get_device_name`` says
# "NVIDIA H200" for the SXM part, which Lightning does not parse. The H200 has the H100
# SXM's compute (its difference is memory), so these are H100 SXM's dense numbers.
PEAK_FLOPS: dict[str, dict[Any, float]] = {
    "h200": {
        torch.bfloat16: 989.4e12,
        torch.float16: 989.4e12,
        "tfloat32": 494.7e12,
        torch.float32: 66.9e12,
    },
}


def training_flops(gmacs_per_image: float | None, batch: int) -> int | None:
    """FLOPs of one training step of ``batch`` images: ``bench.profile``'s multiply-adds
    per image x 2 (a multiply-add is two FLOPs) x 3 (the backward pass costs about twice
    the forward: gradients of the inputs and of the weights)."""
    if gmacs_per_image is None:
        return None
    return int(gmacs_per_image * 1e9 * 2 * 3 * batch)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of ``device`` at ``dtype``: Lightning's table, then ours;
    None on a CPU or an unknown chip."""
    from lightning_fabric.utilities.throughput import get_available_flops

    if device.type != "cuda":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": we look further
        known = get_available_flops(device, dtype)
    if known:
        return float(known)
    name = torch.cuda.get_device_name(device).lower()
    tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
    for chip, table in PEAK_FLOPS.items():
        if chip in name:
            return table.get("tfloat32" if tf32 else dtype)
    return None


def throughput_monitor() -> Any:
    """Lightning's ``ThroughputMonitor`` (img/s per device; model FLOPs utilisation
    where the module has ``flops_per_batch`` and the chip's peak is known), with the
    peaks of ``PEAK_FLOPS`` for chips Lightning's table lacks."""
    from lightning_fabric.utilities.throughput import _plugin_to_compute_dtype
    from pytorch_lightning.callbacks import ThroughputMonitor

    class Monitor(ThroughputMonitor):
        def setup(self, trainer, pl_module, stage: str) -> None:
            super().setup(trainer, pl_module, stage)
            if self.available_flops is None:
                dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
                self.available_flops = peak_flops(trainer.strategy.root_device, dtype)
                for throughput in self._throughputs.values():
                    throughput.available_flops = self.available_flops

    # img/s over the last 20 steps: a smoothed rate that short runs still report.
    return Monitor(batch_size_fn=_batch_size, window_size=20)


def _batch_size(batch: Any) -> int:
    return len(batch[1])


# --- measuring -------------------------------------------------------------------------


def _model(block: str, backbone: str, channels_last: bool, device: str) -> torch.nn.Module:
    from bench.config import compose, resolve  # the real attention file of the block
    from bench.lit import build_model

    overrides = [f"attention={block}", f"model={backbone}", "data.root=unused"]
    if not backbone.endswith("_cifar"):
        overrides.append("model.cifar_stem=true")  # 32 px inputs, as the CIFAR protocols
    config = resolve(compose(overrides))
    model, _ = build_model(config["model"], config["attention"]["placements"], 10)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def time_steps(
    block: str,
    *,
    backbone: str = "resnet20_cifar",
    batch: int = 256,
    steps: int = 7,
    compile: bool = False,
    channels_last: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Seconds per training step (forward + loss under autocast as Lightning's
    ``bf16-mixed`` runs it, backward, SGD step) of ``block`` on ``backbone``, fp32 and
    bf16 interleaved (the order flips every step, so drift hits both); medians.
    With ``compile``, bf16 steps of the compiled model against eager ones, and the seconds
    the first compiled training step and the first compiled eval forward took. 32 px
    inputs, 10 classes; ``device`` ``cuda`` synchronises around every step."""
    torch.manual_seed(0)
    kind = torch.device(device).type
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def build() -> torch.nn.Module:
        return _model(block, backbone, channels_last, device)

    def stepper(model: torch.nn.Module, bf16: bool):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> float:
            sync()
            start = time.perf_counter()
            model.train()
            autocast = torch.autocast(kind, dtype=torch.bfloat16) if bf16 else None
            with autocast or contextlib.nullcontext():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - start

        return step

    result: dict[str, Any] = {"block": block, "backbone": backbone, "batch": batch}
    if compile:
        torch._dynamo.reset()  # models compiled before in this process count to its limits
        compiled = build()
        compiled.compile()
        sides = {"eager_bf16": stepper(build(), True), "compiled_bf16": stepper(compiled, True)}
        result["compile_train_s"] = sides["compiled_bf16"]()
        compiled.eval()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16):
            compiled(x)
        sync()
        result["compile_eval_s"] = time.perf_counter() - start
    else:
        sides = {"fp32": stepper(build(), False), "bf16": stepper(build(), True)}
    for fn in sides.values():  # warm-up (oneDNN primitive caches, allocator)
        fn()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(sides[name]())
    for name, values in samples.items():
        result[f"{name}_s"] = statistics.median(values)
    return result


def _describe() -> str:
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"cpu capability (torch): {torch.backends.cpu.get_cpu_capability()}",
        f"native bf16 on the CPU: {cpu_has_native_bf16()}",
        f"cuda: {torch.cuda.is_available()}",
        f"precision: auto -> {auto_precision('auto')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardware", description=__doc__)
    parser.add_argument("--time", action="store_true", help="time training steps per block")
    parser.add_argument("--compile", action="store_true", help="compiled against eager (bf16)")
    parser.add_argument("--blocks", default="none,se,eca,cbam,gc")
    parser.add_argument("--backbone", default="resnet20_cifar")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per side")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    print(_describe(), flush=True)
    if not args.time:
        return 0
    for block in args.blocks.split(","):
        row = time_steps(
            block,
            backbone=args.backbone,
            batch=args.batch,
            steps=args.steps,
            compile=args.compile,
            device=args.device,
        )
        if args.compile:
            ratio = row["eager_bf16_s"] / row["compiled_bf16_s"]
            text = (
                f"eager {row['eager_bf16_s']:.3f} s, compiled {row['compiled_bf16_s']:.3f} s "
                f"({ratio:.2f}x); compile: train {row['compile_train_s']:.1f} s, eval "
                f"{row['compile_eval_s']:.1f} s"
            )
        else:
            ratio = row["fp32_s"] / row["bf16_s"]
            text = f"fp32 {row['fp32_s']:.3f} s, bf16 {row['bf16_s']:.3f} s ({ratio:.2f}x)"
        print(f"{args.backbone} {block} batch {args.batch}: {text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
