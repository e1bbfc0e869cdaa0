"""Run one ablation as a Hydra multirun, validated up front and resumable.

    python -m bench.sweep ABLATION --protocol P --seeds 0,1 [--launcher local|joblib|submitit]
                          [--jobs N] [--wandb-sweep FILE] [--dry-run] [OVERRIDE ...]

An ablation is ``experiments/ablation/<name>.yaml`` (used as ``+ablation=<name>``): its
sweep axes are under ``hydra.sweeper.params``, the table rows under ``variants``. Before
anything trains, every run of the grid is composed and checked here (``validate_sweep``):
an unknown ablation, protocol, axis key, block or block argument stops the sweep with an
error naming it. Then the CLI runs exactly ``python -m bench.train -m +ablation=<name>
protocol=<P> seed=<seeds> ...`` in a subprocess; a run whose record already says ``done``
is skipped by ``bench.train`` itself, so running the same sweep again resumes it.

``SweepProgress`` is the Hydra callback (``hydra.callbacks.progress`` in every ablation
file) that prints one line per run: ``[3/8] cbam_arrangement attention.order=parallel
seed=0: done top1=...``.

``--wandb-sweep FILE`` writes a W&B sweep (grid over the same axes, ``bench.train`` as the
program) instead of running, so agents on many machines can share one sweep:
``wandb sweep FILE`` then ``wandb agent <id>`` on each machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from bench.records import (
    is_complete,
    read_record,
    record_path,
    run_id,
)
from bench.train import resolve, validate
from bench.variants import variants_of

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
ABLATIONS = EXPERIMENTS / "ablation"

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


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message names the bad key or value."""


def ablation_names() -> list[str]:
    """Every ablation file in ``experiments/ablation``, sorted."""
    return sorted(p.stem for p in ABLATIONS.glob("*.yaml"))


def protocol_names() -> list[str]:
    return sorted(p.stem for p in (EXPERIMENTS / "protocol").glob("*.yaml"))


def protocol_group_choices(protocol: str) -> dict[str, str]:
    """The groups a protocol file chooses itself (``override /data: cifar10_images`` in
    its defaults). An ablation appended with ``+ablation=`` comes later in the defaults
    list and would win over them, so a sweep passes them on the command line, where they
    beat the ablation's defaults (``smoke`` then trains on its CIFAR-10 subset whatever
    the ablation's dataset). Only the data group is passed: a protocol's optim and
    schedule choices already apply, since ablations do not choose those."""
    text = (EXPERIMENTS / "protocol" / f"{protocol}.yaml").read_text()
    defaults = (yaml.safe_load(text) or {}).get("defaults") or []
    choices = {}
    for entry in defaults:
        if isinstance(entry, dict):
            for key, option in entry.items():
                if key == "override /data":
                    choices["data"] = option
    return choices


def _check_choice(what: str, name: str, choices: list[str]) -> None:
    if name not in choices:
        import difflib

        close = difflib.get_close_matches(name, choices, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise SweepError(f"unknown {what} {name!r}.{hint} Available: {', '.join(choices)}")


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    # compose() needs an initialised GlobalHydra; inside a running Hydra app (a callback)
    # one already exists and must be restored afterwards.
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(EXPERIMENTS), version_base=None):
            yield
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def compose_run(overrides: Sequence[str], hydra_config: bool = False) -> DictConfig:
    """The training config ``python -m bench.train <overrides>`` would run."""
    with _hydra():
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


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
    _check_choice("ablation", ablation, ablation_names())
    if protocol is not None:
        _check_choice("protocol", protocol, protocol_names())
    command_axes = parse_axes(list(overrides), "the command line")
    fixed = [f"+ablation={ablation}"]
    if protocol:
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        fixed += [f"protocol={protocol}"] + [
            f"{group}={option}"
            for group, option in protocol_group_choices(protocol).items()
            if group not in given
        ]
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


def _compose_checked(overrides: list[str], origin: str, hydra_config: bool = False) -> DictConfig:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_run(overrides, hydra_config=hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise SweepError(f"cannot compose {' '.join(overrides)} (from {origin}): {err}") from err


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
        config = resolve(run.config)
        validate(config)
    except Exception as err:  # each names its key (placements, optim, interpolations, ...)
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


# --- resume -------------------------------------------------------------------------------


def record_of(config: DictConfig) -> Path:
    """Where ``bench.train`` writes the record of the run ``config`` describes."""

    if "hydra" in config:  # a callback's config: the job's, plus Hydra's own node
        config = copy.copy(config)
        with open_dict(config):
            del config["hydra"]
    resolved = resolve(config)
    return record_path(resolved["results_dir"], resolved["ablation"], run_id(resolved))


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
        self.skipped = _quietly(completed_run, config, default=False)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        index = config.hydra.job.num + 1
        shown = [
            o
            for o in config.hydra.overrides.task
            if (
                o.split("=", 1)[0].lstrip("+~") in self.swept
                if self.swept is not None
                else not o.startswith("+ablation=")
            )
        ]
        name = f"{config.get('ablation', '')} {' '.join(shown)}".strip()
        if self.skipped:
            outcome = "skipped (record exists)"
        else:
            path = _quietly(record_of, config, default=None)
            outcome = describe_record(path) if path is not None else "failed: bad config"
        print(f"[{index}/{self.total or '?'}] {name}: {outcome}", flush=True)


def _quietly(function, config, default):
    # A progress line must never be what breaks a sweep (e.g. a config that cannot resolve).
    try:
        return function(config)
    except Exception:
        return default


def describe_record(path: Path) -> str:
    """``done top1=.. top5=..`` (saying so if the time guard cut the run short), the
    record's ``failed: ..`` status, or why there is none."""

    if not path.is_file():
        return "failed: no run record"
    try:
        record = read_record(path)
    except ValueError as err:
        return f"failed: {err}"
    if record["status"] != "done":
        return record["status"]
    outcome = f"done top1={record['top1']:.2f} top5={record['top5']:.2f}"
    if not is_complete(record):
        outcome += (
            f" (cut short by the time guard after {record['epochs']} of"
            f" {record['max_epochs']} epochs; raise trainer.max_time and run again to finish)"
        )
    return outcome


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


def train_command(fixed: list[str], axes: list[Axis], launcher: list[str]) -> list[str]:
    given = [f"{a.key}={','.join(a.values)}" for a in axes if a.origin == "the command line"]
    return [sys.executable, "-m", "bench.train", "-m", *fixed, *given, *launcher]


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
    try:
        runs = validate_sweep(args.ablation, args.protocol, overrides)
        fixed, axes = plan_sweep(args.ablation, args.protocol, overrides)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.ablation}: {len(runs)} run(s) validated")
    if args.wandb_sweep:
        project = OmegaConf.select(runs[0].config, "logger.project", default="attention-bench")
        spec = wandb_sweep(args.ablation, fixed, axes, project)
        args.wandb_sweep.parent.mkdir(parents=True, exist_ok=True)
        args.wandb_sweep.write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"wrote {args.wandb_sweep}: wandb sweep {args.wandb_sweep}; then wandb agent <id>")
        return 0
    if args.dry_run:
        for run in runs:
            state = "done, will be skipped" if completed_run(run.config) else "to run"
            print(f"[{run.index}/{run.total}] {run.name}: {state}")
        return 0
    command = train_command(fixed, axes, LAUNCHERS[args.launcher](args.jobs))
    print("+ " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
