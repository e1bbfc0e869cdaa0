"""Data modules on tiny generated data (and a few images of the offline CIFAR-10 copy)."""

import dataclasses
import os
import pickle
import re
import socket
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.datasets.cifar as tv_cifar
from omegaconf import OmegaConf
from PIL import Image

import bench.data as data
from bench.data import (
    DATASETS,
    MissingData,
    build_datamodule,
    check_data,
    random_crop_flip,
    select_subset,
)

DATA_YAML = Path(__file__).resolve().parents[1] / "experiments" / "data"
OFFLINE_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CLASSES = ("cat", "dog", "emu")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("ATTN_BENCH_CACHE", str(path))
    return path


def write_tree(root, splits=("train", "val"), per_class=6, size=(32, 32), fmt="png"):
    """<root>/<split>/<class>/<i>.<fmt> with random pixels; returns {path: (H, W, 3) array}."""
    rng = np.random.default_rng(1)
    pixels = {}
    for split in splits:
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                path = root / split / cls / f"{i:02d}.{fmt}"
                Image.fromarray(array).save(path)
                pixels[str(path)] = array
    return pixels


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    return root, write_tree(root)


def folder_cfg(root, **overrides):
    cfg = {"name": "imagefolder", "root": str(root), "recipe": "cifar", "num_classes": 3}
    return {**cfg, **overrides}


def first_batch(loader):
    return next(iter(loader))


