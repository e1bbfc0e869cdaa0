"""Run one ablation as a Hydra multirun, validated up front and resumable.

    python -m bench.sweep ABLATION --protocol P --seeds 0,1 [--launcher local|joblib|submitit]
                          [--jobs N] [--wandb-sweep FILE] [--dry-run] [OVERRIDE ...]

An ablation is ``experiments/ablation/<name>.yaml`` (chosen as ``ablation=<name>``): its
sweep axes are under ``hydra.sweeper.params``, the table rows under ``variants``; the
protocol (``--protocol``, default train.yaml's ``cpu``) chooses the setting. Before
anything trains, every run of the grid is composed and checked with ``bench.config`` (the
same code ``bench.train`` uses): an unknown ablation, protocol, axis key, block or block
argument, a protocol the ablation does not support, or a missing dataset stops the sweep
with one line naming it. Then the CLI runs exactly ``python -m bench.train -m
ablation=<name> protocol=<P> seed=<seeds> ...`` in a subprocess, so the runs (and run
ids) are those of that plain multirun; a run whose record already says ``done`` is skipped
by ``bench.train`` itself, so running the same sweep again resumes it.

``SweepProgress`` is the Hydra callback (``hydra.callbacks.progress`` in train.yaml) that
prints one line per run, ``[3/8] cbam_arrangement attention.order=parallel seed=0: done
top1=...``, and a summary at the end (how many done, skipped, failed, and why).

``--wandb-sweep FILE`` writes a W&B sweep (grid over the same axes, ``bench.train`` as the
program) instead of running, so agents on many machines can share one sweep:
``wandb sweep FILE`` then ``wandb agent <id>`` on each machine.
"""

from __future__ import annotations

import argparse
import itertools
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench.config import ConfigError, check, check_choice, compose, group_options, resolve
from bench.data import check_data
from bench.records import failure_path, is_complete, read_record, record_path, run_id
from bench.tables import build_tables, to_markdown
from bench.variants import variants_of

# Hydra overrides that pick a launcher; extra settings (partition, GPUs, time) go on the
# command line, e.g. `hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1`.
LAUNCHERS = {
    "local": lambda jobs: [],
    "joblib": lambda jobs: ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"],
    "submitit": lambda jobs: [
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.array_parallelism={jobs}",
    ],
}


class SweepError(ConfigError):
    """A sweep that cannot run as asked; the message names the bad key or value."""


def ablation_names() -> list[str]:
    """Every ablation file in ``experiments/ablation``, sorted."""
    return group_options("ablation")


def protocol_names() -> list[str]:
    return group_options("protocol")


def _compose_checked(overrides: list[str], origin: str, hydra_config: bool = False) -> DictConfig:
    try:
        return compose(overrides, hydra_config=hydra_config)
    except ConfigError as err:
        raise SweepError(f"{err} (from {origin})") from err


# --- the grid -----------------------------------------------------------------------------


@dataclass
class Axis:
    """One swept key: its override key (``attention.order``, ``model``, ``+x``) and values."""

    key: str
    values: list[str]
    origin: str  # where the axis was declared, for error messages

    @property
    def path(self) -> str:
        return self.key.lstrip("+~")


def parse_axes(params: dict[str, str] | Sequence[str], origin: str) -> list[Axis]:
    """Axes from ``hydra.sweeper.params`` (a mapping) or ``key=v1,v2`` overrides (a list)."""
    if isinstance(params, dict):
        params = [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides(list(params))
    axes = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        axes.append(Axis(key, values, origin))
    return axes


def _merge_axes(first: list[Axis], then: list[Axis]) -> list[Axis]:
    """Axes of ``first`` with those of ``then`` replacing same-key ones (Hydra's rule:
    the command line beats ``hydra.sweeper.params``), order kept as Hydra's BasicSweeper."""
    replaced = {a.path: a for a in then}
    merged = [replaced.pop(a.path, a) for a in first]
    return merged + [a for a in then if a.path in replaced]


@dataclass
class PlannedRun:
    """One run of a sweep: its index (1-based), overrides and composed config."""

    index: int
    total: int
    ablation: str
    overrides: list[str]
    axes: list[str]
    config: DictConfig = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.ablation} {' '.join(self.axes)}".strip()


def _label(axes: list[Axis], values: Sequence[str]) -> list[str]:
    return [f"{a.path}={v}" for a, v in zip(axes, values, strict=True) if len(a.values) > 1]


