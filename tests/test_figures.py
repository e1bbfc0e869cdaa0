"""bench.figures on tiny models and generated images: every figure is written, and the
numbers each function returns are the ones bench.analysis / bench.tables compute."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import figures
from bench.analysis import (
    class_specificity,
    collect,
    hidden_activity,
    load_run,
    query_independence,
)
from bench.config import compose, resolve
from bench.data import CIFAR10_MEAN, CIFAR10_STD, normalize
from bench.records import RunRecord, load_records, run_id, write_record
from bench.tables import build_tables
from modules import build_backbone, inject
from modules.parts import ChannelMLP

CLASSES = ("airplane", "cat", "frog", "ship", "truck")
SIZE = 16  # images: ResNet-20's stages then see 16, 8 and 4 pixels


def write_tree(root: Path, per_class: int = 2) -> Path:
    """``<root>/cifar10/test/<class>/<i>.png``: small images, brighter by class."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        folder = root / "cifar10" / "test" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (SIZE, SIZE, 3)) + 30 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root / "cifar10"


def tiny_record(block: str, top1: float = 50.0) -> dict:
    """A done run record of ResNet-20 with ``block`` from its real attention file, for
    len(CLASSES) classes; the residual branches are not zero-initialised, so the gates of
    an untrained model differ between images."""
    config = resolve(compose([f"attention={block}", "protocol=cpu", "trainer.max_epochs=2"]))
    config["model"]["zero_init_last"] = False
    config["data"]["num_classes"] = len(CLASSES)
    return RunRecord(
        run_id=run_id(config),
        ablation=config["ablation"],
        run_name=config["run_name"],
        status="done",
        config=config,
        params=1,
        gmacs=0.04,
        top1=top1,
        top5=90.0,
        best_top1=top1,
        best_top5=90.0,
        epochs=2,
        max_epochs=2,
        wall_time_s=120.0,
    ).model_dump()


