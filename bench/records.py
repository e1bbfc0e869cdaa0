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

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# Dotted config paths that do not change the trained model or its numbers.
RUN_IRRELEVANT_KEYS = (
    "output_dir",
    "results_dir",
    "run_name",
    "skip_done",
    "num_workers",
    "logger",
    "data.root",
    "data.download",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    # A guard, not a hyperparameter: a run that finishes all epochs is the same run under
    # any guard, and one the guard cut short is told apart by ``is_complete``. Keeping it
    # out of the id lets a slower machine raise it and resume the cut run.
    "trainer.max_time",
)

_NUMBER = (int, float)
_NONE = type(None)
# field -> accepted types; a done run must also have every metric and cost filled in.
SCHEMA: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "run_id": (str,),
    "ablation": (str,),
    "run_name": (str,),
    "status": (str,),
    "config": (dict,),
    "params": (int, _NONE),
    "gmacs": (*_NUMBER, _NONE),
    "top1": (*_NUMBER, _NONE),
    "top5": (*_NUMBER, _NONE),
    "best_top1": (*_NUMBER, _NONE),
    "best_top5": (*_NUMBER, _NONE),
    "epochs": (int,),
    "max_epochs": (int, _NONE),
    "throughput": (*_NUMBER, _NONE),
    "wall_time_s": _NUMBER,
    "device": (str,),
    "versions": (dict,),
    "git_commit": (str, _NONE),
    "started_at": (str,),
    "finished_at": (str,),
}
REQUIRED_WHEN_DONE = ("params", "gmacs", "top1", "top5", "best_top1", "best_top5")
# Cost-only records (bench.costs, make costs) profile a configuration without training it,
# so cost tables are rebuilt from records too; they carry costs but no accuracy.
COST_ONLY = "cost-only"
REQUIRED_WHEN_COST_ONLY = ("params", "gmacs")


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


def check_record(record: Mapping[str, Any]) -> None:
    """Raise a ValueError listing every missing or mistyped field of ``record``."""
    problems = []
    for key, types in SCHEMA.items():
        if key not in record:
            problems.append(f"missing {key!r}")
        elif isinstance(record[key], bool) or not isinstance(record[key], types):
            names = "/".join("null" if t is _NONE else t.__name__ for t in types)
            problems.append(f"{key!r} is {type(record[key]).__name__}, expected {names}")
    status = record.get("status")
    if isinstance(status, str):
        if status == "done":
            problems += [
                f"{k!r} is null in a done run" for k in REQUIRED_WHEN_DONE if record.get(k) is None
            ]
        elif status == COST_ONLY:
            problems += [
                f"{k!r} is null in a cost-only record"
                for k in REQUIRED_WHEN_COST_ONLY
                if record.get(k) is None
            ]
        elif not status.startswith("failed: "):
            problems.append(f"status {status!r} is none of 'done', 'cost-only', 'failed: <reason>'")
    if problems:
        raise ValueError("bad run record: " + "; ".join(problems))


def is_complete(record: Mapping[str, Any]) -> bool:
    """True for a ``done`` run that trained all its ``max_epochs`` (``None`` or a negative
    number: no epoch limit); a run cut short by ``trainer.max_time`` is not complete."""
    max_epochs = record.get("max_epochs")
    return record.get("status") == "done" and (
        max_epochs is None or max_epochs < 0 or record.get("epochs", 0) >= max_epochs
    )


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Check ``record`` and write it to ``path`` atomically; returns the path."""
    check_record(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """One record, checked; a ValueError naming the file if it is unreadable or invalid."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict):
            raise ValueError(f"top level is {type(record).__name__}, expected an object")
        check_record(record)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    return record


def load_records(root: str | os.PathLike, strict: bool = False) -> list[dict[str, Any]]:
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