def plan_sweep(
    ablation: str, protocol: str | None = None, overrides: Sequence[str] = ()
) -> tuple[list[str], list[Axis]]:
    """Fixed overrides and the swept axes of one ablation (not yet composed per run)."""
    try:
        check_choice("ablation", ablation, ablation_names())
        if protocol is not None:
            check_choice("protocol", protocol, protocol_names())
    except ConfigError as err:
        raise SweepError(str(err)) from err
    command_axes = parse_axes(list(overrides), "the command line")
    fixed = [f"ablation={ablation}"] + ([f"protocol={protocol}"] if protocol else [])
    # Single-valued overrides shape the config the sweep's own axes are read from.
    single = [f"{a.key}={a.values[0]}" for a in command_axes if len(a.values) == 1]
    base = _compose_checked(fixed + single, "the command line", hydra_config=True)
    params = OmegaConf.to_container(base.hydra.sweeper.params or {}) or {}
    file_axes = parse_axes(
        {k: str(v) for k, v in params.items()}, f"experiments/ablation/{ablation}.yaml"
    )
    axes = _merge_axes(file_axes, command_axes)
    groups = set(base.hydra.runtime.choices)
    for axis in axes:
        if axis.path in groups or axis.key.startswith("+"):
            continue
        if OmegaConf.select(base, axis.path, default=_MISSING) is _MISSING:
            raise SweepError(
                f"unknown axis key {axis.path!r} (in {axis.origin}): the config has no such "
                f"key; axes are config keys (e.g. attention.ratio) or groups "
                f"({', '.join(sorted(g for g in groups if '/' not in g))})"
            )
    return fixed, axes


_MISSING = object()


def expand_grid(
    ablation: str, protocol: str | None = None, overrides: Sequence[str] = ()
) -> list[PlannedRun]:
    """Compose every run of the sweep (the cartesian product of its axes), in Hydra's order."""
    fixed, axes = plan_sweep(ablation, protocol, overrides)
    points = list(itertools.product(*(a.values for a in axes)))
    runs = []
    for index, values in enumerate(points, start=1):
        run_overrides = fixed + [f"{a.key}={v}" for a, v in zip(axes, values, strict=True)]
        config = _compose_checked(run_overrides, f"experiments/ablation/{ablation}.yaml")
        runs.append(
            PlannedRun(index, len(points), ablation, run_overrides, _label(axes, values), config)
        )
    return runs


def check_run(run: PlannedRun) -> None:
    """Resolve one run's config and validate it as ``bench.train`` would before training:
    placements, blocks and their arguments against the backbone, optimizer, schedule,
    trainer and batch size; and that it is exactly one row of the ablation's table."""

    try:
        config = check(run.config)
    except ConfigError as err:
        raise SweepError(f"{run.name}: {err}") from err
    variants = variants_of(config)
    hits = [v.label for v in variants if v.matches(config)]
    if variants and len(hits) != 1:
        raise SweepError(
            f"{run.name}: matches {len(hits)} of the ablation's variants "
            f"({', '.join(hits) or 'none'}); each run must be exactly one row of its table"
        )


def validate_sweep(
    ablation: str, protocol: str | None = None, overrides: Sequence[str] = ()
) -> list[PlannedRun]:
    """Expand and validate every run of a sweep; a SweepError before any run starts."""
    runs = expand_grid(ablation, protocol, overrides)
    seen: set[str] = set()
    for run in runs:
        # Seeds change nothing that validation looks at; check each model once.
        key = yaml.safe_dump(
            OmegaConf.to_container(run.config.attention) | {"m": dict(run.config.model)}
        )
        if key not in seen:
            check_run(run)
            seen.add(key)
    return runs


def check_datasets(runs: Sequence[PlannedRun], download: bool = True) -> None:
    """A SweepError naming the path (and the fix) if a dataset of the grid is missing; a
    CIFAR copy that torchvision can fetch is downloaded here, once, before the runs."""
    checked: set[str] = set()
    for run in runs:
        data = OmegaConf.to_container(run.config.data, resolve=True)
        key = yaml.safe_dump(data)
        if key in checked:
            continue
        try:
            check_data(data, download=download)
        except ValueError as err:
            raise SweepError(f"{run.name}: data: {err}") from err
        checked.add(key)


# --- resume -------------------------------------------------------------------------------


def record_of(config: DictConfig) -> Path:
    """Where ``bench.train`` writes the record of the run ``config`` describes."""
    resolved = resolve(config)  # leaves Hydra's own node (a callback's config) out
    return record_path(resolved["results_dir"], resolved["ablation"], run_id(resolved))


