"""The notebooks run from a clean state, headless, on records and weights the tests make
(tiny untrained models, generated images), and leave no error output."""

from pathlib import Path

import pytest

from bench import figures

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_figures import write_cifar_runs, write_tree, write_weights  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def outputs(notebook, kind: str) -> list:
    """Every output of a cell that carries ``kind`` (e.g. ``image/png``)."""
    return [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if kind in output.get("data", {})
    ]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel shares two cores with the rest
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_ablation_report_runs_on_generated_records(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_BENCH_RUNS", str(write_cifar_runs(tmp_path / "runs")))
    monkeypatch.setenv("ATTN_BENCH_ABLATION", "cifar_blocks")
    executed = tmp_path / "ablation_report.ipynb"
    notebook = figures.execute_notebook(NOTEBOOKS / "ablation_report.ipynb", out=executed)
    assert figures.error_outputs(notebook) == []
    assert executed.is_file()
    shown = "".join(o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown"))
    assert "# cifar_blocks (cpu-cifar10-resnet20_cifar)" in shown  # the table
    assert "**simam_cifar, table `cifar`**" in shown  # the paper's table
    assert "| s0: +0.50, s1: +1.50 | +1.00 |" in shown  # the statistics
    assert len(outputs(notebook, "image/png")) == 3  # top-1, vs GMACs, cost vs gain


def test_attention_maps_runs_on_tiny_models(tmp_path, monkeypatch):
    write_tree(tmp_path)
    monkeypatch.setenv("ATTN_BENCH_DATA", str(tmp_path))
    monkeypatch.setenv("ATTN_BENCH_WEIGHTS", str(write_weights(tmp_path / "weights")))
    monkeypatch.setenv("ATTN_BENCH_PER_CLASS", "2")
    monkeypatch.setenv("ATTN_BENCH_RF_IMAGES", "1")
    notebook = figures.execute_notebook(
        NOTEBOOKS / "attention_maps.ipynb", out=tmp_path / "attention_maps.ipynb"
    )
    assert figures.error_outputs(notebook) == []
    assert len(outputs(notebook, "image/png")) == 5  # one per figure
    shown = "".join(o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown"))
    assert "| `non_local` | ResNet-20 + non-local | 2 epochs (cpu protocol" in shown
    assert "| theoretical | 15x15 | 37x37 | 81x81 |" in shown
    assert "Query independence" in shown