def write_weights(folder: Path) -> Path:
    """Exports every model of FIGURE_MODELS (untrained, seed 0) the way real runs are
    exported: a record and a Lightning-style checkpoint through ``export_weights``."""
    runs = folder.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(figures.FIGURE_MODELS):
        record = tiny_record(name, top1=40.0 + i)
        torch.manual_seed(0)
        model = figures.build_from_record(record)
        checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
        torch.save(checkpoint, runs / f"{name}.ckpt")
        write_record(runs / f"{name}.json", record)
        figures.export_weights(name, runs / f"{name}.json", runs / f"{name}.ckpt", folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    data = write_tree(root)
    weights = write_weights(root / "weights")
    return {
        "root": root,
        "data": data,
        "weights": weights,
        "models": figures.load_models(weights),
        "images": figures.load_images(data, per_class=2),
    }


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_images_reads_the_class_folders_in_order(tiny):
    images = tiny["images"]
    assert images.classes == tuple(sorted(CLASSES)) and len(images) == 2 * len(CLASSES)
    assert images.labels.tolist() == [k for k in range(len(CLASSES)) for _ in range(2)]
    assert images.pixels.dtype == torch.uint8 and images.pixels.shape[1:] == (3, SIZE, SIZE)
    torch.testing.assert_close(images.inputs, normalize(images.pixels, CIFAR10_MEAN, CIFAR10_STD))
    assert images.one_per_class(3).labels.tolist() == [0, 1, 2]
    assert sum(len(x) for x, _ in images.batches(3)) == len(images)
    with pytest.raises(FileNotFoundError, match="no image folder"):
        figures.load_images(tiny["root"] / "nowhere")


def test_exported_weights_load_into_the_model_of_their_record(tiny):
    weights = tiny["weights"]
    state = torch.load(weights / "se.pt", weights_only=True)
    assert not any(key.startswith("model.") for key in state)  # a plain state dict
    trained = tiny["models"]["se"]
    assert trained.label == "ResNet-20 + SE" and trained.block == "se" and trained.top1 == 41.0
    assert trained.schedule.startswith("2 epochs (cpu protocol v2, max_epochs=2: SGD (Nesterov)")
    assert trained.recipe.endswith(("bf16-mixed)", "fp32)"))  # the precision that ran
    assert "top-1 41.00%" in trained.schedule and trained.schedule.startswith(trained.recipe)
    note = figures.models_note(tiny["models"], ["none", "se"])
    assert note == f"{trained.recipe}\ntop-1: ResNet-20 40.00%, ResNet-20 + SE 41.00%"
    x = tiny["images"].inputs[:2]
    again = load_run(json.loads((weights / "se.json").read_text()), weights / "se.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(x), trained.model(x))
    with pytest.raises(FileNotFoundError, match=r"gc\.pt.*bench\.figures export"):
        figures.load_models(weights, names=["se", "gc"])


def test_excitation_and_specificity_figures(tiny, tmp_path):
    se, images = tiny["models"]["se"], tiny["images"]
    numbers = figures.excitation_figure(se, images, tmp_path / "excitation.png")
    assert_png(tmp_path / "excitation.png")
    excitations = numbers["excitations"]
    assert len(excitations) == 9 and numbers["classes"] == [0, 1, 2, 3]  # 4 names present
    for ex in excitations:
        assert ex.classes == tuple(range(len(CLASSES)))  # specificity over every class
        assert numbers["specificity"][ex.path] == class_specificity(ex.mean) > 0
    activity = numbers["activity"]  # SE's bottleneck: 16/16, 32/16, 64/16 hidden units
    assert list(activity) == [ex.path for ex in excitations]
    assert [a.units for a in activity.values()] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert "| 3.2 | 4 |" in figures.activity_markdown(activity)
    by_model = {name: figures.class_excitations(tiny["models"][name].model, images.batches())
                for name in figures.CHANNEL_GATED}  # fmt: skip
    labels = {name: name.upper() for name in by_model}
    spec = figures.specificity_figure(by_model, labels, tmp_path / "spec.png")
    assert_png(tmp_path / "spec.png")
    assert spec["se"] == [(ex.path, ex.specificity) for ex in excitations]
    assert [len(v) for v in spec.values()] == [9, 9, 9]


@pytest.mark.parametrize("block", ["se", "cbam"])
def test_hidden_activity_counts_the_units_that_fire(block):
    model = build_backbone("resnet20_cifar", num_classes=3, zero_init_last=False)
    inject(model, [{"block": block, "stages": [3], "blocks": "first"}])
    images = torch.randn(6, 3, 16, 16)
    (mlp,) = [m for m in model.modules() if isinstance(m, ChannelMLP)]
    with torch.no_grad():
        mlp[0].weight.zero_()
        mlp[0].bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))  # two units always on
    (activity,) = hidden_activity(model, [images]).values()
    assert activity.path == "layer3.0.se.attention.0" and activity.units == 4  # the se slot
    assert activity.active == 2 and activity.fraction == 0.5
    with torch.no_grad():
        mlp[0].bias.fill_(-1.0)  # a dead bottleneck: the gate is sigmoid(bias) for all
    (dead,) = hidden_activity(model, [(images, torch.zeros(6))]).values()
    assert dead.active == 0 and dead.fraction == 0.0
    assert hidden_activity(build_backbone("resnet20_cifar"), [images]) == {}


