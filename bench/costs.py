"""Cost-only run records: params and GMACs of every variant of the ablations, no training.

    python -m bench.costs [--results results] [--ablation NAME ...]     (make costs)

Each variant is planned exactly as the sweep would run it (``bench.sweep.validate_sweep``)
under the protocol of the paper's setting (the ablation's ``paper.protocol``: ``imagenet``,
ResNet-50 at 224, for most; ``cifar`` for the CIFAR tables), built on the meta device and
profiled at that setting's input size (the data recipe's: 32 for CIFAR, 224 for
ImageNet). The record has status ``cost-only`` and its own run id, so it never stands in
for a trained run. Existing cost records are kept; the tables are rebuilt afterwards
(``bench.tables.make_tables``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from bench.config import compose, resolve
from bench.data import RECIPES
from bench.lit import build_model
from bench.profile import profile
from bench.records import COST_ONLY, RunRecord, record_path, run_id, write_record
from bench.sweep import PlannedRun, SweepError, ablation_names, validate_sweep
from bench.tables import make_tables, results_parser


def input_size(config: Mapping) -> tuple[int, int, int]:
    """The paper's input size for a config: the data recipe's (32 for CIFAR, 224 for
    ImageNet)."""

    side = RECIPES[config["data"]["recipe"]]["image_size"]
    return (3, side, side)


def paper_protocol(ablation: str) -> str | None:
    """The protocol of the paper's setting (``paper.protocol`` in the ablation file)."""
    config = compose([f"ablation={ablation}"])
    return OmegaConf.select(config, "paper.protocol", default=None)


def cost_record(run: PlannedRun) -> RunRecord:
    """A ``cost-only`` run record: params and GMACs of the run's model, no training."""
    config = resolve(run.config)
    size = input_size(config)
    # A cost record describes a model, not a training run: its id must not collide with
    # the trained run of the same config and seed.
    config["cost_only"] = {"input_size": list(size)}
    placements, classes = config["attention"]["placements"], config["data"]["num_classes"]
    start = time.perf_counter()
    try:
        with torch.device("meta"):  # shapes only: fast, and the same counts
            model, summary = build_model(config["model"], placements, classes)
        costs = profile(model, input_size=size)
    except NotImplementedError:  # a block that needs real data (FcaNet's DCT filters)
        model, summary = build_model(config["model"], placements, classes)
        costs = profile(model, input_size=size)
    return RunRecord.for_model(
        config,
        run_id(config),
        costs,
        summary,
        status=COST_ONLY,
        wall_time_s=round(time.perf_counter() - start, 3),
        device="meta",
        versions={"torch": torch.__version__, "timm": timm.__version__},
    )


def write_cost_records(
    runs_dir: str | os.PathLike, ablations: Sequence[str] | None = None, progress: bool = True
) -> list[Path]:
    """Profile every variant of ``ablations`` (default: all) under its own protocol and
    write one ``cost-only`` record per variant; existing cost records are kept."""
    planned = []
    for ablation in ablations or ablation_names():
        protocol = paper_protocol(ablation)
        runs = validate_sweep(ablation, protocol, [f"results_dir={runs_dir}"])
        seeds = {r.config.seed for r in runs}
        planned += [r for r in runs if r.config.seed == min(seeds)]
    written = []
    for run in tqdm(planned, desc="cost-only", unit="variant", disable=not progress):
        record = cost_record(run)
        path = record_path(runs_dir, run.ablation, record.run_id)
        if not path.exists():
            written.append(write_record(path, record))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = results_parser("python -m bench.costs", __doc__)
    parser.add_argument(
        "--ablation", nargs="*", default=None, help="only these ablations (default: all)"
    )
    args = parser.parse_args(argv)
    try:  # every variant is planned and validated before the first one is profiled
        written = write_cost_records(args.results / "runs", args.ablation)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tables = make_tables(args.results, plots=not args.no_plots)
    print(f"{len(written)} new cost record(s); {len(tables)} table(s) in {args.results / 'tables'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