def test_cache_is_built_once_and_reused(tree, cache_dir, monkeypatch):
    root, pixels = tree
    decoded = []
    real_decode = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda p: decoded.append(p) or real_decode(p))

    dm = build_datamodule(folder_cfg(root, cache=True), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert len(decoded) == 36
    files = sorted(cache_dir.iterdir())
    assert len(files) == 4 and not any(f.name.endswith(".tmp") for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]

    images = dm.datasets["train"].images
    assert isinstance(images, np.memmap) and images.dtype == np.uint8
    assert images.shape == (18, 3, 32, 32)
    first = sorted(p for p in pixels if "/train/" in p)[0]
    assert np.array_equal(images[0], pixels[first].transpose(2, 0, 1))

    again = build_datamodule(folder_cfg(root, cache=True), batch_size=4, num_workers=0)
    again.setup("fit")
    assert len(decoded) == 36  # nothing decoded the second time
    assert sorted(cache_dir.iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # Editing an image changes the key: that split is decoded again.
    os.utime(first, ns=(1, 1))
    build_datamodule(folder_cfg(root, cache=True), batch_size=4, num_workers=0).setup("fit")
    assert len(decoded) == 36 + 18


def test_cached_and_uncached_give_identical_eval_tensors(tree):
    root, _ = tree
    cached = build_datamodule(folder_cfg(root, cache=True), batch_size=9, num_workers=0)
    plain = build_datamodule(folder_cfg(root, cache=False), batch_size=9, num_workers=0)
    for dm in (cached, plain):
        dm.setup("fit")
    raw, labels = first_batch(cached.val_dataloader())
    assert raw.dtype == torch.uint8 and raw.shape == (9, 3, 32, 32)
    images, labels = cached.on_after_batch_transfer((raw, labels), 0)
    want_images, want_labels = first_batch(plain.val_dataloader())
    assert images.dtype == torch.float32
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    # Normalised with the recipe's statistics (CIFAR-10's for the cifar recipe).
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(images * std + mean, raw.float() / 255, atol=1e-6)


def find_window(padded, out):
    """(top, left, flipped) of the window of `padded` (C, H+2p, W+2p) that `out` is."""
    _, h, w = out.shape
    for top in range(padded.shape[1] - h + 1):
        for left in range(padded.shape[2] - w + 1):
            window = padded[:, top : top + h, left : left + w]
            for flipped in (False, True):
                if torch.equal(window.flip(-1) if flipped else window, out):
                    return top, left, flipped
    return None


def test_batch_crop_flip_is_a_valid_crop_and_flip():
    images = torch.randint(1, 256, (64, 3, 12, 12), dtype=torch.uint8)  # no zeros inside
    out = random_crop_flip(images, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    windows = [find_window(padded[i], out[i]) for i in range(len(images))]
    assert all(w is not None for w in windows)
    tops, lefts, flips = zip(*windows, strict=True)
    assert set(tops) <= set(range(9)) and len(set(tops)) > 4 and len(set(lefts)) > 4
    assert any(flips) and not all(flips)


def test_augmentation_runs_only_while_training(tree):
    root, _ = tree
    dm = build_datamodule(folder_cfg(root), batch_size=18, num_workers=0)
    dm.setup("fit")
    batch = first_batch(dm.train_dataloader())
    plain = dm.on_after_batch_transfer(batch, 0)  # no trainer: evaluation behaviour
    dm.trainer = SimpleNamespace(training=True)
    augmented = dm.on_after_batch_transfer(batch, 0)
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain[0])
    assert augmented[0].shape == plain[0].shape == (18, 3, 32, 32)
    assert torch.equal(augmented[1], plain[1])
    assert not torch.equal(augmented[0], plain[0])


class Recorder(pl.LightningModule):
    """Keeps the batches Lightning hands to the steps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch[0])
        return self.weight.square().sum()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_calls_the_hook_and_augments_training_batches_only(tree):
    root, _ = tree
    cfg = folder_cfg(root, val_subset={"per_class": 2})
    dm = build_datamodule(cfg, batch_size=6, num_workers=0)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen["train"]) == 3 and len(model.seen["val"]) == 1
    reference = dm.on_after_batch_transfer(first_batch(dm.val_dataloader()), 0)[0]
    assert torch.equal(model.seen["val"][0], reference)
    train = torch.cat(model.seen["train"])
    assert train.dtype == torch.float32 and train.shape == (18, 3, 32, 32)
    # Shuffled and augmented: no training image equals an un-augmented one.
    clean = dm.on_after_batch_transfer(dm.datasets["train"].__getitems__(range(18)), 0)[0]
    matches = sum(torch.equal(a, b) for a in train for b in clean)
    assert matches < 3


def test_subsets_are_stratified_and_reproducible():
    labels = np.repeat(np.arange(4), [10, 7, 3, 12])
    picked = select_subset(labels, {"per_class": 3}, seed=5)
    assert np.array_equal(picked, select_subset(labels, {"per_class": 3}, seed=5))
    assert np.all(np.diff(picked) > 0)
    assert np.bincount(labels[picked]).tolist() == [3, 3, 3, 3]
    assert not np.array_equal(picked, select_subset(labels, {"per_class": 3}, seed=6))
    half = select_subset(labels, 0.5, seed=0)
    assert np.bincount(labels[half]).tolist() == [5, 4, 2, 6]  # rounded half up
    assert select_subset(labels, None, seed=0) is None and select_subset(labels, 1.0, 0) is None
    # A class's pick does not depend on the other classes.
    without_first = labels[labels != 0]
    again = select_subset(without_first, {"per_class": 3}, seed=5) + 10
    assert np.array_equal(again, picked[3:])
    for bad in (0, 1.5, {"per_class": 0}, {"n": 3}, True):
        with pytest.raises(ValueError, match="subset"):
            select_subset(labels, bad, seed=0)


def test_subset_in_the_datamodule(tree):
    root, _ = tree
    cfg = folder_cfg(root, subset={"per_class": 2}, val_subset=0.5)
    dm = build_datamodule(cfg, batch_size=2, num_workers=0, seed=3)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert np.bincount(train.labels).tolist() == [2, 2, 2]
    assert np.bincount(val.labels).tolist() == [3, 3, 3]
    twin = build_datamodule(cfg, batch_size=2, num_workers=0, seed=3)
    twin.setup("fit")
    assert np.array_equal(np.asarray(twin.datasets["train"].images), np.asarray(train.images))


def test_cifar100_in_torchvision_layout(tmp_path, cifar100_standin):
    arrays = cifar100_standin(tmp_path)
    cfg = {"name": "cifar100", "format": "torchvision", "root": str(tmp_path)}
    dm = build_datamodule(cfg, batch_size=5, num_workers=0)
    assert dm.num_classes == 100 and dm.image_size == 32
    assert dm.mean == data.CIFAR100_MEAN
    dm.check()
    dm.setup("fit")
    images, labels = dm.datasets["val"].__getitems__(list(range(15)))
    assert images.dtype == torch.uint8
    assert np.array_equal(images.numpy(), arrays["test"][0])
    assert np.array_equal(labels.numpy(), arrays["test"][1])
    batch = first_batch(dm.train_dataloader())
    assert batch[0].shape == (5, 3, 32, 32) and batch[0].dtype == torch.uint8
    assert len(dm.train_dataloader()) == 3  # 15 images, drop_last

    sub = build_datamodule({**cfg, "subset": {"per_class": 1}}, batch_size=2, num_workers=0)
    sub.setup("fit")
    assert sorted(sub.datasets["train"].labels.tolist()) == [0, 1, 2, 3, 4]


def test_missing_data_fails_at_once_naming_the_path(tmp_path, cache_dir):
    nowhere = tmp_path / "nowhere"
    dm = build_datamodule({"name": "cifar100", "root": str(nowhere)}, batch_size=2)
    with pytest.raises(FileNotFoundError) as err:
        dm.check()
    message = str(err.value)
    assert str(nowhere / "cifar-100-python") in message and "data.download=true" in message
    assert "\n" not in message
    cifar10 = build_datamodule({"name": "cifar10", "root": str(nowhere)}, batch_size=2)
    with pytest.raises(FileNotFoundError, match="data=cifar10_images"):
        cifar10.check()  # the torchvision copy is missing: the offline JPEG copy is named
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")
    # With download=true check() passes (prepare_data would fetch) but setup still refuses.
    eager = build_datamodule(
        {"name": "cifar100", "root": str(nowhere), "download": True}, batch_size=2
    )
    eager.check()
    with pytest.raises(FileNotFoundError):
        eager.setup("fit")

    dm = build_datamodule(folder_cfg(nowhere), batch_size=2)
    with pytest.raises(FileNotFoundError, match=re.escape(str(nowhere / "train"))):
        dm.check()
    assert not nowhere.exists() and not cache_dir.exists()


def write_cifar10_standin(root, per_class=2):
    """torchvision's ``cifar-10-batches-py/`` layout under `root` (same files and keys),
    `per_class` random images of each class in every batch; returns the test labels."""
    rng = np.random.default_rng(3)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)]}, f)
    labels = [c for c in range(10) for _ in range(per_class)]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": labels}, f)
    return labels


def offline_cifar10_cfg(tmp_path, monkeypatch):
    """data=cifar10_images with ATTN_BENCH_DATA pointing where there is no copy."""
    monkeypatch.setenv("ATTN_BENCH_DATA", str(tmp_path / "offline"))
    cfg = OmegaConf.to_container(OmegaConf.load(DATA_YAML / "cifar10_images.yaml"), resolve=True)
    return cfg, tmp_path / "offline" / "cifar10"


class FakeCIFAR10(tv_cifar.CIFAR10):
    """torchvision's CIFAR10 whose download writes a stand-in instead of fetching."""

    roots: list = []

    def __init__(self, root, train=True, download=False):
        FakeCIFAR10.roots.append(root)
        write_cifar10_standin(Path(root))


def test_a_missing_cifar10_copy_is_downloaded_into_the_cache(tmp_path, monkeypatch, cache_dir):
    cfg, missing = offline_cifar10_cfg(tmp_path, monkeypatch)
    FakeCIFAR10.roots = []
    fake = dataclasses.replace(DATASETS["cifar10"], torchvision=FakeCIFAR10)
    monkeypatch.setitem(DATASETS, "cifar10", fake)
    dm = build_datamodule(cfg, batch_size=4, num_workers=0)
    dm.check()  # passes: prepare_data will download
    assert FakeCIFAR10.roots == []
    with pytest.raises(MissingData, match=re.escape(str(missing))):
        dm.check(allow_download=False)

    dm.prepare_data()
    assert len(FakeCIFAR10.roots) == 1  # one download, into a temporary folder
    target = cache_dir / "torchvision" / "cifar-10-batches-py"
    assert sorted(p.name for p in target.iterdir())[:2] == ["batches.meta", "data_batch_1"]
    assert [p.name for p in target.parent.iterdir()] == ["cifar-10-batches-py"]  # no .tmp
    assert (dm.format, dm.root) == ("torchvision", cache_dir / "torchvision")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 100 and len(dm.datasets["val"]) == 20
    images, labels = first_batch(dm.train_dataloader())
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8

    # The next run (and a sweep's check) finds the copy without downloading again.
    again = build_datamodule(cfg, batch_size=4, num_workers=0)
    again.check(allow_download=False)
    assert again.format == "torchvision"
    check_data(cfg)
    assert len(FakeCIFAR10.roots) == 1


def test_offline_the_missing_copy_is_one_line_naming_the_paths(tmp_path, monkeypatch, cache_dir):
    cfg, missing = offline_cifar10_cfg(tmp_path, monkeypatch)
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    # torchvision's own CIFAR10(download=True) runs; only its network step is replaced.
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    dm = build_datamodule(cfg, batch_size=4, num_workers=0)
    with pytest.raises(MissingData) as err:
        dm.prepare_data()
    message = str(err.value)
    assert len(calls) == 1 and "\n" not in message
    assert str(missing) in message and str(cache_dir / "torchvision") in message
    assert "no network" in message and "Name or service not known" in message
    assert "ATTN_BENCH_DATA" in message and "data=cifar10_images" not in message
    assert not list((cache_dir / "torchvision").iterdir())  # no half copy left behind

    with pytest.raises(ValueError, match="no network"):
        check_data(cfg)
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        check_data(cfg, download=False)
    assert len(calls) == 2  # check_data(download=False) does not try


def test_check_data_is_cheap_and_names_bad_configs(tree, monkeypatch):
    root, _ = tree
    monkeypatch.setattr(data, "decode_image", lambda p: pytest.fail("decoded an image"))
    check_data(folder_cfg(root, cache=True))
    with pytest.raises(ValueError, match="3 class folders"):
        check_data(folder_cfg(root, num_classes=4))
    with pytest.raises(ValueError, match="unknown data keys"):
        check_data({**folder_cfg(root), "shuffle": True})
    with pytest.raises(ValueError, match=re.escape(str(root / "nope"))):
        check_data(folder_cfg(root, train_split="nope"))


def test_folder_problems_are_named(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ValueError, match="3 class folders"):
        build_datamodule(folder_cfg(root, num_classes=4), batch_size=2).check()
    with pytest.raises(ValueError, match="fewer than batch_size"):
        build_datamodule(folder_cfg(root), batch_size=19, num_workers=0).setup("fit")
    odd = tmp_path / "odd"
    write_tree(odd, size=(40, 32))
    with pytest.raises(ValueError, match="32x32"):
        build_datamodule(folder_cfg(odd, cache=True), batch_size=2, num_workers=0).setup("fit")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"name": "svhn"}, "cifar100"),
        ({"format": "lmdb"}, "torchvision"),
        ({"recipe": "autoaugment"}, "imagenet"),
        ({"shuffle": True}, "subset"),
        ({"subset": 2}, "fraction"),
        ({"num_classes": None}, "num_classes"),
        ({"recipe": "imagenet", "cache": True}, "cache"),
        ({"download": True}, "torchvision"),
        ({"root": None}, "root"),
    ],
)
def test_bad_config_is_named(change, needle):
    with pytest.raises(ValueError, match=needle):
        build_datamodule({**folder_cfg("x"), **change}, batch_size=2)


