"""End-to-end training through the real composed config, shrunk to a few batches."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image

import modules
from bench.analysis import build_from_record, load_weights
from bench.config import ConfigError, compose, resolve
from bench.records import read_record, record_path, run_id
from bench.train import train

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette-mini"


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    """A CIFAR-like ImageFolder tree: 10 classes, 8 train / 2 val 32x32 PNGs each."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3)) + 19 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("ATTN_BENCH_CACHE", str(tmp_path / "cache"))


def tiny_overrides(root: Path, out: Path) -> list[str]:
    return [
        "data=imagefolder",
        f"data.root={root}",
        "data.num_classes=10",
        "data.recipe=cifar",
        "data.cache=true",
        "protocol=smoke",
        "skip_done=true",  # these are real runs in miniature: a done one is skipped
        "protocol.batch_size=8",
        "num_workers=0",
        "logger=csv",
        f"output_dir={out / 'outputs'}",
        f"results_dir={out / 'results'}",
    ]


def configure(*overrides: str):
    return compose(list(overrides))


def run_dir_of(cfg) -> Path:
    config = resolve(cfg)
    return Path(config["output_dir"]) / config["ablation"] / run_id(config)


def test_smoke_run_writes_record_wandb_offline_run_and_csv(tiny_tree, tmp_path):
    cfg = configure(*tiny_overrides(tiny_tree, tmp_path), "attention=se", "logger=wandb")
    record = train(cfg)
    path = record_path(tmp_path / "results", "adhoc", record["run_id"])
    assert read_record(path) == record
    assert record["status"] == "done" and record["epochs"] == 1
    assert record["config"]["attention"]["placements"][0]["block"] == "se"
    assert record["attention"] and all(row["block"] == "se" for row in record["attention"])
    assert record["params"] > 270_000 and 0.04 < record["gmacs"] < 0.05  # SE-ResNet-20
    assert 0 <= record["top1"] <= record["top5"] <= 100 and record["throughput"] > 0
    run_dir = run_dir_of(cfg)
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/acc" in metrics.splitlines()[0] and "train/loss" in metrics
    hparams = yaml.safe_load((run_dir / "csv" / "version_0" / "hparams.yaml").read_text())
    # The attention axes are top-level keys for the dashboard, read off the config.
    assert hparams["block"] == "se" and hparams["ratio"] == 16 and hparams["gate"] == "sigmoid"
    # Lightning's ThroughputMonitor logs into the same CSV.
    assert "train/samples" in metrics.splitlines()[0]
    # A finished smoke run keeps no weights (trainer.keep_checkpoints: none).
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final.pt").exists()


