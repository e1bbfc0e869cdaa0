"""bench.gpu_check: the dry run takes the GPU check's code path on the CPU at tiny sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import gpu_check


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    """10 classes, 4 train / 2 val 32x32 PNGs each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in range(10):
            folder = tmp_path / "tiny" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3)) + 19 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return tmp_path / "tiny"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_BENCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_dry_run_writes_the_report(tiny_tree, tmp_path):
    data = f"data=imagefolder data.root={tiny_tree} data.num_classes=10 data.recipe=cifar"
    data += " data.cache=true data.val_split=val"
    out = tmp_path / "report"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--train-args", data]) == 0
    report = (out / "cpu.md").read_text()
    assert "DRY RUN" in report and "## Errors" not in report
    # bench.speed's model section, our side, with its full report kept beside.
    assert (out / "cpu-speed.md").exists() and (out / "cpu-speed.csv").exists()
    assert "| resnet20_cifar | cbam |" in report
    # The cifar_fast run: done, one epoch, its numbers in the table.
    (fast,) = [line for line in report.splitlines() if line.startswith("| done |")]
    cells = [cell.strip() for cell in fast.strip("|").split("|")]
    row = dict(zip(gpu_check.FAST_COLUMNS, cells, strict=True))
    assert row["epochs"] == "1/1" and 0 <= float(row["top1"]) <= 100
    assert row["target"].endswith("missed")  # two batches do not reach 94%
    assert row["mfu_pct"] == "-"  # no peak FLOP/s for a CPU
    record = json.loads((out / "cpu-cifar_fast.json").read_text())
    assert record["config"]["protocol"]["name"] == "cifar_fast" and record["status"] == "done"


def test_missing_data_fails_before_any_timing(tmp_path, capsys):
    args = f"data=imagefolder data.root={tmp_path / 'none'} data.num_classes=10"
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--train-args", args]) == 2
    assert "cifar_fast cannot run" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))
