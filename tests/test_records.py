"""Run records: schema, atomic writes, loading a tree with broken files, run ids."""

import json
import os
import stat

import pytest

from bench import atomic, records
from bench.config import compose, resolve
from bench.records import (
    check_record,
    is_complete,
    load_records,
    read_record,
    record_path,
    run_id,
    write_record,
)


def make_record(**changes) -> dict:
    record = {
        "schema_version": records.SCHEMA_VERSION,
        "run_id": "0123456789ab",
        "ablation": "adhoc",
        "run_name": "resnet20_cifar-se-s0",
        "status": "done",
        "config": {"seed": 0},
        "params": 274847,
        "gmacs": 0.0408,
        "top1": 81.5,
        "top5": 99.1,
        "best_top1": 81.5,
        "best_top5": 99.2,
        "epochs": 7,
        "max_epochs": 7,
        "throughput": 480.0,
        "wall_time_s": 812.4,
        "device": "cpu x1",
        "versions": {"torch": "2.x"},
        "git_commit": None,
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:14:00+00:00",
    }
    record.update(changes)
    return record


def test_schema_accepts_done_and_failed_records():
    check_record(make_record())
    check_record(
        make_record(
            status="failed: FloatingPointError: loss is nan",
            top1=None,
            top5=None,
            best_top1=None,
            best_top5=None,
            throughput=None,
        )
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"top1": None}, "'top1' is null in a done run"),
        ({"status": "finished"}, "none of 'done', 'cost-only', 'failed: <reason>'"),
        ({"epochs": "7"}, "'epochs' is str: Input should be a valid integer"),
        ({"params": True}, "'params' is bool"),
        ({"status": "cost-only", "gmacs": None}, "'gmacs' is null in a cost-only record"),
        ({"config": None}, "'config' is NoneType: Input should be a valid dictionary"),
    ],
)
def test_schema_names_the_bad_field(changes, message):
    with pytest.raises(ValueError, match=message):
        check_record(make_record(**changes))


def test_cost_only_record_needs_costs_but_no_accuracy():
    check_record(
        make_record(status="cost-only", top1=None, top5=None, best_top1=None, best_top5=None)
    )


def test_schema_names_a_missing_field():
    record = make_record()
    del record["gmacs"]
    with pytest.raises(ValueError, match="missing 'gmacs'"):
        check_record(record)


def test_record_path_layout(tmp_path):
    assert record_path(tmp_path, "se_ratio", "abc") == tmp_path / "se_ratio" / "abc.json"


def test_write_then_read_round_trip(tmp_path):
    path = write_record(tmp_path / "a" / "x.json", make_record())
    assert read_record(path) == records.as_record(make_record())
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_serialisation_leaves_the_old_record_and_no_debris(tmp_path, monkeypatch):
    path = write_record(tmp_path / "x.json", make_record(top1=70.0))

    def broken_dumps(*args, **kwargs):
        raise TypeError("not serialisable")

    monkeypatch.setattr(records.json, "dumps", broken_dumps)
    with pytest.raises(TypeError):
        write_record(path, make_record(top1=90.0))
    monkeypatch.undo()
    assert read_record(path)["top1"] == 70.0
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_crash_before_rename_leaves_the_old_record_and_no_debris(tmp_path, monkeypatch):
    path = write_record(tmp_path / "x.json", make_record(top1=70.0))

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_record(path, make_record(top1=90.0))
    monkeypatch.undo()
    assert read_record(path)["top1"] == 70.0
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_record_permissions_follow_the_umask(tmp_path):
    """Not mkstemp's 0600: a results folder shared by a team stays readable."""
    old = os.umask(0o022)
    try:
        path = write_record(tmp_path / "x.json", make_record())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_invalid_record_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="top1"):
        write_record(tmp_path / "x.json", make_record(top1=None))
    assert not any(tmp_path.iterdir())


def test_load_records_skips_broken_files_with_a_warning(tmp_path):
    write_record(tmp_path / "abl" / "good.json", make_record())
    (tmp_path / "abl" / "truncated.json").write_text('{"run_id": "x", ')
    (tmp_path / "abl" / "incomplete.json").write_text(json.dumps({"run_id": "x"}))
    (tmp_path / "abl" / ".good.json.1234.tmp").write_text("partial")
    with pytest.warns(UserWarning) as caught:
        loaded = load_records(tmp_path)
    assert [r["run_id"] for r in loaded] == ["0123456789ab"]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "incomplete.json" in messages[0] and "missing 'status'" in messages[0]
    assert "truncated.json" in messages[1]
    with pytest.raises(ValueError, match="json"):
        load_records(tmp_path, strict=True)


def composed(*overrides: str) -> dict:
    return resolve(compose(list(overrides)))


def test_run_id_is_stable_and_tracks_what_is_trained():
    base = composed("attention=se")
    assert run_id(base) == run_id(composed("attention=se"))
    assert len(run_id(base)) == 12
    reordered = dict(reversed(list(base.items())))
    assert run_id(reordered) == run_id(base)
    for change in (
        "seed=1",
        "attention.ratio=8",
        "optim.lr=0.05",
        "attention=cbam",
        "trainer.max_epochs=3",
        "ablation=cbam_arrangement",
    ):
        assert run_id(composed("attention=se", change)) != run_id(base), change


def test_run_id_ignores_outputs_logging_and_loader_workers():
    base = run_id(composed("attention=se"))
    for change in (
        "output_dir=/elsewhere",
        "results_dir=/tmp/r",
        "logger=csv",
        "logger.project=other",
        "num_workers=7",
        "run_name=mine",
        "data.root=/mnt/data/cifar10",
        "data.resident=true",  # no "+": every data file has the key
        "trainer.enable_progress_bar=false",
        "trainer.max_time=00:00:45:00",
        "verbose=true",
    ):
        assert run_id(composed("attention=se", change)) == base, change


def test_run_id_ignores_how_an_ablation_reports_its_runs():
    # Rows, source, paper, baseline and unsupported protocols are table metadata: editing
    # them must not orphan the runs already done.
    base = run_id(composed("ablation=se_reduction", "attention.ratio=8"))
    for change in (
        "source=elsewhere",
        "paper.table=other",
        "variants=[]",
        "baseline=r8",
        "++unsupported.cifar=slow",
    ):
        assert run_id(composed("ablation=se_reduction", "attention.ratio=8", change)) == base


def test_a_run_cut_short_by_the_time_guard_is_not_complete():
    assert is_complete(make_record(epochs=3, max_epochs=3))
    assert not is_complete(make_record(epochs=2, max_epochs=3))
    assert is_complete(make_record(epochs=5, max_epochs=-1))  # no epoch limit
    failed = make_record(status="failed: RuntimeError: boom", top1=None, top5=None)
    assert not is_complete(failed)
