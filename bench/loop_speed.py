"""What the training loop costs: a protocol's end-to-end training throughput against the
step of its model alone, same model, batch, precision and compilation.

``make bench`` runs this as the ``loop`` section of ``bench.speed``; for each block of
``cifar_blocks`` it measures

- the loop: a real ``bench.train`` run of the protocol (its data, augmentation, metrics,
  logging, scheduler, callbacks), cut to two short epochs; its record's throughput leaves
  the first epoch out, so compilation and cache warm-up are not counted;
- the model alone: the same ``LitClassifier`` (model, loss, optimizer, compilation),
  stepped under the run's autocast on one fixed batch already in memory;
- the protocol's full runs, where ``results/runs/cifar_blocks`` has records of its
  current version and precision: their recorded throughput (epochs 2 to the last).

The target (#12): the loop at least ``LOOP_TARGET`` x the model alone (``bench.speed``
states it as met or missed).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.config import compose, resolve
from bench.lit import LitClassifier
from bench.records import load_records
from bench.train import train

LOOP_TARGET = 0.85  # end-to-end img/s / model-alone img/s, at least
LOOP_ABLATION = "cifar_blocks"
LOOP_BLOCKS = ("none", "se", "eca", "cbam")


def loop_overrides(protocol: str, block: str, train_batches: int, workdir: Path) -> list[str]:
    """A run of ``protocol`` with ``block``, cut to two epochs of ``train_batches`` steps
    (the second is the one measured), writing nothing outside ``workdir``."""
    return [
        f"ablation={LOOP_ABLATION}",
        f"protocol={protocol}",
        f"attention={block}",
        "trainer.max_epochs=2",
        f"trainer.limit_train_batches={train_batches}",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=2",
        "trainer.enable_progress_bar=false",
        "trainer.keep_checkpoints=none",
        "skip_done=false",
        f"results_dir={workdir}/runs",
        f"output_dir={workdir}/outputs",
    ]


def model_step(config: dict[str, Any], num_classes: int, image_size: int) -> Callable[[], None]:
    """One training step of the run's own model, loss and optimizer on a fixed batch,
    under the autocast Lightning uses for the run's precision."""
    torch.manual_seed(0)
    module = LitClassifier(config, num_classes=num_classes)
    module.setup("fit")  # compiles, as in the run, when trainer.compile is on
    optimizer = module.build_optimizer()
    batch = config["protocol"]["batch_size"]
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, num_classes, (batch,))
    bf16 = str(config["trainer"]["precision"]).startswith("bf16")

    def step() -> None:
        module.train()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else None
        with autocast or contextlib.nullcontext():
            loss = module.criterion(module(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def median_seconds(step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds per call of ``step`` after ``warmup`` calls, and the interquartile
    range relative to it (%)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (0.0, 0.0, 0.0)
    median = statistics.median(times)
    return median, 100 * (q3 - q1) / median


def full_runs(results_dir: Path, config: dict[str, Any], block: str) -> list[float]:
    """The recorded throughput of the protocol's complete ``cifar_blocks`` runs of
    ``block`` at the same protocol version and precision as ``config``."""
    protocol = config["protocol"]
    rates = []
    for record in load_records(results_dir / LOOP_ABLATION):
        ran = record["config"]
        placements = record.get("attention") or []
        if (
            record.get("status") == "done"
            and record.get("epochs") == record.get("max_epochs")
            and record.get("throughput")
            and ran["protocol"].get("name") == protocol["name"]
            and ran["protocol"].get("version") == protocol.get("version")
            and str(ran["trainer"]["precision"]) == str(config["trainer"]["precision"])
            and ({p["block"] for p in placements} or {"none"}) == {block}
        ):
            rates.append(float(record["throughput"]))
    return rates


def loop_rows(
    protocol: str = "cpu",
    blocks: Sequence[str] = LOOP_BLOCKS,
    *,
    train_batches: int = 60,
    model_steps: int = 20,
    results_dir: Path = Path("results/runs"),
    extra_overrides: Sequence[str] = (),
    tick: Callable[[str, str], None] = lambda label, text: None,
) -> list[dict]:
    """One row per block: the loop's and the model's img/s and their ratio, and the full
    runs' recorded img/s where there are some."""
    rows = []
    for block in blocks:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose(
                [*loop_overrides(protocol, block, train_batches, Path(tmp)), *extra_overrides]
            )
            config = resolve(cfg)
            torch._dynamo.reset()  # each compiled model starts from a clean cache
            record = train(cfg)
        if record.get("status") != "done" or not record.get("throughput"):
            raise RuntimeError(f"the loop run of {block} did not finish: {record.get('status')}")
        torch._dynamo.reset()
        num_classes = config["data"]["num_classes"]
        size = record["profile"]["input_size"][-1]
        seconds, iqr = median_seconds(model_step(config, num_classes, size), 3, model_steps)
        batch = config["protocol"]["batch_size"]
        loop, alone = float(record["throughput"]), batch / seconds
        full = full_runs(results_dir, config, block)
        version = config["protocol"].get("version")
        row = {
            "section": "loop",
            "protocol": protocol + (f" v{version}" if version else ""),
            "block": block,
            "batch": batch,
            "precision": str(config["trainer"]["precision"]),
            "compiled": bool(config["trainer"]["compile"]),
            "loop_img_s": round(loop, 1),
            "model_img_s": round(alone, 1),
            "model_iqr_pct": round(iqr, 1),
            "loop_ratio": round(loop / alone, 3),
            "full_runs": len(full),
            "full_img_s": round(statistics.fmean(full), 1) if full else "",
            "full_ratio": round(statistics.fmean(full) / alone, 3) if full else "",
        }
        tick(
            f"loop {protocol} {block}",
            f"loop {loop:.0f} img/s, model alone {alone:.0f} img/s, ratio {loop / alone:.3f}",
        )
        rows.append(row)
    return rows