def test_known_datasets_know_their_classes():
    for name, classes in (("cifar10", 10), ("cifar100", 100), ("imagenet", 1000)):
        dm = build_datamodule({"name": name, "format": "imagefolder", "root": "x"}, batch_size=2)
        assert dm.num_classes == classes == DATASETS[name].num_classes
    with pytest.raises(ValueError, match="1000"):
        build_datamodule({"name": "imagenet", "root": "x", "num_classes": 10}, batch_size=2)


def test_cache_refuses_to_live_in_the_repo(tree, monkeypatch):
    root, _ = tree
    monkeypatch.setenv("ATTN_BENCH_CACHE", str(Path(data.__file__).parents[1] / "cache"))
    with pytest.raises(ValueError, match="outside the repository"):
        build_datamodule(folder_cfg(root), batch_size=2, num_workers=0).setup("fit")


def test_memory_mapped_dataset_pickles_by_path(tree):
    root, _ = tree
    dm = build_datamodule(folder_cfg(root), batch_size=2, num_workers=0)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    blob = pickle.dumps(dataset)
    assert len(blob) < dataset.images.nbytes
    clone = pickle.loads(blob)
    assert isinstance(clone.images, np.memmap)
    image, label = clone[5]
    assert torch.equal(image, dataset[5][0]) and label == dataset[5][1]