class FailIfTrained(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        raise AssertionError("a done run was trained again")


def test_done_run_is_skipped(tiny_tree, tmp_path):
    cfg = configure(*tiny_overrides(tiny_tree, tmp_path), "trainer.limit_train_batches=1")
    first = train(cfg)
    assert train(cfg, callbacks=[FailIfTrained()]) == first


class StopAfterFirstEpoch(pl.Callback):
    """Stops training the way the ``trainer.max_time`` guard does, at an epoch's end."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


class EpochsTrained(pl.Callback):
    def __init__(self):
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(trainer.current_epoch)


def test_run_cut_short_by_the_time_guard_resumes_when_started_again(tiny_tree, tmp_path):
    overrides = [*tiny_overrides(tiny_tree, tmp_path), "trainer.max_epochs=2"]
    cut = train(configure(*overrides, "trainer.limit_train_batches=1"), [StopAfterFirstEpoch()])
    assert cut["status"] == "done" and (cut["epochs"], cut["max_epochs"]) == (1, 2)
    # Unfinished: its resumable checkpoint stays, whatever keep_checkpoints says.
    run_dir = Path(cut["config"]["output_dir"]) / "adhoc" / cut["run_id"]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    # A larger guard is the same run (same id), so it finds the checkpoint and goes on.
    longer = configure(*overrides, "trainer.limit_train_batches=1", "trainer.max_time=00:01:00:00")
    epochs = EpochsTrained()
    finished = train(longer, callbacks=[epochs])
    assert finished["run_id"] == cut["run_id"]
    assert epochs.seen == [1] and finished["epochs"] == 2
    assert not (run_dir / "checkpoints").exists()
    assert train(longer, callbacks=[FailIfTrained()])["epochs"] == 2


def test_unused_attention_keys_do_not_split_runs():
    plain = resolve(configure("attention=none"))
    with_ratio = resolve(configure("attention=none", "++attention.ratio=8"))
    assert "ratio" not in with_ratio["attention"]
    assert run_id(plain) == run_id(with_ratio)
    assert "pool" not in resolve(configure("attention=eca", "++attention.pool=max"))["attention"]
    # A key used through a nested interpolation counts as used (eca_se_variants' presets).
    variants = resolve(configure("ablation=eca_se_variants", "attention.variant=eca_ns"))
    assert variants["attention"]["variant"] == "eca_ns"
    assert variants["attention"]["placements"][0]["block"] == "eca"


class KillAtEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def test_resumed_run_matches_an_uninterrupted_one(tiny_tree, tmp_path):
    common = [
        "attention=cbam",
        "trainer.keep_checkpoints=final",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.num_sanity_val_steps=1",
    ]
    whole = train(configure(*tiny_overrides(tiny_tree, tmp_path / "a"), *common))
    cfg = configure(*tiny_overrides(tiny_tree, tmp_path / "b"), *common)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, callbacks=[KillAtEpoch(1)])
    # Stopped by something outside the experiment: no record among the results, but one
    # beside the checkpoints that says why.
    assert not record_path(tmp_path / "b" / "results", "adhoc", whole["run_id"]).exists()
    assert read_record(run_dir_of(cfg) / "record.json").status == "failed: RuntimeError: killed"
    resumed = train(cfg)
    assert resumed["status"] == "done" and resumed["epochs"] == 2
    for key in ("top1", "top5", "best_top1", "best_top5"):
        assert resumed[key] == whole[key], key
    weights = [
        torch.load(run_dir_of(c) / "final.pt", weights_only=True)
        for c in (configure(*tiny_overrides(tiny_tree, tmp_path / "a"), *common), cfg)
    ]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    # The second attempt started at epoch 1: its CSV log has no epoch-0 rows.
    second = (run_dir_of(cfg) / "csv" / "version_1" / "metrics.csv").read_text().splitlines()
    epochs = {row.split(",")[0] for row in second[1:]} - {""}
    assert epochs == {"1"}


@pytest.mark.parametrize("keep", ["final", "all"])
def test_a_finished_run_keeps_its_final_weights_only(tiny_tree, tmp_path, keep):
    overrides = [*tiny_overrides(tiny_tree, tmp_path), "attention=se"]
    overrides.append("trainer.limit_train_batches=2")
    cfg = configure(*overrides, f"trainer.keep_checkpoints={keep}")
    record = train(cfg)
    run_dir = run_dir_of(cfg)
    final = run_dir / "final.pt"
    weights = torch.load(final, weights_only=True)
    # The backbone's plain state dict, no optimizer state: bench.analysis loads it.
    model = load_weights(build_from_record(record.model_dump()), final)
    assert weights.keys() == model.state_dict().keys()
    assert not any(key.startswith("model.") for key in weights)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("*")) if keep == "all" else []
    assert kept == (["epoch000.ckpt", "last.ckpt"] if keep == "all" else [])
    assert (run_dir / "checkpoints").exists() == (keep == "all")
    # keep_checkpoints is not part of the run: the same id either way.
    other = resolve(configure(*overrides, "trainer.keep_checkpoints=none"))
    assert run_id(other) == record["run_id"]


def test_bad_keep_checkpoints_and_precision_are_one_line_errors(tiny_tree, tmp_path):
    for override, message in (
        ("trainer.keep_checkpoints=some", "trainer.keep_checkpoints='some' is not one of"),
        ("trainer.precision=bf17", "trainer.precision='bf17' is not one of auto"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            train(configure(*tiny_overrides(tiny_tree, tmp_path), override))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "outputs").exists()


def test_cifar_fast_protocol_smoke_on_the_cpu(tiny_tree, tmp_path):
    """The GPU protocol's code path (ResNet-18 CIFAR stem, resident data, bf16-mixed where
    the CPU has it, compile: auto) for two batches."""
    overrides = [
        "protocol=cifar_fast" if o == "protocol=smoke" else o
        for o in tiny_overrides(tiny_tree, tmp_path)
    ]
    cfg = configure(
        *overrides,
        "trainer.limit_train_batches=2",
        "trainer.max_epochs=1",
        "schedule.warmup_epochs=0.5",  # the protocol's 3 must be shorter than the run
        "trainer.limit_val_batches=1",
    )
    record = train(cfg)
    assert record["status"] == "done" and record["epochs"] == 1
    config = record["config"]
    assert config["protocol"]["name"] == "cifar_fast" and config["model"]["name"] == "resnet18"
    assert config["model"]["cifar_stem"] and config["data"]["resident"]
    assert config["trainer"]["precision"] == "bf16-mixed"  # set by the protocol
    assert config["trainer"]["compile"] in (True, False)  # auto, resolved
    assert (run_dir_of(cfg) / "final.pt").exists()


class PoisonWeights(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            with torch.no_grad():
                pl_module.model.fc.weight.fill_(float("nan"))


def test_nan_loss_leaves_a_failed_record(tiny_tree, tmp_path):
    cfg = configure(*tiny_overrides(tiny_tree, tmp_path))
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 0, batch 1"):
        train(cfg, callbacks=[PoisonWeights()])
    config = resolve(cfg)
    record = read_record(record_path(tmp_path / "results", "adhoc", run_id(config)))
    assert record["status"].startswith("failed: FloatingPointError: training loss is nan")
    assert record["top1"] is None and record["params"] > 0


def test_missing_dataset_fails_at_once_naming_the_path(tiny_tree, tmp_path):
    missing = tmp_path / "no-such-data"
    overrides = tiny_overrides(tiny_tree, tmp_path) + [f"data.root={missing}"]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=str(missing / "train")):
        train(configure(*overrides))
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["attention=se", "attention.position=sideways"], "position"),
        (["attention=cbam", "++attention.placements.0.args.bogus=1"], "bogus"),
        (["attention=se", "attention.stages=[4]"], "stage 4"),
        (["optim._target_=torch.optim.Lion"], "optim._target_='torch.optim.Lion'"),
        (["schedule=multistep", "schedule.milestones=[1.5]"], "milestones"),
    ],
)
def test_bad_config_fails_before_any_work(tiny_tree, tmp_path, overrides, message):
    cfg = configure(*tiny_overrides(tiny_tree, tmp_path), *overrides)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "results").exists()


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"no offline CIFAR-10 copy at {CIFAR10}")
def test_offline_cifar10_copy_with_attention(tmp_path):
    cfg = configure(
        *tiny_overrides(CIFAR10, tmp_path),
        "data=cifar10_images",
        f"data.root={CIFAR10}",
        "data.subset={per_class: 4}",
        "data.val_subset={per_class: 2}",
        "attention=eca",
    )
    record = train(cfg)
    assert record["status"] == "done"
    assert record["config"]["data"]["name"] == "cifar10"
    assert {row["block"] for row in record["attention"]} == {"eca"}


def test_cifar100_standin_in_torchvision_layout(tmp_path, cifar100_standin):
    cifar100_standin(tmp_path / "data", per_class=8, classes=4)
    # torchvision-layout CIFAR has its own class count and is uint8 in memory (no cache key)
    own = ("data.cache=true", "data.num_classes=10")
    overrides = [o for o in tiny_overrides(tmp_path / "data", tmp_path) if o not in own]
    cfg = configure(
        *overrides,
        "data=cifar100",
        f"data.root={tmp_path / 'data'}",
        "attention=cbam",
    )
    record = train(cfg)
    assert record["status"] == "done"
    assert record["config"]["data"]["name"] == "cifar100"
    assert record["config"]["data"]["num_classes"] == 100


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"no Imagenette copy at {IMAGENETTE}")
def test_imagenette_224_resnet18(tmp_path):
    cfg = configure(
        *tiny_overrides(IMAGENETTE, tmp_path),
        "data=imagenette",
        f"data.root={IMAGENETTE}",
        "data.recipe=imagenet",
        "data.cache=false",
        "data.subset={per_class: 1}",
        "data.val_subset={per_class: 1}",
        "model=resnet18",
        "model.cifar_stem=false",  # the smoke protocol's default is CIFAR's
        "attention=se",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    record = train(cfg)
    assert record["status"] == "done"
    assert record["profile"]["input_size"] == [3, 224, 224]
    assert 1.7 < record["gmacs"] < 1.9  # SE-ResNet-18 at 224: ~1.82 GMACs


@pytest.mark.slow
def test_two_process_cpu_ddp(tiny_tree, tmp_path):
    overrides = tiny_overrides(tiny_tree, tmp_path) + [
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "protocol.batch_size=16",
        "trainer.limit_train_batches=2",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "results" / "adhoc").glob("*.json")
    record = read_record(path)
    assert record["status"] == "done" and record["device"].endswith("x2")
    assert record["config"]["trainer"]["strategy"] == "ddp"


@pytest.mark.parametrize("block", modules.available())
def test_every_registered_block_trains_from_its_attention_file(tiny_tree, tmp_path, block):
    """`make train TRAIN_ARGS='attention=<block>'` builds and trains (smoke, one batch)
    with the block where its paper puts it."""
    cfg = configure(
        *tiny_overrides(tiny_tree, tmp_path),
        f"attention={block}",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    record = train(cfg)
    assert record.status == "done"
    assert record.attention and {row["block"] for row in record.attention} == {block}


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["attention=se", "attention.stages=[7]"], "stage 7 is out of range"),
        (["attention=se", "attention.position=middle"], "position='middle'"),
        # An ImageFolder tree has nothing to download (CIFAR would try torchvision's copy).
        (["data=imagefolder", "data.root=/no/such", "data.num_classes=10"], "/no/such/train"),
    ],
)
def test_make_train_reports_a_bad_run_in_one_line(tmp_path, overrides, named):
    """`make train` on a bad placement or missing data: one line, exit 2, no traceback
    (verbose=true shows it); nothing is written."""
    command = [sys.executable, "-m", "bench.train", *overrides, f"output_dir={tmp_path}"]
    env = {**os.environ, "ATTN_BENCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert "Traceback" not in out.stderr + out.stdout
    assert not list(tmp_path.rglob("*.json"))
