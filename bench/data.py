"""Data: one LightningDataModule for CIFAR-10/100 and ImageFolder trees.

`build_datamodule(cfg, batch_size=..., num_workers=2, seed=0)` reads a plain mapping (the
Hydra `data` node) with these keys:

    name        cifar10 | cifar100 | imagenet | imagenette | imagefolder (any other tree)
    format      torchvision (CIFAR's pickled batches) | imagefolder (<root>/<split>/<class>/*)
    root        folder holding `cifar-10-batches-py/` / `cifar-100-python/` (torchvision)
                or the splits (imagefolder); relative paths are taken from the project root
    recipe      cifar: pad-4 random crop + flip at native size (32); imagenet:
                RandomResizedCrop 224 + flip, val resize 256 / centre crop 224
    train_split, val_split   split folder names (imagefolder only; default train / val)
    num_classes known for named datasets, required for `imagefolder`
    subset, val_subset       null | fraction in (0, 1] of each class | {per_class: N}
    cache       imagefolder + cifar recipe: decode once into a uint8 array on disk
                (default true there; torchvision CIFAR is uint8 in memory anyway)
    resident    uint8 pipelines only: hold the whole split as one tensor on the model's
                device and draw batches by index there (`ResidentLoader`; default false)
    download    torchvision format only: fetch the archive (default false)
    mean, std   per-channel normalisation; default: the dataset's own, else the recipe's

Two pipelines:
- uint8 batches (torchvision CIFAR, whose arrays are uint8 already, and the on-disk
  cache of an ImageFolder tree): the loaders only gather rows of a (N, 3, H, W) uint8
  array, and `on_after_batch_transfer` crops, flips and normalises the whole batch on
  the device it landed on, because two loader cores starve a GPU on 32x32 images.
  Pass the datamodule to `Trainer.fit(datamodule=...)` so Lightning calls that hook; a
  LightningModule must not override it. Without a trainer the hook normalises only.
  These loaders run in the main process whatever `num_workers` says (see `_loader`).
  With `resident: true` there is no DataLoader at all: the split is one uint8 tensor on
  the model's device (CPU or CUDA) and each batch is one index into it
  (`ResidentLoader`), the same batches in the same order under the same seed.
- PIL images (imagenet recipe, or `cache: false`): torchvision transforms in
  `num_workers` worker processes, which start under any launcher (`worker_context`).

The cache lives in `$ATTN_BENCH_CACHE` (default `~/.cache/attention-bench`, never inside
the repository), one `.npy` pair per (dataset, split, file list): the key hashes the
sorted relative paths, labels, sizes and mtimes, so edited data rebuilds it. Files are
written to a temporary name and renamed, and loaded memory-mapped.

Subsets are stratified and reproducible: per class, `seed` and the class index pick a
fixed set out of the class's files in sorted path order, independent of filesystem
order and of the other classes. The same seed gives the same subset; pass one fixed
seed (not the training seed) to train every run of a sweep on the same images.

CIFAR in torchvision's layout is read by our own few lines (same files and keys as
`torchvision.datasets.CIFAR10/100`), because torchvision checks the md5 of every file on
each load and so refuses locally made copies; `download: true` goes through
torchvision's downloader, which checks the archive's md5.

Missing data. A CIFAR ImageFolder copy (the default `data=cifar10_images`) whose root
folder does not exist falls back to torchvision's copy under
`$ATTN_BENCH_CACHE/torchvision/` (`download_root()`): used when it is there, else
downloaded by `prepare_data` (once per node, on local rank 0; torchvision checks the
MD5) and then used. Every missing-data error is one line (`MissingData`, a
FileNotFoundError and a ValueError) naming the paths looked at and, after a failed
download, why it failed and where to put a copy. `check_data(cfg)` runs those checks for
a sweep before any run (file existence only; it downloads what can be downloaded).
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import socket
import urllib.error
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm.auto import tqdm

from bench.atomic import temporary_twin

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_CACHE_VERSION = 1
CIFAR_PADDING = 4

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

RECIPES: dict[str, dict[str, Any]] = {
    "cifar": {"image_size": 32, "mean": CIFAR10_MEAN, "std": CIFAR10_STD},
    "imagenet": {"image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}
FORMATS = ("torchvision", "imagefolder")
CONFIG_KEYS = (
    "name",
    "format",
    "root",
    "recipe",
    "train_split",
    "val_split",
    "num_classes",
    "subset",
    "val_subset",
    "cache",
    "resident",
    "download",
    "mean",
    "std",
)

_OFFLINE_HINT = (
    "An offline copy is described in ../shared/data/README.md: set ATTN_BENCH_DATA to the "
    "folder holding it (default ../shared/data from the project root) or set data.root."
)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a named dataset before any file is read."""

    num_classes: int | None
    recipe: str | None
    formats: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    torchvision: type[tvd.CIFAR10] | None = None  # torchvision's class, for its file layout
    hint: str = "Point data.root at a folder with <train_split>/ and <val_split>/ class folders."
    offline: str | None = None  # the data config of an offline ImageFolder copy, if any


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        num_classes=10,
        recipe="cifar",
        formats=FORMATS,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        torchvision=tvd.CIFAR10,
        hint=_OFFLINE_HINT,
        offline="cifar10_images",
    ),
    "cifar100": DatasetInfo(
        num_classes=100,
        recipe="cifar",
        formats=FORMATS,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        torchvision=tvd.CIFAR100,
        hint="No offline copy exists here; torchvision.datasets.CIFAR100 describes the files.",
    ),
    "imagenet": DatasetInfo(
        num_classes=1000,
        recipe="imagenet",
        formats=("imagefolder",),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hint="Download ILSVRC2012 from image-net.org, sort train/ and val/ into one folder "
        "per class (val: e.g. with valprep.sh) and point data.root at their parent.",
    ),
    "imagenette": DatasetInfo(
        num_classes=10,
        recipe="imagenet",
        formats=("imagefolder",),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hint=_OFFLINE_HINT,
    ),
    # Any other tree: num_classes and recipe come from the config, statistics from the recipe.
    "imagefolder": DatasetInfo(num_classes=None, recipe=None, formats=("imagefolder",)),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(key: str, value: Any, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(f"data.{key}={value!r} is not one of {list(accepted)}")
    return value


def _check_subset(key: str, subset: Any) -> float | dict[str, int] | None:
    if subset is None:
        return None
    if isinstance(subset, Mapping):
        n = subset.get("per_class")
        if set(subset) == {"per_class"} and _is_int(n) and n > 0:
            return {"per_class": n}
    elif isinstance(subset, (int, float)) and not isinstance(subset, bool) and 0 < subset <= 1:
        return float(subset)
    raise ValueError(
        f"data.{key} must be null, a fraction in (0, 1] or {{per_class: N}}, got {subset!r}"
    )


def select_subset(labels: Sequence[int], subset: Any, seed: int) -> np.ndarray | None:
    """Sorted indices of a stratified subset of `labels`, or None for all of them.

    `subset` is a fraction (of each class, rounded, at least one image) or
    `{per_class: N}` (all of a class that has fewer). Classes draw independently.
    """
    subset = _check_subset("subset", subset)
    if subset is None or subset == 1.0:
        return None
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if isinstance(subset, dict):
            count = min(subset["per_class"], len(members))
        else:
            count = max(1, math.floor(subset * len(members) + 0.5))
        rng = np.random.default_rng([seed, int(label)])
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def resolve_root(root: str | os.PathLike) -> Path:
    """`root` with `~` expanded; relative paths are taken from the project root."""
    path = Path(root).expanduser()
    return path if path.is_absolute() else (_PROJECT_ROOT / path).resolve()


def cache_dir() -> Path:
    path = Path(os.environ.get("ATTN_BENCH_CACHE") or "~/.cache/attention-bench")
    path = path.expanduser().resolve()
    if path == _PROJECT_ROOT or _PROJECT_ROOT in path.parents:
        raise ValueError(
            f"the data cache must live outside the repository, got {path}; "
            "set ATTN_BENCH_CACHE elsewhere"
        )
    return path


def download_root() -> Path:
    """Where torchvision's checked downloads go (``<cache_dir>/torchvision``)."""
    return cache_dir() / "torchvision"


class MissingData(FileNotFoundError, ValueError):
    """The data is not where the config says: one line naming the paths looked at."""


def missing_torchvision_files(name: str, root: Path) -> list[str]:
    """The files of torchvision's copy of `name` that are not under `root` (existence only)."""
    layout = DATASETS[name].torchvision
    files = [f for f, _ in layout.train_list + layout.test_list] + [layout.meta["filename"]]
    return [f for f in files if not (root / layout.base_folder / f).is_file()]


def download_torchvision(name: str, root: Path) -> None:
    """torchvision's download of `name` (it checks the archive's MD5) into
    ``root/<base_folder>/``. It lands in a temporary folder first and is renamed into
    place, so a run or another job never sees half a copy."""
    layout = DATASETS[name].torchvision
    root.mkdir(parents=True, exist_ok=True)
    target = root / layout.base_folder
    tmp = temporary_twin(target)
    try:
        layout(root=str(tmp), train=True, download=True)
        try:
            os.replace(tmp / layout.base_folder, target)
        except OSError:  # another process finished first: keep its copy if it is whole
            if missing_torchvision_files(name, root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_failure(err: BaseException) -> str:
    """Why a download failed, in a few words on one line."""
    if isinstance(err, (urllib.error.URLError, socket.timeout, ConnectionError)):
        reason = getattr(err, "reason", err)
        return f"no network ({reason})"
    return " ".join(f"{type(err).__name__}: {err}".split())


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image as RGB, decoded exactly as torchvision's ImageFolder does."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """(3, H, W) uint8."""
    return np.asarray(load_rgb(path)).transpose(2, 0, 1)


def cached_images(
    samples: Sequence[tuple[str, int]], folder: Path, tag: str, image_size: int
) -> tuple[np.ndarray, np.ndarray, Path]:
    """Images and labels of `samples` (path under `folder`, label), memory-mapped.

    Decodes every image once (threads: PIL releases the GIL) into
    `<cache_dir>/<tag>-<key>.images.npy` and returns (images (N, 3, S, S) uint8,
    labels (N,), path of the images file).
    """
    digest = hashlib.sha256(f"v{_CACHE_VERSION} {image_size}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        relative = Path(path).relative_to(folder).as_posix()
        digest.update(f"{relative}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    stem = cache_dir() / f"{tag}-{digest.hexdigest()[:16]}"
    images_path = stem.with_name(stem.name + ".images.npy")
    labels_path = stem.with_name(stem.name + ".labels.npy")
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    if not images_path.exists():  # written last, so its presence means both are complete
        images_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_labels, tmp_images = temporary_twin(labels_path), temporary_twin(images_path)
        try:
            with open(tmp_labels, "wb") as f:
                np.save(f, labels, allow_pickle=False)
            shape = (len(samples), 3, image_size, image_size)
            out = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=shape)
            paths = [path for path, _ in samples]
            pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
            try:
                decoded = pool.map(decode_image, paths)
                bar = tqdm(decoded, total=len(paths), desc=f"decoding {tag}", unit="img")
                for i, image in enumerate(bar):
                    if image.shape != shape[1:]:
                        raise ValueError(
                            f"the uint8 cache needs {image_size}x{image_size} images, "
                            f"{paths[i]} is {image.shape[1]}x{image.shape[2]}; "
                            "set data.cache=false"
                        )
                    out[i] = image
            finally:
                pool.shutdown(cancel_futures=True)
            out.flush()
            del out
            os.replace(tmp_labels, labels_path)
            os.replace(tmp_images, images_path)
        except BaseException:
            tmp_labels.unlink(missing_ok=True)
            tmp_images.unlink(missing_ok=True)
            raise
    return np.load(images_path, mmap_mode="r"), np.load(labels_path), images_path


def read_cifar_pickles(root: Path, name: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) from torchvision's CIFAR layout."""
    layout = DATASETS[name].torchvision
    images, labels = [], []
    for filename, _md5 in layout.train_list if train else layout.test_list:
        with open(root / layout.base_folder / filename, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    images = np.concatenate(images).reshape(-1, 3, 32, 32)
    return images, np.asarray(labels, dtype=np.int64)


class ArrayDataset(Dataset):
    """uint8 images (N, C, H, W) and labels, served a whole batch per fetch.

    A memory-mapped array is reopened in each worker instead of being pickled whole.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, images_path: Path | None = None):
        self.images, self.labels, self.images_path = images, labels, images_path

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[index])), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(indices)
        images = np.ascontiguousarray(self.images[index])  # (B, C, H, W) uint8
        return torch.from_numpy(images), torch.from_numpy(self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.images_path is not None:
            state["images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self.images_path, mmap_mode="r")


def _whole_batch(batch: Any) -> Any:
    """`ArrayDataset.__getitems__` already returns a stacked batch."""
    return batch


class ImageListDataset(Dataset):
    """(path, label) samples, decoded with PIL and transformed in the worker."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: T.Compose):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


def worker_context(num_workers: int) -> tuple[int, Any]:
    """(workers, multiprocessing context) for a DataLoader that asks for `num_workers`.

    The interpreter's default start method (context None) unless it is not a standard
    one. joblib's loky backend (`hydra/launcher=joblib`) makes its own `loky` the default
    in the processes that run the jobs: loky's launcher refuses torch's plain `Process`
    ("'Process' object has no attribute 'env'", which torch reports as a pickle error),
    and spawn or forkserver workers die at start because they inherit the name `loky`
    and cannot resolve it. `fork` has neither problem; where there is no fork (Windows)
    the loader runs in the main process. The datasets pickle small (a memory-mapped
    array by its path), so the standard start methods all work.
    """
    standard = multiprocessing.get_all_start_methods()
    if num_workers == 0 or multiprocessing.get_start_method(allow_none=True) in (None, *standard):
        return num_workers, None
    if "fork" in standard:
        return num_workers, multiprocessing.get_context("fork")
    return 0, None


def random_crop_flip(images: torch.Tensor, padding: int = CIFAR_PADDING) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch at its own size, then a random
    horizontal flip; one gather for both, on the batch's device.
    """
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)  # (B, C, H + 2p, W + 2p), zeros as in RandomCrop
    top = torch.randint(0, 2 * padding + 1, (b, 1), device=device)
    left = torch.randint(0, 2 * padding + 1, (b, 1), device=device)
    flip = torch.rand(b, 1, device=device) < 0.5
    rows = top + torch.arange(h, device=device)  # (B, H)
    cols = torch.arange(w, device=device)
    cols = left + torch.where(flip, w - 1 - cols, cols)  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, the same arithmetic as ToTensor + Normalize."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return images.float().div_(255).sub_(mean_t).div_(std_t)


class ResidentLoader:
    """Batches of a uint8 split held as two tensors on one device (images (N, C, H, W),
    labels (N,)): each batch is one index into them, with no DataLoader, worker, collate
    or host-to-device copy. Lightning takes it as a train or val loader (it has a length
    and a fresh iterator per epoch) and still calls the datamodule's
    `on_after_batch_transfer`, which augments the batch where it already is.

    Seeding: at its first batch it draws from the global torch RNG exactly what a
    `DataLoader` over an `ArrayDataset` without workers draws when Lightning starts
    iterating it: one int64 (the loader iterator's base seed) and, with `shuffle`, one
    int64 that seeds the permutation (`RandomSampler`). So after the same seed
    (`bench.train.EpochSeed`) it yields the same batches in the same order as that
    loader, and the augmentation after it draws the same numbers: runs stay comparable
    with the DataLoader path. The permutation is drawn on the CPU whatever the device.
    With several processes (`rank`, `world_size`), each takes every world-th index of the
    permutation, cut to a multiple of the world size so that every rank has as many
    batches (Lightning's DistributedSampler pads instead, so DDP batches differ from the
    DataLoader path's).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("ResidentLoader takes uint8 (N, C, H, W) images and N labels")
        if labels.device != images.device:
            raise ValueError(f"images on {images.device}, labels on {labels.device}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size

    def _samples(self) -> int:
        n = len(self.labels)
        return n // self.world_size if self.world_size > 1 else n

    def __len__(self) -> int:
        n = self._samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        # Nothing is drawn until the first batch: Lightning calls iter() once just to check
        # that a loader which is not a DataLoader is iterable.
        return self._batches()

    def _batches(self):
        n = len(self.labels)
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
        if self.shuffle:  # RandomSampler's seed and permutation
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[: self._samples() * self.world_size][self.rank :: self.world_size]
        order = order.to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


class ImageDataModule(pl.LightningDataModule):
    """Train/val loaders for one dataset; see the module docstring for the keys."""

    def __init__(
        self,
        *,
        name: str,
        format: str,
        root: Path,
        recipe: str,
        train_split: str,
        val_split: str,
        num_classes: int,
        subset: Any,
        val_subset: Any,
        cache: bool,
        download: bool,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        num_workers: int,
        seed: int,
        resident: bool = False,
    ):
        super().__init__()
        self.name, self.format, self.root, self.recipe = name, format, root, recipe
        self.splits = {"train": train_split, "val": val_split}
        self.subsets = {"train": subset, "val": val_subset}
        self.num_classes, self.cache, self.download = num_classes, cache, download
        self.resident = resident
        self._resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.image_size: int = RECIPES[recipe]["image_size"]
        self.datasets: dict[str, Dataset] = {}

    def fallback_root(self) -> Path | None:
        """Where torchvision's copy replaces a missing ImageFolder copy (CIFAR only)."""
        info = DATASETS[self.name]
        if self.format != "imagefolder" or info.torchvision is None or self.recipe != "cifar":
            return None
        return download_root()

    def _needs_fallback(self) -> bool:
        return not self.root.exists() and self.fallback_root() is not None

    def _missing_message(self, download: str) -> str:
        """One line: the paths looked at, what happened to the download, where a copy goes."""
        layout = DATASETS[self.name].torchvision
        fallback = self.fallback_root()
        return (
            f"{self.name}: no copy at {self.root} (ImageFolder: <split>/<class>/<image>) "
            f"nor at {fallback / layout.base_folder} (torchvision's), {download}; put the "
            f"ImageFolder copy at {self.root} (or set ATTN_BENCH_DATA to the folder "
            f"holding {self.root.name}/, see ../shared/data/README.md) or torchvision's "
            f"{layout.base_folder}/ under {fallback}"
        )

    def check(self, *, allow_download: bool = True) -> None:
        """Fail now, naming the path looked at, if the data is not where the config says.

        File existence only. A missing CIFAR ImageFolder copy switches to torchvision's
        copy (`fallback_root`) when that is complete; otherwise, with `allow_download`,
        passes (`prepare_data` downloads it), else raises `MissingData`.
        """
        info = DATASETS[self.name]
        if self._needs_fallback():
            fallback = self.fallback_root()
            if missing_torchvision_files(self.name, fallback):
                if allow_download:
                    return
                raise MissingData(self._missing_message("not downloaded yet"))
            log.warning(
                "%s: no ImageFolder copy at %s; using torchvision's copy under %s "
                "(the original pixels, not a JPEG export)",
                self.name,
                self.root,
                fallback,
            )
            self.format, self.root = "torchvision", fallback
        if self.format == "torchvision":
            layout = info.torchvision
            missing = missing_torchvision_files(self.name, self.root)
            if missing and not (allow_download and self.download):
                offline = ""
                if info.offline:
                    offline = f" For the offline ImageFolder copy use data={info.offline}."
                raise MissingData(
                    f"{self.name}: no torchvision copy at {self.root / layout.base_folder} "
                    f"(missing {missing}). Set data.download=true where the internet is "
                    f"reachable, or point data.root at a folder that contains "
                    f"{layout.base_folder}/.{offline} {info.hint}"
                )
            return
        classes = {}
        for split, folder_name in self.splits.items():
            folder = self.root / folder_name
            if not folder.is_dir():
                raise MissingData(
                    f"{self.name}: no ImageFolder split at {folder} (layout "
                    f"<root>/<split>/<class>/<image>). {info.hint}"
                )
            classes[split] = sorted(e.name for e in os.scandir(folder) if e.is_dir())
            if len(classes[split]) != self.num_classes:
                raise ValueError(
                    f"{self.name}: {folder} has {len(classes[split])} class folders, "
                    f"data.num_classes is {self.num_classes}"
                )
        if classes["train"] != classes["val"]:
            raise ValueError(
                f"{self.name}: the class folders of {self.root / self.splits['train']}"
                f" and {self.root / self.splits['val']} differ"
            )

    def fetch(self) -> None:
        """Download what `check` left to download (torchvision's copy, MD5-checked);
        a failure is one `MissingData` line that says why."""
        self.check()
        if self._needs_fallback():
            root = self.fallback_root()
        elif self.format == "torchvision" and self.download:
            root = self.root
        else:
            return
        if missing_torchvision_files(self.name, root):
            try:
                download_torchvision(self.name, root)
            except Exception as err:
                failure = f"and downloading it failed: {_download_failure(err)}"
                if self.format == "torchvision":
                    layout = DATASETS[self.name].torchvision
                    raise MissingData(
                        f"{self.name}: no torchvision copy at {root / layout.base_folder}, "
                        f"{failure}; put one there or set data.root"
                    ) from err
                raise MissingData(self._missing_message(failure)) from err
        self.check(allow_download=False)

    def prepare_data(self) -> None:
        """Download (torchvision, or the fallback of a missing CIFAR ImageFolder copy) and
        build the caches, once per node."""
        self.fetch()
        if self.cache and self.format == "imagefolder":
            for split in self.splits:
                self._load(split)

    def setup(self, stage: str | None = None) -> None:
        self.check(allow_download=False)
        for split in ("train", "val") if stage in (None, "fit") else ("val",):
            if split not in self.datasets:
                self.datasets[split] = self._load(split)
        train = self.datasets.get("train")
        if train is not None and len(train) < self.batch_size:
            raise ValueError(
                f"{self.name}: {len(train)} training images, fewer than batch_size "
                f"{self.batch_size}; with drop_last no batch would run"
            )

    def _load(self, split: str) -> Dataset:
        train = split == "train"
        if self.format == "torchvision":
            images, labels = read_cifar_pickles(self.root, self.name, train)
            if labels.max() >= self.num_classes:
                raise ValueError(
                    f"{self.name}: label {labels.max()} in the {split} split, "
                    f"data.num_classes is {self.num_classes}"
                )
            index = select_subset(labels, self.subsets[split], self.seed)
            if index is not None:
                images, labels = images[index], labels[index]
            return ArrayDataset(images, labels)
        folder = self.root / self.splits[split]
        _, class_to_idx = find_classes(str(folder))
        samples = sorted(make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS))
        index = select_subset([label for _, label in samples], self.subsets[split], self.seed)
        if index is not None:
            samples = [samples[i] for i in index]
        if not self.cache:
            return ImageListDataset(samples, self._transform(train))
        tag = f"{self.name}-{self.splits[split]}"
        images, labels, path = cached_images(samples, folder, tag, self.image_size)
        return ArrayDataset(images, labels, path)

    def _transform(self, train: bool) -> T.Compose:
        size = self.image_size
        if self.recipe == "imagenet" and train:
            head = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        elif self.recipe == "imagenet":
            head = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
        elif train:
            head = [T.RandomCrop(size, padding=CIFAR_PADDING), T.RandomHorizontalFlip()]
        else:
            head = []
        return T.Compose([*head, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _resident_loader(self, split: str) -> ResidentLoader:
        """The split as tensors on the model's device, built once per device."""
        dataset, device = self.datasets[split], self._device()
        tensors = self._resident.get(split)
        if tensors is None or tensors[0].device != device:
            images = torch.from_numpy(np.array(dataset.images))  # a RAM copy of the cache
            tensors = (images.to(device), torch.from_numpy(dataset.labels).long().to(device))
            self._resident[split] = tensors
        trainer, train = self.trainer, split == "train"
        return ResidentLoader(
            *tensors,
            self.batch_size,
            shuffle=train,
            drop_last=train,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def _loader(self, split: str) -> DataLoader | ResidentLoader:
        dataset, train = self.datasets[split], split == "train"
        array = isinstance(dataset, ArrayDataset)
        if self.resident and array:
            return self._resident_loader(split)
        # A uint8 batch is one gather from a (memory-mapped) array; cropping, flipping and
        # normalising happen on the device. Worker processes only add a copy through
        # shared memory and compete with training for the cores. Measured on the 2-core
        # CPU machine, full CIFAR-10 cache, batch 256: in the main process 0.14-0.27 ms
        # per batch; with 2 workers 1.4-2.9 ms per batch delivered plus 40-120 ms to start
        # them, and 40 ResNet-20 training steps took 15.8-19.3 s against 21.7-32.6 s.
        # So the uint8 pipeline never starts workers; num_workers is for PIL decoding.
        workers, context = (0, None) if array else worker_context(self.num_workers)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            multiprocessing_context=context,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=_whole_batch if array else None,
        )

    def train_dataloader(self) -> DataLoader | ResidentLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | ResidentLoader:
        return self._loader("val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if images.dtype != torch.uint8:  # PIL pipeline: augmented and normalised already
            return batch
        if self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images)
        return normalize(images, self.mean, self.std), labels


def build_datamodule(
    cfg: Mapping, *, batch_size: int, num_workers: int = 2, seed: int = 0
) -> ImageDataModule:
    """The datamodule `cfg` (the `data` config node as a mapping) describes.

    Validates every key now; touches no file (call `.check()` for that).
    `seed` picks the subsets; pass a fixed one to train every run on the same images.
    """
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown data keys {unknown}; accepted: {list(CONFIG_KEYS)}")
    name = _choice("name", cfg.get("name"), list(DATASETS))
    info = DATASETS[name]
    fmt = _choice("format", cfg.get("format") or info.formats[0], FORMATS)
    if fmt not in info.formats:
        raise ValueError(f"data.format={fmt!r} is not one of {list(info.formats)} for {name}")
    recipe = _choice("recipe", cfg.get("recipe") or info.recipe, list(RECIPES))
    if cfg.get("root") is None:
        raise ValueError("data.root is required (the folder holding the dataset)")

    num_classes = cfg.get("num_classes") or info.num_classes
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(
            f"data.num_classes must be a positive integer for {name}, "
            f"got {cfg.get('num_classes')!r}"
        )
    if info.num_classes is not None and num_classes != info.num_classes:
        raise ValueError(f"{name} has {info.num_classes} classes, data.num_classes={num_classes}")

    cache = cfg.get("cache")
    cache = recipe == "cifar" if cache is None else cache
    if fmt == "torchvision":
        if recipe != "cifar":
            raise ValueError("format torchvision holds 32x32 CIFAR arrays: use recipe cifar")
        if cfg.get("train_split") is not None or cfg.get("val_split") is not None:
            raise ValueError("data.train_split/val_split apply to format imagefolder only")
        cache = False  # its arrays are uint8 in memory already
    elif cache and recipe != "cifar":
        raise ValueError(
            "data.cache=true needs recipe cifar (equal-size small images); "
            "the imagenet recipe decodes and crops in the loader workers"
        )
    if cfg.get("download") and fmt != "torchvision":
        raise ValueError("data.download=true works for format torchvision only")
    resident = cfg.get("resident") or False
    if not isinstance(resident, bool):
        raise ValueError(f"data.resident must be true or false, got {resident!r}")
    if resident and not (fmt == "torchvision" or cache):
        raise ValueError(
            "data.resident=true needs the uint8 pipeline: format torchvision, or "
            "data.cache=true (recipe cifar)"
        )

    stats = {}
    for key in ("mean", "std"):
        value = cfg.get(key) or getattr(info, key) or RECIPES[recipe][key]
        if len(value) != 3 or (key == "std" and min(value) <= 0):
            raise ValueError(f"data.{key} must be 3 numbers (std > 0), got {value!r}")
        stats[key] = tuple(float(v) for v in value)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    return ImageDataModule(
        name=name,
        format=fmt,
        root=resolve_root(cfg["root"]),
        recipe=recipe,
        train_split=cfg.get("train_split") or "train",
        val_split=cfg.get("val_split") or "val",
        num_classes=num_classes,
        subset=_check_subset("subset", cfg.get("subset")),
        val_subset=_check_subset("val_subset", cfg.get("val_subset")),
        cache=bool(cache),
        download=bool(cfg.get("download")),
        mean=stats["mean"],
        std=stats["std"],
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        resident=resident,
    )


def check_data(cfg: Mapping, *, download: bool = True) -> None:
    """Fail before any run if the data `cfg` (a `data` config node) describes is missing.

    For a sweep, once per dataset of its grid: validates the keys and checks that the
    files exist (no image is decoded). Where torchvision can download a missing copy
    (CIFAR), `download` fetches it now, in this one process, so parallel runs find it
    there. Raises ValueError with a one-line message (`MissingData` for missing files).
    """
    datamodule = build_datamodule(cfg, batch_size=1, num_workers=0)
    if download:
        datamodule.fetch()
    else:
        datamodule.check(allow_download=False)