def val_batches(root, workers, context=None):
    """Every validation batch of the PIL pipeline (cache off) of the tree at `root`."""
    dm = build_datamodule(folder_cfg(root, cache=False), batch_size=6, num_workers=workers)
    dm.setup("fit")
    loader = dm.val_dataloader()
    if context is not None:
        loader.multiprocessing_context = context
    return [tuple(t.numpy() for t in batch) for batch in loader]


def assert_same_batches(got, want):
    assert len(got) == len(want) > 0
    for (images, labels), (want_images, want_labels) in zip(got, want, strict=True):
        assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_loader_workers_start_with_any_start_method(tree, method):
    root, _ = tree
    want = val_batches(root, 0)
    assert len(want) == 3
    assert_same_batches(val_batches(root, 1, method), want)


def _joblib_job(root: str, cache_root: str) -> list:
    os.environ["ATTN_BENCH_CACHE"] = cache_root
    cached = build_datamodule(folder_cfg(root, cache=True), batch_size=6, num_workers=2)
    cached.setup("fit")
    return [val_batches(root, 2), [len(b[0]) for b in cached.train_dataloader()]]


def test_loader_workers_start_inside_a_joblib_job(tree, cache_dir):
    """hydra/launcher=joblib runs jobs in loky processes, whose default start method
    (loky) cannot start torch's workers; the loaders must still work there."""
    joblib = pytest.importorskip("joblib")
    root, _ = tree
    ((got, cached_sizes),) = joblib.Parallel(n_jobs=2, backend="loky")(
        [joblib.delayed(_joblib_job)(str(root), str(cache_dir))]
    )
    assert_same_batches(got, val_batches(root, 0))
    assert cached_sizes == [6, 6, 6]