def test_attention_maps_figure(tiny, tmp_path):
    models, shown = tiny["models"], tiny["images"].one_per_class(3)
    numbers = figures.attention_maps_figure(models, shown, tmp_path / "maps.png")
    assert_png(tmp_path / "maps.png")
    assert set(numbers["cams"]) == set(figures.GRADCAM_MODELS)
    for name, cam in numbers["cams"].items():
        assert cam.shape == (3, SIZE, SIZE) and cam.min() >= 0 and cam.max() <= 1
        probs = figures.probabilities(models[name].model, shown.inputs)
        torch.testing.assert_close(numbers["probabilities"][name], probs[range(3), shown.labels])
    spatial = numbers["spatial"]  # CBAM's gate at the last unit of each stage
    assert [p.split(".")[:2] for p in spatial] == [
        ["layer1", "2"],
        ["layer2", "2"],
        ["layer3", "2"],
    ]
    assert [tuple(t.shape) for t in spatial.values()] == [(3, 16, 16), (3, 8, 8), (3, 4, 4)]


def test_non_local_figure(tiny, tmp_path):
    trained, images = tiny["models"]["non_local"], tiny["images"]
    numbers = figures.non_local_figure(trained, images, tmp_path / "nl.png")
    assert_png(tmp_path / "nl.png")
    assert numbers["path"] == "layer2.2.attention.0" and numbers["query_shape"] == (8, 8)
    assert numbers["maps"].shape == (4, 5, 4, 4) and numbers["key_shape"] == (4, 4)
    torch.testing.assert_close(numbers["maps"].sum(dim=(-1, -2)), torch.ones(4, 5))
    (rows,) = collect(trained.model, images.inputs, kinds=("attention",), queries="all")
    expected = query_independence(rows.tensor)
    torch.testing.assert_close(numbers["independence"], expected)
    assert numbers["mean_independence"] == pytest.approx(expected.mean().item())
    assert 0 <= numbers["init_independence"] <= 1


def test_receptive_field_figure(tiny, tmp_path):
    models = {name: tiny["models"][name] for name in ("none", "non_local")}
    shown = tiny["images"].one_per_class(1)
    numbers = figures.receptive_field_figure(models, shown, tmp_path / "rf.png", trials=1)
    assert_png(tmp_path / "rf.png")
    assert list(numbers["none"]) == ["layer1", "layer2", "layer3"]
    assert [numbers["none"][k]["theoretical"] for k in numbers["none"]] == [
        (15, 15),
        (37, 37),
        (81, 81),
    ]
    for layer, entry in numbers["none"].items():
        assert entry["change"].shape == (SIZE, SIZE)
        assert entry["empirical"][0] <= min(entry["theoretical"][0], SIZE), layer
    # the theoretical box of a 'same'-padded net is centred on unit * jump
    assert figures.theoretical_box(
        figures.theoretical_receptive_field(models["none"].model, "layer2"), (4, 4)
    ) == (8 - 18, 8 - 18, 8 + 18, 8 + 18)


def cifar_record(block: str, seed: int, top1: float, throughput: float, params: int) -> dict:
    variants = [
        {"label": "ResNet", "ref": "resnet56", "match": {"attention.block": "none"}},
        {"label": "+ SE", "ref": {"cifar-cifar10": "resnet56_se"},
         "match": {"attention.block": "se"}},
    ]  # fmt: skip
    config = {
        "ablation": "cifar_blocks",
        "seed": seed,
        "attention": {"block": block},
        "model": {"name": "resnet20_cifar"},
        "data": {"name": "cifar10"},
        "protocol": {"name": "cpu"},
        "paper": {"name": "simam_cifar", "table": "cifar", "settings": ["cifar-cifar10"]},
        "variants": variants,
    }
    return RunRecord(
        run_id=run_id(config), ablation="cifar_blocks", run_name=f"{block}-{seed}",
        status="done", config=config, params=params, gmacs=0.04, top1=top1, top5=99.0,
        best_top1=top1, best_top5=99.0, epochs=7, max_epochs=7, throughput=throughput,
    ).model_dump()  # fmt: skip