def failure_record_of(config: DictConfig) -> Path:
    """Where a run that failed outside the experiment keeps its record (beside its
    checkpoints, ``bench.records.failure_path``)."""
    resolved = resolve(config)
    run_dir = Path(resolved["output_dir"]) / resolved["ablation"] / run_id(resolved)
    return failure_path(run_dir)


def completed_run(config: DictConfig) -> bool:
    """True if the run of ``config`` already has a valid, complete record (see
    ``bench.records.is_complete``; ``bench.train`` skips such a run unless
    ``skip_done=false``)."""

    path = record_of(config)
    try:
        return path.is_file() and is_complete(read_record(path))
    except ValueError:
        return False


# --- progress callback --------------------------------------------------------------------


class SweepProgress(Callback):
    """One line per run of a multirun: ``[3/8] <ablation> <overrides>: <outcome>``, where
    the outcome is read from the run's record (``done top1=..``, ``failed: ..``) or is
    ``skipped (record exists)`` for a run that was done before the sweep reached it."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.swept: set[str] | None = None
        self.skipped = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        params = OmegaConf.to_container(config.hydra.sweeper.params or {}) or {}
        axes = _merge_axes(
            parse_axes({k: str(v) for k, v in params.items()}, "config"),
            parse_axes(list(config.hydra.overrides.task), "command line"),
        )
        self.total = math.prod(len(axis.values) for axis in axes)
        self.swept = {axis.path for axis in axes if len(axis.values) > 1}

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self.skipped = config.get("skip_done", True) and _quietly(
            completed_run, config, default=False
        )

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # a single run has Lightning's own bar
            return
        index = config.hydra.job.num + 1
        shown = [
            o
            for o in config.hydra.overrides.task
            if (
                o.split("=", 1)[0].lstrip("+~") in self.swept
                if self.swept is not None
                else not o.startswith("ablation=")
            )
        ]
        name = f"{config.get('ablation', '')} {' '.join(shown)}".strip()
        if self.skipped:
            outcome = "skipped (record exists)"
        else:
            outcome = _quietly(run_outcome, config, default="failed: bad config")
            error = getattr(job_return, "_return_value", None)
            if outcome == NO_RECORD and isinstance(error, BaseException):
                outcome = "failed: " + " ".join(f"{type(error).__name__}: {error}".split())
        print(f"[{index}/{self.total or '?'}] {name}: {outcome}", flush=True)


def _quietly(function, config, default):
    # A progress line must never be what breaks a sweep (e.g. a config that cannot resolve).
    try:
        return function(config)
    except Exception:
        return default


NO_RECORD = "failed: no run record"


def run_outcome(config: DictConfig) -> str:
    """What became of the run ``config`` describes: its result record, or else the record
    it left beside its checkpoints when the machine stopped it (``describe_record``)."""
    path = record_of(config)
    if not path.is_file() and failure_record_of(config).is_file():
        path = failure_record_of(config)
    return describe_record(path)


def describe_record(path: Path) -> str:
    """``done top1=.. top5=..`` (saying so if the time guard cut the run short), the
    record's ``failed: ..`` status, or why there is none."""

    if not path.is_file():
        return NO_RECORD
    try:
        record = read_record(path)
    except ValueError as err:
        return f"failed: {err}"
    if record.status != "done":
        return record.status
    outcome = f"done top1={record.top1:.2f} top5={record.top5:.2f}"
    if not is_complete(record):
        outcome += (
            f" (cut short by the time guard after {record.epochs} of"
            f" {record.max_epochs} epochs; raise trainer.max_time and run again to finish)"
        )
    return outcome


def summary(outcomes: Sequence[str], skipped: int) -> str:
    """One line for the end of a sweep: how many runs did what, and why the failed failed."""
    done = sum(o.startswith("done") for o in outcomes)
    failed = Counter(o.removeprefix("failed: ") for o in outcomes if o.startswith("failed"))
    line = f"{len(outcomes)} run(s): {done - skipped} trained, {skipped} skipped (done before)"
    line += f", {sum(failed.values())} failed"
    if failed:
        line += " (" + "; ".join(f"{n}x {why}" for why, n in failed.most_common()) + ")"
    return line


def print_tables(runs: Sequence[PlannedRun]) -> None:
    """The table(s) of this sweep's finished runs, as ``make tables`` would write them."""
    paths = [record_of(run.config) for run in runs]
    records = [read_record(path) for path in paths if path.is_file()]
    for table in build_tables(records):
        print("\n" + to_markdown(table), flush=True)


