"""Run records: one JSON file per run at ``results/runs/<ablation>/<run_id>.json``.

A record is the only thing the tables and notebooks read, so it carries everything needed
to interpret a number: the resolved config, costs (params, GMACs), accuracies (final and
best), throughput, wall time, device, library versions and git commit, and a status
(``done`` or ``failed: <reason>``).

- ``run_id(config)`` hashes the resolved config (seed included) without the keys that do
  not change what is trained (where outputs go, how it is logged, loader workers, the
  wall-time guard), so the same experiment started again gets the same id, finds its
  checkpoint and resumes.
- ``is_complete(record)``: the run is done and trained every epoch it asked for. A run
  that ``trainer.max_time`` cut short is ``done`` (it has its final validation) but not
  complete, so starting it again, with a larger guard, resumes it from its checkpoint.
- ``write_record`` is atomic: the JSON goes to a temporary file in the same directory, is
  fsynced, then renamed over the target; a crash leaves the old record or none, never half.
- ``load_records`` reads a tree of records and skips broken files with a warning that
  names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from bench.atomic import write_text_atomic

SCHEMA_VERSION = 1

# Dotted config paths that do not change the trained model or its numbers.
RUN_IRRELEVANT_KEYS = (
    "output_dir",
    "results_dir",
    "run_name",
    "skip_done",
    "verbose",
    "num_workers",
    "logger",
    "data.root",
    "data.download",
    # Where the batches are gathered, not which: the resident path draws the same batches
    # in the same order as the DataLoader path under one seed (tests/test_data.py).
    "data.resident",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    # What a finished run leaves on disk (its final weights, its checkpoints or nothing).
    "trainer.keep_checkpoints",
    # A guard, not a hyperparameter: a run that finishes all epochs is the same run under
    # any guard, and one the guard cut short is told apart by ``is_complete``. Keeping it
    # out of the id lets a slower machine raise it and resume the cut run.
    "trainer.max_time",
)

# The table metadata of an ablation (its rows, source, paper, baseline, protocols it cannot
# run in) describe how a run is reported, not what is trained: editing them must not
# orphan finished runs.
ABLATION_METADATA_KEYS = ("source", "paper", "variants", "baseline", "unsupported")
RUN_IRRELEVANT_KEYS += ABLATION_METADATA_KEYS

DONE = "done"
# Cost-only records (bench.costs, make costs) profile a configuration without training it,
# so cost tables are rebuilt from records too; they carry costs but no accuracy.
COST_ONLY = "cost-only"
FAILED = "failed: "
REQUIRED_WHEN_DONE = ("params", "gmacs", "top1", "top5", "best_top1", "best_top5")
REQUIRED_WHEN_COST_ONLY = ("params", "gmacs")

Number = StrictInt | StrictFloat


class RunRecord(BaseModel):
    """One run's record: the only place its fields, their types and their rules live.

    Built by ``bench.train`` (``for_model`` + the training fields) and ``bench.costs``
    (``for_model`` alone, ``status=cost-only``); read back by ``read_record`` for the
    sweep and the tables. Item access (``record["top1"]``, ``record.get("profile")``)
    reads a field by name, as the stored JSON would.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    schema_version: StrictInt = SCHEMA_VERSION
    run_id: StrictStr
    ablation: StrictStr
    run_name: StrictStr
    status: StrictStr
    config: dict[str, Any]
    params: StrictInt | None = None
    gmacs: Number | None = None
    profile: dict[str, Any] | None = None
    attention: list[dict[str, Any]] | None = None
    top1: Number | None = None
    top5: Number | None = None
    best_top1: Number | None = None
    best_top5: Number | None = None
    epochs: StrictInt = 0
    max_epochs: StrictInt | None = None
    throughput: Number | None = None
    wall_time_s: Number = 0.0
    device: StrictStr = ""
    versions: dict[str, Any] = {}
    git_commit: StrictStr | None = None
    started_at: StrictStr = ""
    finished_at: StrictStr = ""

    @model_validator(mode="after")
    def _status_rules(self) -> RunRecord:
        if self.status == DONE:
            required, what = REQUIRED_WHEN_DONE, "a done run"
        elif self.status == COST_ONLY:
            required, what = REQUIRED_WHEN_COST_ONLY, "a cost-only record"
        elif self.status.startswith(FAILED):
            required, what = (), ""
        else:
            raise ValueError(
                f"status {self.status!r} is none of 'done', 'cost-only', 'failed: <reason>'"
            )
        missing = [f"{k!r} is null in {what}" for k in required if getattr(self, k) is None]
        if missing:
            raise ValueError("; ".join(missing))
        return self

    @classmethod
    def for_model(
        cls, config: Mapping[str, Any], rid: str, costs: Mapping[str, Any], summary, **fields
    ) -> RunRecord:
        """A record of the model ``config`` describes: its identity, params/GMACs from
        ``bench.profile.profile`` (``costs``) and the injection ``summary``; ``fields``
        fill in the rest (status, accuracies, timings, ...)."""
        return cls(
            run_id=rid,
            ablation=config["ablation"],
            run_name=config["run_name"],
            config=dict(config),
            params=costs.get("params"),
            gmacs=costs.get("gmacs"),
            profile=dict(costs),
            attention=summary.to_dicts(),
            **fields,
        )

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in type(self).model_fields else default

    def to_json(self) -> str:
        """The stored text: sorted keys, two-space indent, no NaN."""
        return json.dumps(self.model_dump(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _problems(err: ValidationError) -> str:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            out.append(f"missing {where!r}")
        elif where:
            got = type(e["input"]).__name__ if e["type"] != "extra_forbidden" else "unknown"
            out.append(f"{where!r} is {got}: {message}")
        else:
            out.append(message)
    return "; ".join(dict.fromkeys(out))


def as_record(record: RunRecord | Mapping[str, Any]) -> RunRecord:
    """``record`` as a RunRecord; a ValueError listing every missing or mistyped field."""
    if isinstance(record, RunRecord):
        return record
    # A stored record spells out every field: one that lacks a field was not written by
    # this code (or was cut), whatever its defaults would say.
    problems = [
        f"missing {k!r}"
        for k in RunRecord.model_fields
        if k not in record and k not in ("profile", "attention")  # details, not the result
    ]
    try:
        if not problems:
            return RunRecord.model_validate(dict(record))
    except ValidationError as err:
        problems.append(_problems(err))
    raise ValueError("bad run record: " + "; ".join(problems))


def check_record(record: RunRecord | Mapping[str, Any]) -> None:
    """Raise a ValueError listing every missing or mistyped field of ``record``."""
    as_record(record)


def _drop(config: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


def run_id(config: Mapping[str, Any]) -> str:
    """12 hex digits identifying a run: a hash of the resolved ``config`` (a plain nested
    dict, interpolations resolved) without ``RUN_IRRELEVANT_KEYS``."""
    relevant = json.loads(json.dumps(config, default=str))
    for dotted in RUN_IRRELEVANT_KEYS:
        _drop(relevant, dotted)
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def record_path(results_dir: str | os.PathLike, ablation: str, run_id: str) -> Path:
    """Where the record of one run lives: ``<results_dir>/<ablation>/<run_id>.json``."""
    return Path(results_dir) / ablation / f"{run_id}.json"


def failure_path(run_dir: str | os.PathLike) -> Path:
    """Where the record of a run that failed for a reason outside the experiment goes:
    beside its checkpoints (``<output_dir>/<ablation>/<run_id>/record.json``), never into
    ``results/``."""
    return Path(run_dir) / "record.json"


def is_complete(record: RunRecord | Mapping[str, Any]) -> bool:
    """True for a ``done`` run that trained all its ``max_epochs`` (``None`` or a negative
    number: no epoch limit); a run cut short by ``trainer.max_time`` is not complete."""
    max_epochs = record.get("max_epochs")
    return record.get("status") == "done" and (
        max_epochs is None or max_epochs < 0 or record.get("epochs", 0) >= max_epochs
    )


def write_record(path: str | os.PathLike, record: RunRecord | Mapping[str, Any]) -> Path:
    """Check ``record`` and write it to ``path`` atomically; returns the path."""
    return write_text_atomic(path, as_record(record).to_json())


def read_record(path: str | os.PathLike) -> RunRecord:
    """One record, checked; a ValueError naming the file if it is unreadable or invalid."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict):
            raise ValueError(f"top level is {type(record).__name__}, expected an object")
        return as_record(record)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def load_records(root: str | os.PathLike, strict: bool = False) -> list[RunRecord]:
    """Every record under ``root`` (``<ablation>/<run_id>.json``), sorted by path.

    A broken file (bad JSON, failed schema check) is skipped with a warning naming it, or
    raises a ValueError with ``strict=True``. Temporary files of unfinished writes are
    ignored.
    """
    records = []
    for path in sorted(Path(root).rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            records.append(read_record(path))
        except ValueError as err:
            if strict:
                raise
            warnings.warn(f"skipping broken run record {err}", stacklevel=2)
    return records
