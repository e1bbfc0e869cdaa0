"""One GPU, a few minutes: how fast the suite trains there, written down.

    python -m bench.gpu_check               # on a CUDA machine: results/bench/gpu-<device>.md
    python -m bench.gpu_check --dry-run     # the same code path on the CPU, tiny sizes, tmp dir

Three steps, each within its share of an 8-minute budget (``--budget-s``):

1. Data: the ``cifar_fast`` run's dataset is checked first, so a missing copy fails in one
   line before minutes of timing.
2. ``python -m bench.speed --device cuda --sections model`` (a subprocess, as a person
   would run it): training and inference img/s of our models beside timm's. Its full
   report is kept beside ours as ``gpu-<device>-speed.md``/``.csv``; the summary gives our
   side's training img/s and model FLOPs utilisation (MFU: ``bench.profile``'s MACs per
   image x 2 x 3 per trained image, against the chip's dense peak at TF32, since
   bench.speed trains in fp32 and cuDNN runs fp32 convolutions as TF32).
3. One ``cifar_fast`` run (``experiments/protocol/cifar_fast.yaml``: ResNet-18, CIFAR-10,
   bf16-mixed, data resident on the GPU), with ``trainer.max_time`` as the guard: top-1,
   wall time, training img/s and MFU against the bf16 dense peak; the protocol's target
   (94% in under 2 minutes) is stated as met or missed. Its run record is kept beside the
   report as ``gpu-<device>-cifar_fast.json``.
4. Optionally (``--compile BLOCKS``): bf16 training steps of ResNet-18 (CIFAR stem, batch
   512) compiled against eager, with the compile time, per block: the measurement
   ``bench.hardware.COMPILE_PAYS`` needs for its GPU rows.

``--dry-run``, or a machine without CUDA, runs every step on the CPU with tiny sizes
(``bench.speed --quick`` without ResNet-50, two batches of a ``cifar_fast`` run on a
data subset) and writes to a temporary folder: that is what the test runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.config import ConfigError, check, compose
from bench.data import build_datamodule, check_data
from bench.hardware import peak_flops, time_steps, training_flops
from bench.profile import profile
from bench.speed import _git_commit, device_description, device_slug, markdown_table

REPO = Path(__file__).resolve().parents[1]
TARGET_TOP1, TARGET_WALL_S = 94.0, 120.0  # the cifar_fast protocol's target
# The dry run's cifar_fast: two batches of a data subset on the CPU.
TINY_TRAIN = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "schedule.warmup_epochs=0.5",
    "protocol.batch_size=16",
    "data.subset={per_class: 4}",
    "data.val_subset={per_class: 2}",
]


def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


# The dry run's bench.speed: its --quick sizes without ResNet-50 (minutes on 2 shared
# cores even at 32 px), through the same main().
DRY_SPEED = """import dataclasses, sys
import bench.speed as speed
quick = speed.sizes_for("cpu", True)
cifar = tuple(b for b in quick.backbones if b.name == "resnet20_cifar")
speed.sizes_for = lambda device, quick_: dataclasses.replace(quick, backbones=cifar)
sys.exit(speed.main(sys.argv[1:]))
"""


def run_speed(out: Path, device: str, dry_run: bool, timeout_s: float) -> list[dict[str, str]]:
    """bench.speed's model section in a subprocess; its CSV rows (ours and timm's)."""
    options = ["--device", device, "--sections", "model", "--out", str(out), "--channels-last"]
    if dry_run:
        command = [sys.executable, "-c", DRY_SPEED, *options, "--quick"]
    else:
        command = [sys.executable, "-m", "bench.speed", *options, "--repeats", "3"]
    print("$", shlex.join(command), file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True, timeout=timeout_s)
    (path,) = out.glob("*.csv")
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("section") == "model"]


def speed_rows(rows: list[dict[str, str]], device: torch.device) -> list[dict[str, Any]]:
    """Our models' training throughput and MFU, one row per (backbone, block)."""
    peak = peak_flops(device, torch.float32)
    out = []
    for row in rows:
        side = int(row["input"].split("x")[0])
        images_s = float(row["train_ours_img_s"])
        out.append(
            {
                "backbone": row["backbone"],
                "block": row["block"],
                "input": row["input"],
                "batch": row["batch"],
                "train_img_s": f"{images_s:.0f}",
                "infer_img_s": f"{float(row['infer_ours_img_s']):.0f}",
                "mfu_pct": _fmt(_mfu(row["backbone"], row["block"], side, images_s, peak), 1),
            }
        )
    return out