# --- W&B sweep ----------------------------------------------------------------------------


def wandb_sweep(ablation: str, fixed: list[str], axes: list[Axis], project: str) -> dict:
    """A W&B grid sweep over ``axes``; each agent runs ``python -m bench.train``."""
    return {
        "name": ablation,
        "project": project,
        "program": "bench.train",
        "method": "grid",
        "parameters": {a.key: {"values": list(a.values)} for a in axes},
        "command": [
            "${env}",
            "python",
            "-m",
            "bench.train",
            *fixed,
            "logger=wandb",
            "logger.mode=online",
            "${args_no_hyphens}",
        ],
    }


# --- CLI ----------------------------------------------------------------------------------


def train_command(
    fixed: list[str], axes: list[Axis], launcher: list[str], verbose: bool = False
) -> list[str]:
    given = [f"{a.key}={','.join(a.values)}" for a in axes if a.origin == "the command line"]
    # Hydra's own lines (one per job launched) repeat what the progress lines say.
    quiet = [] if verbose else ["hydra/hydra_logging=disabled"]
    return [sys.executable, "-m", "bench.train", "-m", *fixed, *given, *launcher, *quiet]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sweep",
        description="Validate and run one ablation as a Hydra multirun (resumable).",
    )
    parser.add_argument("ablation", help=f"one of: {', '.join(ablation_names())}")
    parser.add_argument(
        "--protocol", default=None, help="protocol config (default: the ablation's own)"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local")
    parser.add_argument(
        "--jobs", type=int, default=2, help="parallel jobs for joblib / submitit (default: 2)"
    )
    parser.add_argument(
        "--wandb-sweep",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a W&B sweep YAML for this grid instead of running it",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and list the runs, saying which are done; run nothing",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (key=value)")
    args = parser.parse_intermixed_args(argv)

    overrides = [f"seed={args.seeds}", *args.overrides]
    if args.wandb_sweep and args.protocol in (None, "smoke"):
        print(
            f"error: a W&B sweep trains for real on many machines, so it needs a real protocol "
            f"(--protocol {' or '.join(p for p in protocol_names() if p != 'smoke')}); "
            f"got {args.protocol or 'none'}",
            file=sys.stderr,
        )
        return 2
    try:
        runs = validate_sweep(args.ablation, args.protocol, overrides)
        fixed, axes = plan_sweep(args.ablation, args.protocol, overrides)
        if not args.wandb_sweep:  # agents elsewhere check their own data
            check_datasets(runs, download=not args.dry_run)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.ablation}: {len(runs)} run(s) validated")
    if args.wandb_sweep:
        project = OmegaConf.select(runs[0].config, "logger.project", default="attention-bench")
        spec = wandb_sweep(args.ablation, fixed, axes, project)
        args.wandb_sweep.parent.mkdir(parents=True, exist_ok=True)
        args.wandb_sweep.write_text(yaml.safe_dump(spec, sort_keys=False))
        print(
            f"wrote {args.wandb_sweep}: a W&B grid of {len(runs)} run(s) of {args.ablation}, "
            f"protocol {args.protocol}, logging online to project {project!r}.\n"
            f"Start it once:            wandb sweep {args.wandb_sweep}   (prints a sweep id)\n"
            "Then on every machine:    wandb agent <entity>/<project>/<sweep id>\n"
            "Each agent runs `python -m bench.train ...` from a checkout of this project with "
            "its data in place; records go to each machine's results/runs."
        )
        return 0
    done_before = [run.config.skip_done and completed_run(run.config) for run in runs]
    if args.dry_run:
        for run, done in zip(runs, done_before, strict=True):
            state = "done, will be skipped" if done else "to run"
            print(f"[{run.index}/{run.total}] {run.name}: {state}")
        return 0
    verbose = bool(runs[0].config.get("verbose"))
    command = train_command(fixed, axes, LAUNCHERS[args.launcher](args.jobs), verbose)
    print("+ " + " ".join(command[1:]), flush=True)
    code = subprocess.call(command)
    outcomes = [run_outcome(run.config) for run in runs]
    print(summary(outcomes, skipped=sum(done_before)), flush=True)
    print_tables(runs)
    failed = any(o.startswith("failed") for o in outcomes)
    return code or int(failed)


if __name__ == "__main__":
    sys.exit(main())