def test_uint8_loaders_run_in_the_main_process(tree):
    root, _ = tree
    dm = build_datamodule(folder_cfg(root, cache=True), batch_size=4, num_workers=2)
    dm.setup("fit")
    assert dm.train_dataloader().num_workers == dm.val_dataloader().num_workers == 0
    plain = build_datamodule(folder_cfg(root, cache=False), batch_size=4, num_workers=2)
    plain.setup("fit")
    assert plain.train_dataloader().num_workers == 2


def test_imagenet_recipe_gives_224_crops(tmp_path):
    root = tmp_path / "tiny"
    write_tree(root, per_class=1, size=(64, 48), fmt="jpg")
    cfg = {"name": "imagefolder", "root": str(root), "num_classes": 3, "recipe": "imagenet"}
    dm = build_datamodule(cfg, batch_size=3, num_workers=0)
    assert dm.image_size == 224 and not dm.cache
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, labels = first_batch(loader)
        assert images.shape == (3, 3, 224, 224) and images.dtype == torch.float32
        assert dm.on_after_batch_transfer((images, labels), 0)[0] is images
    assert sorted(labels.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("path", sorted(DATA_YAML.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_yaml_builds_and_checks(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_BENCH_DATA", str(tmp_path / "data"))
    node = OmegaConf.load(path)
    if OmegaConf.is_missing(node, "root"):
        node.root, node.num_classes = str(tmp_path / "data" / "mine"), 7
    cfg = OmegaConf.to_container(node, resolve=True)
    dm = build_datamodule(cfg, batch_size=8)
    assert dm.num_classes == cfg["num_classes"]
    assert dm.image_size == {"cifar": 32, "imagenet": 224}[dm.recipe]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "data"))) as err:
        dm.check(allow_download=False)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


@pytest.mark.skipif(not OFFLINE_CIFAR10.is_dir(), reason="offline CIFAR-10 copy not present")
def test_a_few_batches_of_the_offline_cifar10(monkeypatch):
    monkeypatch.setenv("ATTN_BENCH_DATA", str(OFFLINE_CIFAR10.parent))
    node = OmegaConf.load(DATA_YAML / "cifar10_images.yaml")
    cfg = OmegaConf.to_container(node, resolve=True)
    cfg.update(subset={"per_class": 3}, val_subset={"per_class": 1})
    dm = build_datamodule(cfg, batch_size=10, num_workers=0)
    dm.check()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["val"]) == 10
    dm.trainer = SimpleNamespace(training=True)
    for raw in dm.train_dataloader():
        images, labels = dm.on_after_batch_transfer(raw, 0)
        assert images.shape == (10, 3, 32, 32) and labels.max() < 10
    val = dm.datasets["val"]
    assert sorted(val.labels.tolist()) == list(range(10))
    # Real photographs: per-channel means near CIFAR-10's, within a loose band for 10 images.
    means = np.asarray(val.images).reshape(10, 3, -1).mean(axis=(0, 2)) / 255
    assert np.all(np.abs(means - np.asarray(data.CIFAR10_MEAN)) < 0.15)