def _mfu(backbone: str, block: str, side: int, images_s: float, peak: float | None):
    from bench.speed import Backbone, build_ours

    if peak is None:
        return None
    model = build_ours(
        Backbone(backbone, side, 1, 10 if "cifar" in backbone else 1000, None), block
    )
    gmacs = profile(model.to("meta"), input_size=(3, side, side))["gmacs"]
    return 100 * images_s * training_flops(gmacs, 1) / peak


def run_cifar_fast(out: Path, extra: list[str], dry_run: bool, guard_s: float) -> dict[str, Any]:
    """One cifar_fast run, recorded under ``out``; its record as a dict."""
    from bench.train import train

    minutes, seconds = divmod(int(guard_s), 60)
    overrides = [
        "protocol=cifar_fast",
        "logger=csv",
        "skip_done=false",
        "trainer.enable_progress_bar=false",
        f"trainer.max_time=00:00:{minutes:02d}:{seconds:02d}",
        f"output_dir={out / 'outputs'}",
        f"results_dir={out / 'runs'}",
        *(TINY_TRAIN if dry_run else []),
        *extra,
    ]
    print("$ python -m bench.train", shlex.join(overrides), file=sys.stderr, flush=True)
    record = train(compose(overrides)).model_dump()
    record["overrides"] = overrides
    return record


def cifar_fast_row(record: dict[str, Any], device: torch.device) -> dict[str, Any]:
    trainer = record["config"]["trainer"]
    batch = record["config"]["protocol"]["batch_size"]
    dtype = torch.bfloat16 if "bf16" in str(trainer["precision"]) else torch.float32
    peak = peak_flops(device, dtype)
    images_s = record.get("throughput")
    mfu = None
    if peak and images_s:
        mfu = 100 * images_s * training_flops(record["gmacs"], 1) / peak
    top1, wall = record.get("top1"), record.get("wall_time_s")
    met = top1 is not None and top1 >= TARGET_TOP1 and wall <= TARGET_WALL_S
    return {
        "status": record["status"],
        "top1": _fmt(top1, 2),
        "top5": _fmt(record.get("top5"), 2),
        "epochs": f"{record['epochs']}/{record['max_epochs']}",
        "wall_s": _fmt(wall, 0),
        "train_img_s": _fmt(images_s, 0),
        "mfu_pct": _fmt(mfu, 1),
        "precision": str(trainer["precision"]),
        "compile": str(trainer["compile"]),
        "batch": batch,
        "target": f"{TARGET_TOP1:.0f}% in {TARGET_WALL_S:.0f} s: " + ("met" if met else "missed"),
    }


def compile_rows(blocks: list[str], device: str, dry_run: bool) -> list[dict[str, Any]]:
    rows = []
    for block in blocks:
        batch, steps = (4, 1) if dry_run else (512, 10)
        backbone = "resnet20_cifar" if dry_run else "resnet18"
        got = time_steps(
            block, backbone=backbone, batch=batch, steps=steps, compile=True, device=device
        )
        saved = got["eager_bf16_s"] - got["compiled_bf16_s"]
        compile_s = got["compile_train_s"] + got["compile_eval_s"]
        rows.append(
            {
                "backbone": backbone,
                "block": block,
                "batch": batch,
                "eager_ms": _fmt(got["eager_bf16_s"], 1, 1e3),
                "compiled_ms": _fmt(got["compiled_bf16_s"], 1, 1e3),
                "speedup": f"{got['eager_bf16_s'] / got['compiled_bf16_s']:.2f}",
                "compile_s": _fmt(compile_s, 1),
                "break_even_steps": f"{compile_s / saved:.0f}" if saved > 0 else "never",
            }
        )
    return rows


SPEED_COLUMNS = {
    "backbone": "backbone",
    "block": "block",
    "input": "input",
    "batch": "batch",
    "train_img_s": "train img/s",
    "mfu_pct": "MFU % (TF32 peak)",
    "infer_img_s": "infer img/s",
}
FAST_COLUMNS = {
    "status": "status",
    "top1": "top-1 %",
    "top5": "top-5 %",
    "epochs": "epochs",
    "wall_s": "wall time s",
    "train_img_s": "train img/s",
    "mfu_pct": "MFU % (bf16 peak)",
    "precision": "precision",
    "compile": "compiled",
    "batch": "batch",
    "target": "target",
}
COMPILE_COLUMNS = {
    "backbone": "backbone",
    "block": "block",
    "batch": "batch",
    "eager_ms": "eager ms/step",
    "compiled_ms": "compiled ms/step",
    "speedup": "speed-up",
    "compile_s": "compile s (train+eval)",
    "break_even_steps": "break-even steps",
}


DRY_RUN_NOTE = " DRY RUN: the CPU code path at tiny sizes, not a result."