def write_cifar_runs(runs: Path) -> Path:
    """Four done records of a two-row ``cifar_blocks`` table (baseline and SE, seeds 0 and
    1): top-1 80/81 and 80.5/82.5, so SE's paired differences are +0.5 and +1.5."""
    for record in (
        cifar_record("none", 0, 80.0, 400.0, 1000),
        cifar_record("none", 1, 81.0, 400.0, 1000),
        cifar_record("se", 0, 80.5, 300.0, 1010),
        cifar_record("se", 1, 82.5, 300.0, 1010),
    ):
        write_record(runs / "cifar_blocks" / f"{record['run_id']}.json", record)
    return runs


@pytest.fixture
def cifar_runs(tmp_path) -> Path:
    return write_cifar_runs(tmp_path / "runs")


def test_cost_gain_figure_from_run_records(cifar_runs, tmp_path):
    runs = cifar_runs
    (point,) = figures.cost_gain_figure(runs, tmp_path / "cost.png")
    assert_png(tmp_path / "cost.png")
    assert point["variant"] == "+ SE" and point["baseline"] == "ResNet"
    assert point["delta"] == pytest.approx(1.0) and point["n_pairs"] == 2
    assert point["low"] < 1.0 < point["high"]  # paired differences 0.5 and 1.5
    assert point["params_pct"] == pytest.approx(1.0)
    assert point["throughput_pct"] == pytest.approx(75.0)
    assert figures.cost_gain_figure(runs, tmp_path / "none.png", ablations=["other"]) is None
    assert not (tmp_path / "none.png").exists()
    row = "| cifar_blocks/cpu-cifar10-resnet20_cifar | + SE | +1.00 [-5.35, +7.35] | within noise"
    assert row + " | +1.0% | 75% |" in figures.cost_gain_markdown([point])


def test_ablation_report_tables(cifar_runs):
    (table,) = build_tables(load_records(cifar_runs))
    paper = figures.paper_table_markdown(table)
    assert paper.startswith("**simam_cifar, table `cifar`**: Table 2")
    assert "| `resnet56` | resnet56_cifar | none | 93.58 | 72.24 | ResNet |" in paper
    assert "| `resnet56_se` | resnet56_cifar | se | 93.69 | 72.84 | + SE (cifar-cifar10) |" in paper
    stats = figures.seed_statistics_markdown(table)
    assert "| ResNet | s0: 80.00, s1: 81.00 | 80.50 | 0.71 | [" in stats
    assert "| + SE | s0: 80.50, s1: 82.50 | 81.50 | 1.41 | [" in stats
    assert "| s0: +0.50, s1: +1.50 | +1.00 | [" in stats and "| within noise |" in stats


def test_make_figures_from_the_command_line(tiny, tmp_path, capsys):
    out = tmp_path / "figures"
    args = ["--out", str(out), "--weights", str(tiny["weights"]), "--data", str(tiny["data"])]
    args += ["--runs", str(tmp_path / "no-runs"), "--per-class", "2", "--rf-images", "1"]
    assert figures.main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "README.md",
        "excitation_se.png",
        "class_specificity.png",
        "attention_maps.png",
        "non_local.png",
        "receptive_fields.png",
    }
    for name in names - {"README.md"}:
        assert_png(out / name)
    readme = (out / "README.md").read_text()
    assert "| `cbam` | ResNet-20 + CBAM | 2 epochs (cpu protocol" in readme
    assert "| theoretical | 15x15 | 37x37 | 81x81 |" in readme
    assert figures.main(["--weights", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "missing model files" in capsys.readouterr().err


def test_export_from_the_command_line(tiny, tmp_path, capsys):
    runs = tiny["weights"].parent / "runs"
    args = ["export", "eca", str(runs / "eca.json"), str(runs / "eca.ckpt")]
    assert figures.main([*args, "--weights", str(tmp_path)]) == 0
    assert (tmp_path / "eca.pt").is_file() and (tmp_path / "eca.json").is_file()
    # weights that do not fit the record's model are refused
    bad = ["export", "se", str(runs / "se.json"), str(runs / "eca.ckpt")]
    assert figures.main([*bad, "--weights", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "se.pt").exists()