# --- the device-resident path ------------------------------------------------------------


def fit_batches(root, resident: bool, seed: int, epochs: int = 2, sanity: int = 1) -> dict:
    """What Lightning hands the steps over `epochs` epochs (with a sanity check and
    EpochSeed's reseeding, as bench.train runs it), on the DataLoader or resident path."""
    from bench.train import EpochSeed

    cfg = folder_cfg(root, val_subset={"per_class": 2}, resident=resident)
    dm = build_datamodule(cfg, batch_size=4, num_workers=0)
    model = Recorder()
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=sanity,
        callbacks=[EpochSeed(seed)],
    )
    trainer.fit(model, datamodule=dm)
    assert isinstance(dm.train_dataloader(), data.ResidentLoader) == resident
    return model.seen


def test_resident_path_gives_the_dataloader_paths_batches_under_the_same_seed(tree):
    root, _ = tree
    want = fit_batches(root, resident=False, seed=3)
    got = fit_batches(root, resident=True, seed=3)
    # 18 images, batch 4, drop_last: 4 batches per epoch, 2 epochs; augmented identically.
    assert len(got["train"]) == len(want["train"]) == 8
    for split in ("train", "val"):
        assert len(got[split]) == len(want[split])
        for a, b in zip(got[split], want[split], strict=True):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(got["train"][0], got["train"][4])  # epochs differ
    other = fit_batches(root, resident=True, seed=4)
    assert not torch.equal(other["train"][0], got["train"][0])  # the seed matters


def test_resident_loader_shapes_labels_and_order(tree):
    root, _ = tree
    cfg = folder_cfg(root, cache=True, resident=True)
    dm = build_datamodule(cfg, batch_size=4, num_workers=0)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (len(train), len(val)) == (4, 5)  # 18 train (drop_last), 18 val (last has 2)
    plain = build_datamodule(folder_cfg(root, cache=True), batch_size=4, num_workers=0)
    plain.setup("fit")
    for got, want in zip(val, plain.val_dataloader(), strict=True):  # sequential: equal
        assert got[0].dtype == torch.uint8 and got[1].dtype == torch.int64
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.manual_seed(0)
    first = [(x.clone(), y.clone()) for x, y in train]
    torch.manual_seed(0)
    again = list(train)
    assert all(x.shape == (4, 3, 32, 32) for x, _ in first)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    labels = torch.cat([y for _, y in first])
    assert len(set(labels.tolist())) == 3 and len(labels) == 16
    # Two ranks split one permutation: disjoint halves, equal batch counts.
    images, labels = dm._resident["train"]
    ranks = [
        data.ResidentLoader(images, labels, 4, shuffle=True, drop_last=True, rank=r, world_size=2)
        for r in (0, 1)
    ]
    seen = []
    for loader in ranks:
        torch.manual_seed(1)
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        seen.append({tuple(x.flatten()[:64].tolist()) for b, _ in batches for x in b})
    assert not seen[0] & seen[1]


def test_resident_needs_the_uint8_pipeline(tree):
    root, _ = tree
    with pytest.raises(ValueError, match="data.resident=true needs the uint8 pipeline"):
        build_datamodule(folder_cfg(root, cache=False, resident=True), batch_size=4)
    with pytest.raises(ValueError, match="data.resident must be true or false"):
        build_datamodule(folder_cfg(root, resident="yes"), batch_size=4)
