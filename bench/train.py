"""Training entry point: ``python -m bench.train [overrides]`` (Hydra, experiments/train.yaml).

One call is one run (or, with ``-m``, one Hydra multirun of runs):

1. The config is composed, resolved and validated by ``bench.config`` (the one home of
   those rules, shared with ``bench.sweep``): attention placements against the backbone,
   the ablation's protocols, optimizer and schedule, trainer limits; then the global batch
   size against the world size and the dataset on disk. Any of these fails before work
   starts with one line (exit 2; ``verbose=true`` for the traceback).
3. The run id (``bench.records.run_id``) names the run's directory,
   ``<output_dir>/<ablation>/<run_id>/``; if a ``last.ckpt`` is there the run resumes from
   it, and if the run record says it is complete (``done``, every epoch trained) the run is
   skipped (``skip_done``); one cut short by ``trainer.max_time`` resumes.
4. Lightning trains with a CSV log, W&B (offline unless asked), ``ModelCheckpoint`` with
   ``last.ckpt`` after every epoch, a check that stops on a non-finite loss, and
   Lightning's ``ThroughputMonitor`` (img/s; model FLOPs utilisation on GPUs). A run that
   trained every epoch then keeps its final weights only (``<run dir>/final.pt``,
   ``trainer.keep_checkpoints``).
5. A run record (``bench.records.RunRecord``) is written at the end: ``done``, or
   ``failed: <reason>`` (the exception is re-raised, so the exit code says it too). Only
   results go to ``results_dir``: finished runs and diverged ones (a non-finite loss);
   a run stopped by the machine (interrupt, out of memory, a dead worker) keeps its
   record beside its checkpoints (``records.failure_path``).

``train(cfg)`` does all of this for a composed config, for tests and notebooks.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import timm
import torch
import torchmetrics
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from bench.config import OWN_TRAINER_KEYS, ConfigError, check, dashboard_keys
from bench.console import progress_bar, quiet_libraries
from bench.data import build_datamodule
from bench.hardware import throughput_monitor, training_flops
from bench.lit import LitClassifier
from bench.profile import profile
from bench.records import (
    RunRecord,
    failure_path,
    is_complete,
    read_record,
    record_path,
    run_id,
    write_record,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


# --- callbacks -------------------------------------------------------------------------


class EpochSeed(Callback):
    """Reseeds every RNG from (seed, epoch) before each training epoch, so an epoch's
    randomness (shuffle order, augmentation on the device, drop-path) does not depend on
    what ran before it, and a run resumed from ``last.ckpt`` repeats the uninterrupted run.

    The seed is set at the end of the previous epoch, and when a checkpoint is restored,
    because both come before Lightning creates the epoch's loader iterator (which draws
    from the global RNG). Loader workers keep their own RNG streams across epochs, so
    augmentation done in workers is not repeated exactly after a resume.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.next_epoch = 0

    def _reseed(self) -> None:
        epoch_seed = (self.seed * 100_003 + self.next_epoch) % 2**32
        pl.seed_everything(epoch_seed, workers=True, verbose=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.next_epoch = trainer.current_epoch + 1
        self._reseed()

    def state_dict(self) -> dict[str, int]:
        return {"next_epoch": self.next_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_epoch = state["next_epoch"]
        self._reseed()


class StopOnNonFiniteLoss(Callback):
    """Fails the run at the first NaN or infinite training loss."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {trainer.current_epoch}, "
                f"batch {batch_idx}"
            )


class RunStats(Callback):
    """Accuracies (last and best, in %), completed epochs, training throughput and wall
    time. Its state is saved in checkpoints, so a resumed run reports the whole run."""

    def __init__(self):
        self.top1 = self.top5 = self.best_top1 = self.best_top5 = None
        self.epochs = 0
        self.validated_after = -1  # completed epochs when the last validation ran
        self.elapsed_before = 0.0  # wall time of earlier attempts of this run
        self.started = time.perf_counter()
        self.epoch_costs: list[tuple[int, float]] = []  # (images, seconds) per train epoch
        self._val_seconds = 0.0

    def wall_time(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def throughput(self) -> float | None:
        """Training images/s over this attempt's epochs, the first left out when there are
        more (it includes compilation and cache warm-up)."""
        costs = self.epoch_costs[1:] if len(self.epoch_costs) > 1 else self.epoch_costs
        seconds = sum(s for _, s in costs)
        return sum(n for n, _ in costs) / seconds if seconds > 0 else None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._images, self._val_seconds = 0, 0.0
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._val_seconds += time.perf_counter() - self._val_start
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/acc" not in metrics:
            return
        self.top1 = 100 * float(metrics["val/acc"])
        self.top5 = 100 * float(metrics["val/acc5"])
        self.best_top1 = max(self.top1, self.best_top1 or 0.0)
        self.best_top5 = max(self.top5, self.best_top5 or 0.0)
        # trainer.validate() after fit sees the completed count; fit's own loop the index.
        after_fit = trainer.state.fn == "validate"
        self.validated_after = trainer.current_epoch + (0 if after_fit else 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._epoch_start - self._val_seconds
        self.epoch_costs.append((self._images * trainer.world_size, seconds))
        self.epochs = trainer.current_epoch + 1

    def state_dict(self) -> dict[str, Any]:
        keys = ("top1", "top5", "best_top1", "best_top5", "epochs", "validated_after")
        return {**{k: getattr(self, k) for k in keys}, "elapsed": self.wall_time()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("top1", "top5", "best_top1", "best_top5", "epochs", "validated_after"):
            setattr(self, key, state[key])
        self.elapsed_before = state["elapsed"]
        self.started = time.perf_counter()


# --- the run ---------------------------------------------------------------------------


def _uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _device(trainer: pl.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.processor() or platform.machine()}, "
        name += f"{torch.get_num_threads()} threads)"
    return f"{name} x{trainer.world_size}"


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "timm": timm.__version__,
        "lightning": pl.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def _failure(err: BaseException) -> str:
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "failed: interrupted"
    message = re.sub(r"\s+", " ", str(err)).strip()
    return f"failed: {type(err).__name__}: {message}"[:500]


def is_result(status: str) -> bool:
    """Whether a run's outcome says something about the experiment: finished, or diverged
    (a non-finite loss is the configuration's doing). Anything else is the machine's."""
    return status == "done" or status.startswith("failed: FloatingPointError")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_trainer(
    config: Mapping[str, Any],
    run_dir: Path,
    rid: str,
    callbacks: Sequence[Callback],
    resuming: bool = False,
    in_sweep: bool = False,
) -> pl.Trainer:
    """The Lightning Trainer of a run: its loggers and checkpoints live in ``run_dir``."""
    options = {k: v for k, v in config["trainer"].items() if k not in OWN_TRAINER_KEYS}
    callbacks = list(callbacks)
    if options.get("enable_progress_bar", True):
        callbacks.append(progress_bar(in_sweep))
    options.setdefault("enable_model_summary", bool(config.get("verbose")))
    if resuming:
        # Checked at the first attempt; and it would draw from the RNG EpochSeed just set.
        options["num_sanity_val_steps"] = 0
    deterministic = config["trainer"]["deterministic"]
    if deterministic == "auto":
        deterministic = not _uses_gpu(options["accelerator"])
    loggers: list = [CSVLogger(run_dir, name="csv")]
    logger_cfg = {k: v for k, v in config["logger"].items() if k != "name"}
    if logger_cfg.get("_target_"):  # logger/wandb.yaml; the run supplies who and where
        logger = instantiate(
            logger_cfg,
            name=config["run_name"],
            save_dir=str(run_dir),
            id=rid,
            group=config["ablation"],
            job_type="train",
        )
        # Lightning always passes W&B `anonymous=None`, which W&B warns about on every
        # first run of a process (the setting is deprecated and does nothing).
        init_args = getattr(logger, "_wandb_init", {})
        if init_args.get("anonymous", "unset") is None:
            del init_args["anonymous"]
        loggers.append(logger)
    # The newest epoch's checkpoint, and last.ckpt linking to it (what a restart resumes).
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        save_top_k=1,
        save_last="link",
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    return pl.Trainer(
        **options,
        deterministic=deterministic,
        logger=loggers,
        # RunStats first: the checkpoint saved at the end of an epoch must hold its update.
        callbacks=[*callbacks, checkpoint, LearningRateMonitor(logging_interval="step")],
        default_root_dir=run_dir,
    )


def keep_final_weights(run_dir: Path, model: torch.nn.Module, keep: str) -> None:
    """What a finished run (every epoch trained) keeps, by ``trainer.keep_checkpoints``:
    ``final``: its weights alone in ``<run dir>/final.pt`` (a plain ``state_dict`` of the
    backbone with its attention, which ``bench.analysis.load_weights`` reads), its
    checkpoints (weights and optimizer state: 200 MB for a ResNet-50) deleted; ``all``:
    ``final.pt`` and the last checkpoint; ``none``: nothing (smoke runs). An unfinished run
    keeps its one resumable checkpoint whatever this says."""
    final = run_dir / "final.pt"
    if keep in ("final", "all"):
        weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        partial = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        torch.save(weights, partial)
        os.replace(partial, final)
    else:
        final.unlink(missing_ok=True)
    if keep != "all":
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> RunRecord:
    """Run the training ``cfg`` describes (a composed experiments/train.yaml) and return
    its record. ``callbacks`` are added to the Trainer's (tests use this)."""
    config = check(cfg)
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not config.get("verbose"):
        quiet_libraries()
        # In a sweep, the progress callback's one line per run says what matters.
        log.setLevel(logging.WARNING if in_sweep else logging.INFO)
    rid = run_id(config)
    ablation = config["ablation"]
    run_dir = Path(config["output_dir"]) / ablation / rid
    path = record_path(config["results_dir"], ablation, rid)
    if config["skip_done"] and path.exists():
        try:
            previous = read_record(path)
        except ValueError:
            previous = None
        if previous is not None and is_complete(previous):
            log.info("run %s is done already (%s); skipping", rid, path)
            return previous
        if previous is not None and previous["status"] == "done":
            log.info(
                "run %s was cut short by the time guard after %d of %d epochs; resuming it",
                rid,
                previous["epochs"],
                previous["max_epochs"],
            )

    seed = config["seed"]
    pl.seed_everything(seed, workers=True, verbose=bool(config.get("verbose")))
    torch.set_float32_matmul_precision(config["trainer"]["float32_matmul_precision"])
    last = run_dir / "checkpoints" / "last.ckpt"
    stats = RunStats()
    trainer = build_trainer(
        config,
        run_dir,
        rid,
        [stats, EpochSeed(seed), StopOnNonFiniteLoss(), throughput_monitor(), *callbacks],
        resuming=last.exists(),
        in_sweep=in_sweep,
    )
    world = trainer.world_size
    batch = config["protocol"]["batch_size"]
    if batch % world:
        raise ConfigError(
            f"protocol.batch_size={batch} (global) does not divide over {world} processes"
        )
    try:
        datamodule = build_datamodule(
            config["data"],
            batch_size=batch // world,
            num_workers=config["num_workers"],
            seed=seed,
        )
        datamodule.fetch()  # check, and download what may be downloaded, before any work
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data: {err}") from err

    module = LitClassifier(config, num_classes=datamodule.num_classes)
    size = datamodule.image_size
    costs = profile(module.model, input_size=(3, size, size)) if trainer.is_global_zero else {}
    # For the ThroughputMonitor's model FLOPs utilisation (rank zero logs it).
    module.flops_per_batch = training_flops(costs.get("gmacs"), batch // world)
    if trainer.is_global_zero:
        log.info("run %s in %s\n%s", rid, run_dir, module.attention_summary.table())
        log.info(
            "params %s, GMACs %.4f at %dx%d", f"{costs['params']:,}", costs["gmacs"], size, size
        )
    for logger in trainer.loggers:
        logger.log_hyperparams(
            {
                **dashboard_keys(config),
                "run_id": rid,
                "params": costs.get("params"),
                "gmacs": costs.get("gmacs"),
                **config,
            }
        )

    started = _now()
    status = "failed: unknown"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.exists() else None)
        if stats.validated_after != stats.epochs:
            # Validation did not run after the last epoch (interval, max_time): run it now.
            trainer.validate(module, datamodule=datamodule, verbose=False)
        status = "done"
    except BaseException as err:
        status = _failure(err)
        raise
    finally:
        record = RunRecord.for_model(
            config,
            rid,
            costs,
            module.attention_summary,
            status=status,
            top1=stats.top1,
            top5=stats.top5,
            best_top1=stats.best_top1,
            best_top5=stats.best_top5,
            epochs=stats.epochs,
            max_epochs=config["trainer"]["max_epochs"],
            throughput=stats.throughput(),
            wall_time_s=stats.wall_time(),
            device=_device(trainer),
            versions=_versions(),
            git_commit=_git_commit(),
            started_at=started,
            finished_at=_now(),
        )
        if trainer.is_global_zero:
            # A run that did not finish for a reason outside the experiment (interrupted,
            # out of memory, a worker that died) is no result: its record stays beside its
            # checkpoints, where the sweep's progress line still finds it.
            target = path if is_result(status) else failure_path(run_dir)
            write_record(target, record)
            log.info("run record: %s (%s)", target, status)
            if is_complete(record):
                keep_final_weights(run_dir, module.model, config["trainer"]["keep_checkpoints"])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.finish(exit_code=0 if status == "done" else 1)
    return record


@hydra.main(version_base="1.3", config_path="../experiments", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final top-1 (for sweepers that optimise it).

    A run that cannot start (a bad key or value, missing data) ends with one line on
    stderr and exit status 2, as ``make sweep`` reports it; ``verbose=true`` shows the
    traceback instead. In a multirun the error goes to Hydra, which records the job as
    failed, and the sweep's progress line says why."""
    try:
        return train(cfg).top1
    except ConfigError as err:
        if cfg.get("verbose") or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