def render(meta: dict[str, Any], speed, fast, compiled) -> str:
    lines = [
        f"# GPU check: {meta['description']}",
        "",
        f"Generated by `python -m bench.gpu_check {meta['argv']}` on {meta['date']} "
        f"(commit {meta['commit']}), torch {torch.__version__}; {meta['wall_s']:.0f} s "
        "in all." + (DRY_RUN_NOTE if meta["dry_run"] else ""),
        "",
        "## Model throughput (`bench.speed --sections model --channels-last`, fp32)",
        "",
        markdown_table(speed, SPEED_COLUMNS) if speed else "(not run)",
        "",
        f"Full report with timm's side and memory: `{meta['speed_report']}`. MFU counts "
        "`bench.profile`'s multiply-adds x 2 x 3 per trained image against the chip's dense "
        "TF32 peak (cuDNN runs fp32 convolutions as TF32).",
        "",
        "## `cifar_fast` (ResNet-18, CIFAR-10, bf16-mixed, data resident on the device)",
        "",
        markdown_table([fast], FAST_COLUMNS) if fast else "(not run)",
        "",
        "Train img/s: the run's training epochs after the first (which includes cuDNN "
        "autotuning and any compilation); wall time: the whole run, validation included, "
        "without the one-off decoding of the data cache (done before it).",
        "",
    ]
    if compiled:
        lines += [
            "## torch.compile (bf16 training steps, compiled vs eager)",
            "",
            markdown_table(compiled, COMPILE_COLUMNS),
            "",
            "Break-even: training steps after which the compiled model has saved its compile "
            "time; `bench.hardware.COMPILE_PAYS` takes a block where a run is longer.",
            "",
        ]
    if meta.get("errors"):
        lines += ["## Errors", "", *[f"- {e}" for e in meta["errors"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, tmp dir")
    parser.add_argument("--out", default=None, help="folder (default results/bench; dry: tmp)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="all steps together")
    parser.add_argument("--compile", default="", help="blocks to time compiled, e.g. none,se")
    parser.add_argument(
        "--train-args", default="", help="extra overrides for the cifar_fast run (quoted)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dry_run = args.dry_run or not torch.cuda.is_available()
    if dry_run and not args.dry_run:
        print("no CUDA device: a dry run on the CPU", file=sys.stderr)
    device = torch.device("cpu" if dry_run else "cuda")
    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu-check-") if dry_run else "results/bench"))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    extra = shlex.split(args.train_args)
    base = [*(TINY_TRAIN if dry_run else []), *extra]
    try:  # 1. the data, before minutes of timing; its cache decoded outside the run's time
        data = check(compose(["protocol=cifar_fast", *base]))["data"]
        check_data(data, download=False)
        build_datamodule(data, batch_size=1, num_workers=0).prepare_data()
    except (ConfigError, ValueError) as err:
        print(f"error: cifar_fast cannot run: {err}", file=sys.stderr)
        return 2

    errors: list[str] = []
    speed: list[dict[str, Any]] = []
    slug = device_slug(device)
    speed_report = out / f"{slug}-speed.md"
    try:  # 2. model throughput: at most 45% of the budget
        rows = run_speed(work / "speed", device.type, dry_run, 0.45 * args.budget_s)
        speed = speed_rows(rows, device)
        out.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".csv"):
            os.replace(work / "speed" / f"{slug}{suffix}", out / f"{slug}-speed{suffix}")
    except (subprocess.SubprocessError, OSError, ValueError) as err:
        errors.append(f"bench.speed: {type(err).__name__}: {err}")

    fast = None
    left = args.budget_s - (time.perf_counter() - started)
    try:  # 3. the cifar_fast run, its guard leaving a minute for the rest
        record = run_cifar_fast(work, extra, dry_run, max(60.0, left - 60.0))
        fast = cifar_fast_row(record, device)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{slug}-cifar_fast.json").write_text(json.dumps(record, indent=2) + "\n")
    except Exception as err:  # the report says what failed; the exit status too
        errors.append(f"cifar_fast: {type(err).__name__}: {err}")

    compiled = []
    blocks = [b for b in args.compile.split(",") if b]
    try:  # 4. optional
        compiled = compile_rows(blocks, device.type, dry_run)
    except Exception as err:
        errors.append(f"compile: {type(err).__name__}: {err}")

    meta = {
        "description": device_description(device, torch.get_num_threads()),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "wall_s": time.perf_counter() - started,
        "dry_run": dry_run,
        "speed_report": speed_report.name,
        "errors": errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug}.md"
    path.write_text(render(meta, speed, fast, compiled))
    shutil.rmtree(work, ignore_errors=True)  # its logs and weights; the record is kept
    print(f"wrote {path} in {meta['wall_s']:.0f} s", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
