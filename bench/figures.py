"""The papers' pictures, regenerated from trained models and run records.

    python -m bench.figures [--out results/figures] [--weights results/analysis/weights]
                            [--data DIR] [--runs results/runs]
    python -m bench.figures export NAME RECORD WEIGHTS [--weights results/analysis/weights]

Every number drawn comes from ``bench.analysis`` (forward hooks on the injected blocks,
Grad-CAM, receptive fields) or ``bench.tables`` (the run records); this module picks the
images, lays out the panels and writes PNGs with the Agg backend. Each ``*_figure``
function writes one PNG and returns the numbers it plotted, so a notebook or a test reads
the values the picture shows.

The figures (``make figures``, into ``results/figures/``):

- ``excitation_se.png``: SENet's Fig. 6 (Sec. 7.2). The mean excitation of every channel
  over the test images of a few classes, and over all of them, for each SE block, one
  panel per block (rows: stages, columns: units); each panel's title gives the block's
  class specificity (``bench.analysis.class_specificity``) and how many hidden units of
  its excitation MLP fire (``bench.analysis.hidden_activity``).
- ``class_specificity.png``: that number by depth for every model with channel gates
  (SE, CBAM's channel attention, ECA).
- ``attention_maps.png``: CBAM's Fig. 4 and its spatial gates. Test images (one per
  class), Grad-CAM of the true class for the baseline, SE, CBAM and ECA side by side,
  with each model's probability of that class, and CBAM's spatial gate at the last unit
  of every stage.
- ``non_local.png``: GCNet's Fig. 2. The attention maps of a non-local block for five
  query positions (marked) of a few test images, and GCNet's query-independence measure
  (mean cosine distance between the maps of different queries) over the test images,
  beside the same block at initialisation.
- ``receptive_fields.png``: ParseNet's Fig. 2. The empirical receptive field of the
  centre unit of each stage's output (a noise patch slid over the input; the box where
  the unit changes by at least 10% of its largest change) against the theoretical one,
  for the baseline, and the sizes of both for every model.
- ``cost_vs_gain.png`` (from the run records in ``--runs``): each trained variant's
  seed-paired top-1 difference to its ablation's baseline (95% interval) against what it
  costs: extra parameters, and training throughput relative to the baseline's. The
  tables' PNGs show top-1 against GMACs; this one shows the gain against measured cost.
- ``README.md``: a caption per figure with each model's schedule and top-1, and the
  numbers the figures show.

Models. ``<weights>/<name>.pt`` holds a model's weights (``torch.save(model.state_dict())``)
and ``<name>.json`` the record of the run that trained it, whose resolved config builds
the model (``bench.analysis.load_run``). ``export`` writes both from a run record and its
checkpoint (Lightning's ``last.ckpt`` or a plain weights file). The figures use the names
``none``, ``se``, ``cbam``, ``eca`` and ``non_local`` (``FIGURE_MODELS``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.analysis import (
    DEFAULT_QUERIES,
    ClassExcitation,
    build_from_record,
    class_excitations,
    collect,
    empirical_receptive_field,
    grad_cam,
    hidden_activity,
    load_run,
    query_independence,
    select,
    theoretical_receptive_field,
)
from bench.analysis.common import evaluating, model_device
from bench.data import CIFAR10_MEAN, CIFAR10_STD, decode_image, normalize, resolve_root
from bench.records import read_record
from modules import describe_backbone

FIGURE_MODELS = ("none", "se", "cbam", "eca", "non_local")
CHANNEL_GATED = ("se", "cbam", "eca")
GRADCAM_MODELS = ("none", "se", "cbam", "eca")
# SENet's Fig. 6 shows four classes; ours mixes vehicles and animals.
EXCITATION_CLASSES = ("airplane", "cat", "frog", "ship")
# ParseNet's measurement: images (the first of each class) and noise draws per position
RF_IMAGES, RF_TRIALS = 6, 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")

BLOCK_LABELS = {
    "none": "baseline",
    "se": "SE",
    "cbam": "CBAM",
    "eca": "ECA",
    "non_local": "non-local",
    "gc": "GC",
}
BACKBONE_LABELS = {
    "resnet20_cifar": "ResNet-20",
    "resnet56_cifar": "ResNet-56",
    "resnet110_cifar": "ResNet-110",
    "resnet164_cifar": "ResNet-164",
}


# --- images -----------------------------------------------------------------------------


def default_data_root() -> Path:
    """The CIFAR-10 copy the runs train on (``data=cifar10_images``):
    ``$ATTN_BENCH_DATA/cifar10``, default ``../shared/data/cifar10`` from the project root."""
    return resolve_root(Path(os.environ.get("ATTN_BENCH_DATA") or "../shared/data") / "cifar10")


@dataclass(frozen=True)
class Images:
    """Labelled images: uint8 pixels to show, normalised inputs to feed the models."""

    pixels: Tensor  # (N, 3, H, W) uint8
    inputs: Tensor  # (N, 3, H, W) float32, normalised as in training
    labels: Tensor  # (N,) long
    classes: tuple[str, ...]  # class names, indexed by label

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Sequence[int] | Tensor) -> Images:
        index = torch.as_tensor(index, dtype=torch.long)
        return Images(self.pixels[index], self.inputs[index], self.labels[index], self.classes)

    def one_per_class(self, count: int | None = None) -> Images:
        """The first image of each class (of the first ``count`` classes), in label order."""
        labels = sorted(set(self.labels.tolist()))[:count]
        first = [int((self.labels == label).nonzero()[0, 0]) for label in labels]
        return self.take(first)

    def batches(self, size: int = 250) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), size):
            yield self.inputs[start : start + size], self.labels[start : start + size]

    def name(self, label: int) -> str:
        return self.classes[label]


def load_images(
    root: str | os.PathLike | None = None,
    *,
    split: str = "test",
    per_class: int = 100,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Images:
    """The first ``per_class`` images (sorted file names) of every class folder of
    ``<root>/<split>`` (an ImageFolder tree; default ``default_data_root()``), decoded as
    the training pipeline decodes them and normalised with ``mean``/``std`` (CIFAR-10's,
    as the runs were trained)."""
    folder = Path(root or default_data_root()) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no image folder at {folder}; point --data (or ATTN_BENCH_DATA) at the "
            f"folder holding {split}/<class>/*.jpg"
        )
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found[:per_class]
        labels += [label] * len(found[:per_class])
    if not files:
        raise FileNotFoundError(f"no images under {folder}/<class>/")
    pixels = torch.from_numpy(np.stack([decode_image(f) for f in files]))
    return Images(pixels, normalize(pixels, mean, std), torch.tensor(labels), classes)


# --- models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A trained model (eval mode) and the record of the run that trained it."""

    name: str
    model: nn.Module
    record: Mapping[str, Any]

    @property
    def config(self) -> Mapping[str, Any]:
        return self.record["config"]

    @property
    def block(self) -> str:
        return str(self.config["attention"].get("block", "none"))

    @property
    def label(self) -> str:
        """``ResNet-20`` or ``ResNet-20 + SE``."""
        backbone = str(self.config["model"]["name"])
        backbone = BACKBONE_LABELS.get(backbone, backbone)
        if self.block == "none":
            return backbone
        return f"{backbone} + {BLOCK_LABELS.get(self.block, self.block)}"

    @property
    def top1(self) -> float | None:
        return self.record.get("top1")

    @property
    def recipe(self) -> str:
        """How it was trained, e.g. ``13 epochs (cpu protocol v2, max_epochs=13: SGD
        (Nesterov) lr 0.2, batch 128, 1 warmup epoch + cosine, label smoothing 0.1,
        bf16-mixed)``: the epochs trained and the recipe, from the run's record and config."""
        config, record = self.config, self.record
        protocol = config.get("protocol", {}) or {}
        optim = config.get("optim", {}) or {}
        schedule = config.get("schedule", {}) or {}
        version = f" v{protocol['version']}" if protocol.get("version") else ""
        parts = [f"{protocol.get('name', '?')} protocol{version}"]
        max_epochs = record.get("max_epochs") or config.get("trainer", {}).get("max_epochs")
        if max_epochs is not None:
            parts.append(f"max_epochs={max_epochs}")
        recipe = []
        if optim.get("lr") is not None:
            name = str(optim.get("name", "")).upper() or "lr"
            nesterov = " (Nesterov)" if optim.get("nesterov") else ""
            recipe.append(f"{name}{nesterov} lr {optim['lr']:g}")
        if protocol.get("batch_size"):
            recipe.append(f"batch {protocol['batch_size']}")
        if schedule.get("name"):
            warmup = schedule.get("warmup_epochs") or 0
            policy = str(schedule["name"])
            plural = "" if warmup == 1 else "s"
            recipe.append(f"{warmup} warmup epoch{plural} + {policy}" if warmup else policy)
        smoothing = (config.get("loss", {}) or {}).get("label_smoothing")
        if smoothing:
            recipe.append(f"label smoothing {smoothing:g}")
        precision = (config.get("trainer", {}) or {}).get("precision")
        if precision is not None:
            recipe.append("fp32" if str(precision) == "32" else str(precision))
        text = f"{record.get('epochs', '?')} epochs ({', '.join(parts)}"
        return text + (f": {', '.join(recipe)})" if recipe else ")")

    @property
    def schedule(self) -> str:
        """``recipe``, the run's top-1 and its wall time: ``2 epochs (...), top-1 70.12%,
        9.5 min``."""
        record, text = self.record, self.recipe
        if self.top1 is not None:
            text += f", top-1 {self.top1:.2f}%"
        if record.get("wall_time_s"):
            text += f", {record['wall_time_s'] / 60:.1f} min"
        return text


def models_note(models: Mapping[str, TrainedModel], names: Sequence[str] | None = None) -> str:
    """Two lines for a figure of several models: how they were trained (each distinct
    recipe once) and each one's top-1."""
    chosen = [models[name] for name in (models if names is None else names)]
    recipes = "; ".join(dict.fromkeys(m.recipe for m in chosen))
    tops = ", ".join(f"{m.label} {m.top1:.2f}%" for m in chosen if m.top1 is not None)
    return f"{recipes}\ntop-1: {tops}" if tops else recipes


def export_weights(
    name: str,
    record: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike = "results/analysis/weights",
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.pt`` (the model's state dict, from a Lightning checkpoint or
    a plain weights file) and ``<out_dir>/<name>.json`` (the run record, checked by
    ``bench.records``). The weights are loaded into the model the record builds, strictly,
    so a mismatched pair fails here. Returns both paths."""
    run = read_record(record)
    model = load_run(run.model_dump(), weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    pt, js = out / f"{name}.pt", out / f"{name}.json"
    torch.save(state, pt)
    js.write_text(run.to_json())
    return pt, js


def load_models(
    weights_dir: str | os.PathLike, names: Sequence[str] = FIGURE_MODELS
) -> dict[str, TrainedModel]:
    """``name -> TrainedModel`` from ``<weights_dir>/<name>.{pt,json}``, in eval mode on the
    CPU. A missing pair is one error naming every missing file and how to make it."""
    folder = Path(weights_dir)
    missing = [
        str(folder / f"{name}.{suffix}")
        for name in names
        for suffix in ("pt", "json")
        if not (folder / f"{name}.{suffix}").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"missing model files: {', '.join(missing)}; train the runs and write them with "
            "`python -m bench.figures export NAME RECORD CHECKPOINT` (results/analysis/README.md)"
        )
    models = {}
    for name in names:
        record = json.loads((folder / f"{name}.json").read_text())
        model = load_run(record, folder / f"{name}.pt")
        models[name] = TrainedModel(name, model, record)
    return models


def probabilities(model: nn.Module, images: Tensor) -> Tensor:
    """Softmax outputs ``(N, K)`` in eval mode (modes restored), on the CPU."""
    with evaluating(model), torch.no_grad():
        return model(images.to(model_device(model))).softmax(dim=1).cpu()


def accuracy(model: nn.Module, images: Images, batch_size: int = 500) -> float:
    """Top-1 (%) on ``images``."""
    correct = 0
    for inputs, labels in images.batches(batch_size):
        correct += int((probabilities(model, inputs).argmax(dim=1) == labels).sum())
    return 100.0 * correct / len(images)


# --- drawing ----------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No Software/date metadata, so the same numbers give the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def _display(pixels: Tensor) -> np.ndarray:
    """(3, H, W) uint8 -> (H, W, 3) for imshow."""
    return pixels.permute(1, 2, 0).numpy()


def _unit_of(path: str) -> tuple[int | None, str]:
    """``layer2.1.se.attention.0`` -> (1, "2.1"): the unit index and a short name."""
    parts = path.split(".")
    if len(parts) > 1 and parts[0].startswith("layer") and parts[1].isdigit():
        return int(parts[1]), f"{parts[0][5:]}.{parts[1]}"
    return None, path


def _colorbar(fig, axes, cmap: str, low: float, high: float, label: str, **kwargs):
    """A colorbar for ``cmap`` on [low, high], opaque even where the maps were drawn
    half-transparent over the images."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(low, high), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, **kwargs)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _pct(fraction: float) -> str:
    """A fraction as a whole percentage, but never rounding a nonzero one to 0%."""
    return "<1%" if 0 < fraction < 0.005 else f"{fraction:.0%}"


def _no_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _class_labels(images: Images, classes: Sequence[str | int] | None) -> list[int]:
    """Labels of ``classes`` (names or labels) present in ``images``; names that are not
    class folders fall back to the first four labels (e.g. a generated test tree)."""
    present = sorted(set(images.labels.tolist()))
    wanted = EXCITATION_CLASSES if classes is None else classes
    labels = []
    for cls in wanted:
        label = images.classes.index(cls) if isinstance(cls, str) and cls in images.classes else cls
        if isinstance(label, int) and label in present:
            labels.append(label)
    return labels or present[:4]


# --- SENet: excitations -----------------------------------------------------------------


def excitation_figure(
    trained: TrainedModel,
    images: Images,
    path: str | os.PathLike,
    *,
    classes: Sequence[str | int] | None = None,
    excitations: Sequence[ClassExcitation] | None = None,
) -> dict[str, Any]:
    """SENet's Fig. 6 for one model: per block (rows: stages, columns: units), the mean
    gate of every channel over the images of each of ``classes`` (names or labels; default
    ``EXCITATION_CLASSES``) and over all images.

    ``excitations``: ``class_excitations(model, images)`` if already computed (every class,
    so that the specificity counts them all). Each panel's title also says how many of the
    block's hidden MLP units fire (``bench.analysis.hidden_activity``), where it has an MLP.
    Returns ``{"excitations": [...], "specificity": {block path: float}, "activity":
    {block path: HiddenActivity}, "classes": [shown labels]}``."""
    if excitations is None:
        excitations = class_excitations(trained.model, images.batches())
    activity = hidden_activity(trained.model, images.batches())
    shown = _class_labels(images, classes)
    rows_of: dict[int | None, list[ClassExcitation]] = {}
    for ex in excitations:
        rows_of.setdefault(ex.stage, []).append(ex)
    stages = list(rows_of)
    ncols = max(len(v) for v in rows_of.values())
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(stages),
        ncols,
        figsize=(4.2 * ncols, 2.8 * len(stages) + 0.8),
        layout="constrained",
        squeeze=False,
    )
    handles = None
    for r, stage in enumerate(stages):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(rows_of[stage]):
                fig.delaxes(ax)  # a stage with fewer blocks: no empty panel
                continue
            ex = rows_of[stage][c]
            channels = np.arange(ex.mean.shape[1])
            for i, label in enumerate(shown):
                row = ex.classes.index(label)
                ax.plot(
                    channels,
                    ex.mean[row].numpy(),
                    color=f"C{i}",
                    linewidth=1.0,
                    label=images.name(label),
                )
            ax.plot(
                channels,
                ex.overall.numpy(),
                color="black",
                linestyle="--",
                linewidth=1.0,
                label="all classes",
            )
            _, short = _unit_of(ex.path)
            title = f"block {short}: specificity {ex.specificity:.3f}"
            if ex.path in activity:
                act = activity[ex.path]
                title += f"\nhidden units firing: {act.active}/{act.units} ({_pct(act.fraction)})"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("channel index", fontsize=8)
            ax.set_ylabel("mean excitation", fontsize=8)
            ax.set_xlim(0, len(channels) - 1)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            handles = ax.get_legend_handles_labels()
    if handles:
        fig.legend(*handles, loc="outside lower center", ncol=len(shown) + 1, fontsize=9)
    fig.suptitle(
        f"{trained.label}: mean excitation per channel by class (SENet Fig. 6); "
        f"{len(images)} test images\n{trained.schedule}",
        fontsize=10,
    )
    _save(fig, path)
    return {
        "excitations": list(excitations),
        "specificity": {ex.path: ex.specificity for ex in excitations},
        "activity": activity,
        "classes": shown,
    }


def specificity_figure(
    excitations: Mapping[str, Sequence[ClassExcitation]],
    labels: Mapping[str, str],
    path: str | os.PathLike,
    *,
    title: str = "",
    note: str = "",
) -> dict[str, list[tuple[str, float]]]:
    """Class specificity by depth, one line per model (``excitations``: model name ->
    ``class_excitations`` of it; ``labels``: model name -> legend text). Blocks are placed
    by their path, in the order the first model has them. Returns model name ->
    ``[(block path, specificity), ...]``. ``note``: more lines under the title (e.g.
    ``models_note``)."""
    order: list[str] = []
    for exs in excitations.values():
        order += [ex.path for ex in exs if ex.path not in order]
    numbers = {name: [(ex.path, ex.specificity) for ex in exs] for name, exs in excitations.items()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(10.0, 0.6 * len(order) + 3), 4.4), layout="constrained")
    for i, (name, values) in enumerate(numbers.items()):
        xs = [order.index(p) for p, _ in values]
        ax.plot(
            xs,
            [v for _, v in values],
            marker="osD^v"[i % 5],
            color=f"C{i}",
            label=labels.get(name, name),
        )
    stage_of = [ex.stage for exs in excitations.values() for ex in exs]
    stages = {
        path: stage
        for path, stage in zip(
            [ex.path for exs in excitations.values() for ex in exs], stage_of, strict=True
        )
    }
    for x in range(1, len(order)):
        if stages[order[x]] != stages[order[x - 1]]:
            ax.axvline(x - 0.5, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(order)), [_unit_of(p)[1] for p in order], fontsize=8)
    ax.set_xlabel("block (stage.unit), input side to output side")
    ax.set_ylabel("class specificity\n(mean over channels of std across classes)")
    title = title or "How class-specific the channel gates are, by depth"
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return numbers


# --- CBAM: spatial gates and Grad-CAM ---------------------------------------------------


def _last_per_stage(outputs):
    last = {}
    for out in outputs:
        last[out.stage] = out
    return [last[stage] for stage in sorted(last, key=lambda s: (s is None, s))]


def attention_maps_figure(
    models: Mapping[str, TrainedModel],
    images: Images,
    path: str | os.PathLike,
    *,
    gradcam: Sequence[str] = GRADCAM_MODELS,
    spatial: str | None = "cbam",
) -> dict[str, Any]:
    """CBAM's Fig. 4 and spatial gates: one row per image; the image, Grad-CAM of its true
    class for each model of ``gradcam`` (``p``: that model's softmax probability of the
    class), and the spatial gate of the ``spatial`` model at the last unit of each stage.

    Returns ``{"labels": (N,), "cams": {name: (N, H, W)}, "probabilities": {name: (N,)},
    "predictions": {name: (N,)}, "spatial": {block path: (N, h, w)}}``."""
    labels = images.labels
    cams, probs, preds = {}, {}, {}
    for name in gradcam:
        model = models[name].model
        cams[name] = grad_cam(model, images.inputs, targets=labels.tolist())
        p = probabilities(model, images.inputs)
        probs[name] = p[torch.arange(len(labels)), labels]
        preds[name] = p.argmax(dim=1)
    gates = []
    if spatial is not None:
        outputs = collect(models[spatial].model, images.inputs, kinds=("spatial",))
        gates = _last_per_stage(select(outputs, kind="spatial"))
    ncols = 1 + len(gradcam) + len(gates)
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(images),
        ncols,
        figsize=(1.75 * ncols + 0.6, 1.75 * len(images) + 1.6),
        layout="constrained",
        squeeze=False,
    )
    gate_ranges = [(out, out.tensor.min().item(), out.tensor.max().item()) for out in gates]
    for r in range(len(images)):
        picture = _display(images.pixels[r])
        height, width = picture.shape[:2]
        ax = axes[r][0]
        ax.imshow(picture)
        ax.set_ylabel(images.name(int(labels[r])), fontsize=9)
        _no_ticks(ax)
        if r == 0:
            ax.set_title("test image", fontsize=9)
        for c, name in enumerate(gradcam, start=1):
            ax = axes[r][c]
            ax.imshow(picture)
            ax.imshow(cams[name][r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            guess = "" if preds[name][r] == labels[r] else f" ({images.name(int(preds[name][r]))})"
            ax.set_xlabel(f"p={probs[name][r]:.2f}{guess}", fontsize=7)
            _no_ticks(ax)
            if r == 0:
                ax.set_title(f"Grad-CAM\n{models[name].label}", fontsize=8)
        for g, out in enumerate(gates):
            ax = axes[r][1 + len(gradcam) + g]
            gate = out.tensor[r].numpy()
            _, low, high = gate_ranges[g]
            ax.imshow(picture)
            ax.imshow(
                gate,
                cmap="viridis",
                alpha=0.75,
                vmin=low,
                vmax=high,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            )
            if r == 0:
                h, w = gate.shape
                ax.set_title(
                    f"{models[spatial].label.split(' + ')[-1]} spatial gate\n"
                    f"block {_unit_of(out.path)[1]} ({h}x{w})",
                    fontsize=8,
                )
            _no_ticks(ax)
    if gradcam:
        _colorbar(
            fig, axes[:, 1 : 1 + len(gradcam)], "jet", 0.0, 1.0,
            "Grad-CAM of the true class (min-max scaled per image)",
            location="bottom", shrink=0.8, aspect=30,
        )  # fmt: skip
    for g, (out, low, high) in enumerate(gate_ranges):
        column = 1 + len(gradcam) + g
        _colorbar(
            fig, axes[:, column], "viridis", low, high, f"gate value, {_unit_of(out.path)[1]}",
            location="bottom", shrink=0.9, aspect=12,
        )  # fmt: skip
    fig.suptitle(
        "Grad-CAM (CBAM Fig. 4) and CBAM's spatial attention on CIFAR-10 test images; "
        "p: probability of the true class\n"
        + models_note(models, list(dict.fromkeys([*gradcam, *([spatial] if spatial else [])]))),
        fontsize=9,
    )
    _save(fig, path)
    return {
        "labels": labels,
        "cams": cams,
        "probabilities": probs,
        "predictions": preds,
        "spatial": {out.path: out.tensor for out in gates},
    }


# --- GCNet: non-local attention maps and query independence -----------------------------


def _query_pixel(index: int, query_shape, image_shape) -> tuple[float, float]:
    """(y, x) in input pixels of the centre of query ``index`` of a ``query_shape`` grid."""
    qh, qw = query_shape
    row, col = divmod(int(index), qw)
    return ((row + 0.5) * image_shape[0] / qh - 0.5, (col + 0.5) * image_shape[1] / qw - 0.5)


def non_local_figure(
    trained: TrainedModel,
    images: Images,
    path: str | os.PathLike,
    *,
    shown: Images | None = None,
    queries: Sequence[tuple[float, float]] = DEFAULT_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """GCNet's Fig. 2: the first non-local block's attention maps for ``queries`` ((y, x)
    fractions of the map) on the ``shown`` images (default: the first four of ``images``,
    one per class), and the query independence (``bench.analysis.query_independence``:
    mean cosine distance between the maps of every pair of query positions) over all of
    ``images``, beside the same architecture at initialisation (``torch.manual_seed(seed)``).

    Returns ``{"path", "maps": (n, Q, h', w'), "query_index", "query_shape", "key_shape",
    "shown_independence": (n,), "independence": (N,), "mean_independence",
    "init_independence"}``."""
    shown = shown if shown is not None else images.one_per_class(4)
    outputs = select(collect(trained.model, shown.inputs, kinds=("attention",), queries=queries))
    if not outputs:
        raise ValueError(f"{trained.name}: the model has no non-local or position attention")
    out = outputs[0]
    maps = out.maps()

    def independence(model: nn.Module, inputs: Tensor) -> Tensor:
        values = []
        for start in range(0, len(inputs), 100):
            rows = collect(model, inputs[start : start + 100], kinds=("attention",), queries="all")
            block = next(o for o in rows if o.path == out.path)
            values.append(query_independence(block.tensor))
        return torch.cat(values)

    per_image = independence(trained.model, images.inputs)
    shown_values = query_independence(
        next(
            o
            for o in collect(trained.model, shown.inputs, kinds=("attention",), queries="all")
            if o.path == out.path
        ).tensor
    )
    torch.manual_seed(seed)
    fresh = build_from_record(trained.record).eval()
    init_values = independence(fresh, images.inputs)

    qh, qw = out.query_shape
    nq = maps.shape[1]
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(shown),
        1 + nq,
        figsize=(1.9 * (1 + nq) + 0.4, 1.9 * len(shown) + 1.5),
        layout="constrained",
        squeeze=False,
    )
    vmax = maps.max().item()
    for r in range(len(shown)):
        picture = _display(shown.pixels[r])
        height, width = picture.shape[:2]
        points = [_query_pixel(i, (qh, qw), (height, width)) for i in out.query_index]
        ax = axes[r][0]
        ax.imshow(picture)
        for q, (y, x) in enumerate(points):
            ax.scatter(
                [x],
                [y],
                s=60,
                marker="o",
                facecolors="none",
                edgecolors=f"C{q}",
                linewidths=2,
                label=f"query {q + 1}" if r == 0 else None,
            )
        ax.set_ylabel(f"{shown.name(int(shown.labels[r]))}\nd={shown_values[r]:.3f}", fontsize=8)
        _no_ticks(ax)
        if r == 0:
            ax.set_title("image and queries", fontsize=8)
        for q in range(nq):
            ax = axes[r][1 + q]
            ax.imshow(picture)
            ax.imshow(
                maps[r, q].numpy(),
                cmap="jet",
                alpha=0.55,
                vmin=0,
                vmax=vmax,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            )
            y, x = points[q]
            ax.scatter(
                [x], [y], s=60, marker="o", facecolors="none", edgecolors="white", linewidths=2
            )
            ax.scatter(
                [x], [y], s=25, marker="o", facecolors="none", edgecolors=f"C{q}", linewidths=1.5
            )
            _no_ticks(ax)
            if r == 0:
                fy, fx = queries[q]
                ax.set_title(f"query {q + 1} at ({fy:g}, {fx:g})", fontsize=8)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower left", ncol=nq, fontsize=8)
    _colorbar(
        fig, axes[:, 1:], "jet", 0.0, vmax,
        f"attention weight of each key position ({out.key_shape[0]}x{out.key_shape[1]} keys, "
        "max-pooled grid; each map sums to 1)",
        location="bottom", shrink=0.6, aspect=35,
    )  # fmt: skip
    kh, kw = out.key_shape
    fig.suptitle(
        f"{trained.label}: non-local block {_unit_of(out.path)[1]} ({qh}x{qw} queries, "
        f"{kh}x{kw} keys), GCNet Fig. 2\n"
        f"query independence d (mean cosine distance between the maps of all query pairs): "
        f"{per_image.mean():.3f} over {len(images)} test images (at initialisation: "
        f"{init_values.mean():.3f}); 0 = every query attends alike\n{trained.schedule}",
        fontsize=9,
    )
    _save(fig, path)
    return {
        "path": out.path,
        "maps": maps,
        "query_index": out.query_index,
        "query_shape": out.query_shape,
        "key_shape": out.key_shape,
        "shown_independence": shown_values,
        "independence": per_image,
        "mean_independence": per_image.mean().item(),
        "init_independence": init_values.mean().item(),
    }


# --- ParseNet: receptive fields ---------------------------------------------------------


def stage_layers(model: nn.Module) -> list[str]:
    """The residual stages' names (``layer1``, ``layer2``, ...)."""
    return [f"layer{stage.index}" for stage in describe_backbone(model).stages]


def theoretical_box(theory, unit, image_shape=None) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) in input pixels of a unit's theoretical receptive field,
    centred on input pixel ``unit * jump`` (the convolutions are 'same'-padded, so unit i
    of a stride-s layer is centred on input pixel s * i)."""
    (sh, sw), (jh, jw) = theory.size, theory.jump
    cy, cx = unit[0] * jh, unit[1] * jw
    return (cy - (sh - 1) / 2, cx - (sw - 1) / 2, cy + (sh - 1) / 2, cx + (sw - 1) / 2)


def _box(ax, box, label: str, **style) -> None:
    """Outline the pixels ``(top, left, bottom, right)`` (inclusive) of an image axis."""
    from matplotlib.patches import Rectangle

    top, left, bottom, right = box
    size = (right - left + 1, bottom - top + 1)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), *size, fill=False, label=label, **style))


def receptive_field_figure(
    models: Mapping[str, TrainedModel],
    images: Images,
    path: str | os.PathLike,
    *,
    reference: str = "none",
    layers: Sequence[str] | None = None,
    trials: int = 2,
    stride: int = 1,
    threshold: float = 0.1,
) -> dict[str, dict[str, dict[str, Any]]]:
    """ParseNet's Fig. 2: the empirical receptive field of the centre unit of each stage's
    output (``bench.analysis.empirical_receptive_field`` on ``images``, change averaged over
    them, box at ``threshold`` of the peak) against the theoretical one. Top row: the
    ``reference`` model's change maps with both boxes; bottom: both sizes for every model.

    Returns model name -> layer -> ``{"empirical": (h, w), "box", "theoretical": (h, w),
    "jump", "unit", "change": (H', W')}``."""
    numbers: dict[str, dict[str, dict[str, Any]]] = {}
    for name, trained in models.items():
        names = layers or stage_layers(trained.model)
        numbers[name] = {}
        for layer in names:
            rf = empirical_receptive_field(
                trained.model,
                images.inputs,
                layer=layer,
                trials=trials,
                stride=stride,
                threshold=threshold,
            )
            theory = theoretical_receptive_field(trained.model, layer)
            numbers[name][layer] = {
                "empirical": rf.size,
                "box": rf.box,
                "theoretical": theory.size,
                "jump": theory.jump,
                "unit": rf.unit,
                "change": rf.change,
            }
    ref = numbers[reference]
    names = list(ref)
    height, width = images.inputs.shape[-2:]
    plt = _pyplot()
    fig = plt.figure(figsize=(3.6 * len(names) + 0.5, 7.4), layout="constrained")
    grid = fig.add_gridspec(2, len(names), height_ratios=[1.15, 1])
    for c, layer in enumerate(names):
        ax = fig.add_subplot(grid[0, c])
        entry = ref[layer]
        change = entry["change"] / entry["change"].max()
        ax.imshow(
            change.numpy(),
            cmap="magma",
            vmin=0,
            vmax=1,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        )
        top, left, bottom, right = theoretical_box(
            theoretical_receptive_field(models[reference].model, layer), entry["unit"]
        )
        _box(ax, (0, 0, height - 1, width - 1), "image border", edgecolor="0.75", linestyle=":")
        _box(ax, entry["box"], f"empirical ({threshold:.0%} of peak)", edgecolor="cyan",
             linewidth=2)  # fmt: skip
        _box(ax, (top, left, bottom, right), "theoretical", edgecolor="red", linestyle="--",
             linewidth=1.5)  # fmt: skip
        pad = 2
        ax.set_xlim(min(left, -0.5) - pad, max(right, width - 0.5) + pad)
        ax.set_ylim(max(bottom, height - 0.5) + pad, min(top, -0.5) - pad)
        ax.set_facecolor("0.92")
        eh, ew = entry["empirical"]
        th, tw = entry["theoretical"]
        ax.set_title(
            f"{layer} output, unit {tuple(entry['unit'])}\nempirical {eh}x{ew}, "
            f"theoretical {th}x{tw}",
            fontsize=9,
        )
        ax.set_xlabel("input x (pixels)", fontsize=8)
        ax.set_ylabel("input y (pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
        if c == 0:
            boxes = ax.get_legend_handles_labels()  # drawn in the bottom panel's legend
    _colorbar(
        fig, fig.axes, "magma", 0.0, 1.0, "change of the unit / its largest change",
        location="right", shrink=0.5,
    )  # fmt: skip
    ax = fig.add_subplot(grid[1, :])
    xs = np.arange(len(names))
    theory = [ref[layer]["theoretical"][0] for layer in names]
    ax.plot(xs, theory, color="black", marker="x", linestyle="--", label="theoretical (all)")
    offsets = np.linspace(-0.12, 0.12, len(numbers)) if len(numbers) > 1 else [0.0]
    for i, (name, per_layer) in enumerate(numbers.items()):
        sizes = [per_layer[layer]["empirical"][0] for layer in names if layer in per_layer]
        ax.plot(
            xs[: len(sizes)] + offsets[i],
            sizes,
            marker="osD^vP"[i % 6],
            color=f"C{i}",
            label=f"empirical, {models[name].label}",
        )
    ax.axhline(height, color="0.5", linestyle=":", label=f"image height ({height} px)")
    ax.set_xticks(xs, [f"{layer} output" for layer in names])
    ax.set_ylabel("receptive field height (input pixels)")
    ax.set_xlabel("layer (centre unit)")
    ax.set_title("theoretical vs empirical receptive field, every model", fontsize=9)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(
        [*boxes[0], *handles],
        [f"top row: {name}" for name in boxes[1]] + names,
        fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
    )  # fmt: skip
    fig.suptitle(
        f"ParseNet Fig. 2: a 1-pixel noise patch ({_plural(trials, 'draw')} per position) slid "
        f"over {_plural(len(images), 'test image')}; top row: {models[reference].label}\n"
        + models_note(models),
        fontsize=10,
    )
    _save(fig, path)
    return numbers


# --- the run records --------------------------------------------------------------------


def cost_gain_figure(
    runs: str | os.PathLike, path: str | os.PathLike, ablations: Sequence[str] | None = None
) -> list[dict] | None:
    """Each trained variant's seed-paired top-1 difference to its ablation's baseline (mean
    and 95% interval, ``bench.tables``) against its extra parameters (% of the baseline's)
    and its training throughput (% of the baseline's), for every ablation in ``runs`` (or
    those of ``ablations``). Returns one dict per variant, or None (no figure written)
    when no trained table has a baseline."""
    from bench.records import load_records
    from bench.tables import build_tables

    tables = [
        t
        for t in build_tables(load_records(runs))
        if not t.cost_only and (ablations is None or t.ablation in ablations)
    ]
    points = []
    for table in tables:
        by_label = {row.variant.label: row for row in table.rows}
        for row in table.rows:
            base = by_label.get(row.baseline.label) if row.baseline is not None else None
            if base is None or row.delta is None or row.delta.mean is None:
                continue
            points.append(
                {
                    "table": table.stem,
                    "variant": row.variant.label,
                    "baseline": base.variant.label,
                    "n_pairs": row.delta.n,
                    "delta": row.delta.mean,
                    "low": row.delta.low,
                    "high": row.delta.high,
                    "verdict": row.verdict,
                    "params_pct": _extra_pct(row.params.mean, base.params.mean),
                    "throughput_pct": _ratio_pct(row.throughput.mean, base.throughput.mean),
                }
            )
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained", sharey=True)
    panels = (
        ("params_pct", "extra parameters (% of the baseline's)", 0.0),
        ("throughput_pct", "training throughput (% of the baseline's img/s)", 100.0),
    )
    for ax, (key, xlabel, neutral) in zip(axes, panels, strict=True):
        for i, p in enumerate(points):
            if p[key] is None:
                continue
            yerr = None
            if p["low"] is not None:
                yerr = [[p["delta"] - p["low"]], [p["high"] - p["delta"]]]
            ax.errorbar(
                p[key],
                p["delta"],
                yerr=yerr,
                fmt="osD^vP*X"[i % 8],
                color=f"C{i}",
                capsize=3,
                label=f"{p['table']}: {p['variant']}",
            )
        ax.axhline(0.0, color="0.3", linewidth=1)
        ax.axvline(neutral, color="0.6", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ top-1 vs baseline (points),\nseed-paired mean and 95% CI")
    axes[0].set_title("gain against parameters", fontsize=9)
    axes[1].set_title("gain against measured training speed (shared machine: noisy)", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("What the blocks buy and what they cost, every trained ablation", fontsize=10)
    _save(fig, path)
    return points


def _ratio_pct(value: float | None, base: float | None) -> float | None:
    """``value`` as a percentage of ``base`` (None where either is missing)."""
    if value is None or not base:
        return None
    return 100.0 * value / base


def _extra_pct(value: float | None, base: float | None) -> float | None:
    """How much ``value`` exceeds ``base``, in % of ``base``."""
    ratio = _ratio_pct(value, base)
    return None if ratio is None else ratio - 100.0


# --- the ablation report (notebooks/ablation_report.ipynb) ------------------------------


def paper_table_markdown(table) -> str:
    """The paper's table an ablation reproduces (``results/reference/<paper>.yaml``), all
    its rows and fields, and which of our variants stands for each row in which setting
    (our accuracy is comparable only there). ``table``: a ``bench.tables.Table``. Empty
    when the ablation names no paper table."""
    from bench.reference import load_reference

    if not table.paper_name or not table.paper_table:
        return ""
    spec = load_reference(table.paper_name)["tables"][table.paper_table]
    ours: dict[str, list[str]] = {}
    for row in table.rows:
        refs = row.variant.ref
        pairs = refs.items() if isinstance(refs, Mapping) else [("", refs)]
        for setting, ref in pairs:
            if ref:
                where = f" ({setting})" if setting else ""
                ours.setdefault(str(ref), []).append(f"{row.variant.label}{where}")
    fields = list(dict.fromkeys(k for fields in spec["rows"].values() for k in fields))
    fields = [k for k in fields if k != "note"]
    rows = [
        [f"`{key}`", *(str(values.get(k, "")) for k in fields), "; ".join(ours.get(key, []))]
        for key, values in spec["rows"].items()
    ]
    head = [
        f"**{table.paper_name}, table `{table.paper_table}`**: {spec.get('source', '')}. "
        f"{spec.get('description', '')}".strip(),
        "",
    ]
    return "\n".join(head + _md_table(["row", *fields, "our variant"], rows))


def seed_statistics_markdown(table) -> str:
    """Every seed's top-1 of each row of a trained ``bench.tables.Table``, with the
    statistics the table reports: mean, sample std and 95% t interval of the row
    (``bench.stats.summarize``), and the per-seed differences to the baseline run of the
    same seed (``bench.stats.paired_differences``) with their mean, interval and verdict."""
    from bench.stats import paired_differences, summarize

    by_label = {row.variant.label: row for row in table.rows}

    def per_seed(row) -> dict:
        return {seed: float(np.mean(values)) for seed, values in row.top1_by_seed.items()}

    def interval(summary, sign: str = "") -> str:
        if summary.low is None:
            return ""
        return f"[{summary.low:{sign}.2f}, {summary.high:{sign}.2f}]"

    rows = []
    for row in table.rows:
        ours = per_seed(row)
        top1 = summarize(list(ours.values()))
        seeds = ", ".join(f"s{seed}: {value:.2f}" for seed, value in sorted(ours.items()))
        cells = [row.variant.label, seeds, f"{top1.mean:.2f}" if top1.mean is not None else ""]
        cells += ["" if top1.std is None else f"{top1.std:.2f}", interval(top1)]
        base = by_label.get(row.baseline.label) if row.baseline is not None else None
        if base is None or base is row:
            cells += ["", "", "", row.verdict]
        else:
            diffs = paired_differences(ours, per_seed(base))
            delta = summarize(list(diffs.values()))
            cells += [
                ", ".join(f"s{seed}: {value:+.2f}" for seed, value in diffs.items()),
                "" if delta.mean is None else f"{delta.mean:+.2f}",
                interval(delta, "+"),
                row.verdict,
            ]
        rows.append(cells)
    header = ["variant", "top-1 by seed", "mean", "std", "95% CI", "Δ vs baseline by seed",
              "Δ mean", "Δ 95% CI", "verdict"]  # fmt: skip
    return "\n".join(_md_table(header, rows))


# --- everything -------------------------------------------------------------------------


def make_figures(
    out: str | os.PathLike = "results/figures",
    weights: str | os.PathLike = "results/analysis/weights",
    data: str | os.PathLike | None = None,
    runs: str | os.PathLike | None = "results/runs",
    *,
    per_class: int = 100,
    rf_images: int = RF_IMAGES,
    rf_trials: int = RF_TRIALS,
    log=print,
) -> dict[str, Any]:
    """Every figure of the module docstring into ``out``, and ``out/README.md``; returns
    figure name -> the numbers it shows. ``per_class`` test images of every class feed
    the excitation and query-independence statistics; ``rf_images`` images (one per class)
    and ``rf_trials`` noise draws the receptive fields."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(weights)
    images = load_images(data, per_class=per_class)
    shown = images.one_per_class(6)
    log(f"{len(models)} models from {weights}; {len(images)} test images from {data or 'default'}")
    numbers: dict[str, Any] = {}
    measured = {name: accuracy(models[name].model, images) for name in models}
    excitations = {
        name: class_excitations(models[name].model, images.batches()) for name in CHANNEL_GATED
    }
    numbers["excitation_se"] = excitation_figure(
        models["se"], images, out / "excitation_se.png", excitations=excitations["se"]
    )
    log("excitation_se.png")
    numbers["class_specificity"] = specificity_figure(
        excitations,
        {name: models[name].label for name in excitations},
        out / "class_specificity.png",
        title=f"Class specificity of the channel gates by depth, {len(images)} test images",
        note=models_note(models, CHANNEL_GATED),
    )
    log("class_specificity.png")
    numbers["attention_maps"] = attention_maps_figure(models, shown, out / "attention_maps.png")
    log("attention_maps.png")
    numbers["non_local"] = non_local_figure(models["non_local"], images, out / "non_local.png")
    log("non_local.png")
    numbers["receptive_fields"] = receptive_field_figure(
        models,
        shown.take(range(min(rf_images, len(shown)))),
        out / "receptive_fields.png",
        trials=rf_trials,
    )
    log("receptive_fields.png")
    if runs is not None and Path(runs).is_dir():
        numbers["cost_vs_gain"] = cost_gain_figure(runs, out / "cost_vs_gain.png")
        if numbers["cost_vs_gain"] is not None:
            log("cost_vs_gain.png")
    (out / "README.md").write_text(figures_readme(models, numbers, measured, len(images)))
    log(f"figures and README.md in {out}")
    return numbers


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def models_markdown(
    models: Mapping[str, TrainedModel], measured: Mapping[str, float], n_images: int
) -> str:
    """The models: name, label, schedule (epochs, recipe, the run's top-1 and wall time)
    and ``measured``, their top-1 (%) on the ``n_images`` test images the figures use."""
    rows = [
        [f"`{name}`", m.label, m.schedule, f"{measured[name]:.2f}% of {n_images}"]
        for name, m in models.items()
    ]
    return "\n".join(_md_table(["name", "model", "how it was trained", "top-1 here"], rows))


def specificity_markdown(
    specificity: Mapping[str, Sequence[tuple[str, float]]], models: Mapping[str, TrainedModel]
) -> str:
    """``specificity_figure``'s numbers: a row per block, a column per model."""
    values = {name: dict(pairs) for name, pairs in specificity.items()}
    blocks = list(dict.fromkeys(path for pairs in specificity.values() for path, _ in pairs))
    rows = [
        [_unit_of(block)[1]]
        + [f"{values[n][block]:.4f}" if block in values[n] else "" for n in specificity]
        for block in blocks
    ]
    header = ["block", *(models[name].label for name in specificity)]
    return "\n".join(_md_table(header, rows))


def activity_markdown(activity: Mapping[str, Any]) -> str:
    """``hidden_activity``'s numbers: per block, its hidden units, how many fire on some
    image, and how often a unit fires."""
    rows = [
        [_unit_of(path)[1], str(a.units), str(a.active), _pct(a.fraction)]
        for path, a in activity.items()
    ]
    header = ["block", "hidden units", "firing on some image", "mean fraction firing"]
    return "\n".join(_md_table(header, rows))


def attention_maps_markdown(numbers: Mapping[str, Any], models: Mapping[str, TrainedModel]) -> str:
    """``attention_maps_figure``'s numbers: each model's mean probability of the true class
    and how many of the shown images it gets right."""
    labels = numbers["labels"]
    rows = [
        [
            models[name].label,
            f"{p.mean():.3f}",
            f"{int((numbers['predictions'][name] == labels).sum())}/{len(labels)}",
        ]
        for name, p in numbers["probabilities"].items()
    ]
    return "\n".join(_md_table(["model", "mean p of the true class", "correct"], rows))


def non_local_markdown(numbers: Mapping[str, Any]) -> str:
    """``non_local_figure``'s numbers: the block and its query independence."""
    (qh, qw), (kh, kw) = numbers["query_shape"], numbers["key_shape"]
    values = numbers["independence"]
    return "\n".join(
        [
            f"Block `{numbers['path']}`, {qh}x{qw} query positions, {kh}x{kw} keys. Query "
            "independence (mean cosine distance between the attention maps of different "
            "queries; 0: every query attends to the same places):",
            "",
            f"- trained: {numbers['mean_independence']:.4f} (mean over {len(values)} test "
            f"images; min {values.min():.4f}, max {values.max():.4f})",
            f"- the same block at initialisation: {numbers['init_independence']:.4f}",
        ]
    )


def receptive_fields_markdown(
    numbers: Mapping[str, Mapping[str, Mapping[str, Any]]], models: Mapping[str, TrainedModel]
) -> str:
    """``receptive_field_figure``'s numbers: theoretical and empirical sizes per layer."""
    first = next(iter(numbers.values()))
    size = "{}x{}".format
    rows = [["theoretical", *(size(*entry["theoretical"]) for entry in first.values())]]
    rows += [
        [models[name].label, *(size(*entry["empirical"]) for entry in per_layer.values())]
        for name, per_layer in numbers.items()
    ]
    return "\n".join(_md_table(["model", *(f"{layer} output" for layer in first)], rows))


def cost_gain_markdown(points: Sequence[Mapping[str, Any]]) -> str:
    """``cost_gain_figure``'s numbers."""
    rows = []
    for p in points:
        ci = "" if p["low"] is None else f" [{p['low']:+.2f}, {p['high']:+.2f}]"
        rows.append(
            [
                p["table"],
                p["variant"],
                f"{p['delta']:+.2f}{ci}",
                p["verdict"],
                "" if p["params_pct"] is None else f"{p['params_pct']:+.1f}%",
                "" if p["throughput_pct"] is None else f"{p['throughput_pct']:.0f}%",
            ]
        )
    header = ["table", "variant", "Δ top-1 vs baseline [95% CI]", "verdict", "extra params",
              "throughput vs baseline"]  # fmt: skip
    return "\n".join(_md_table(header, rows))


def figures_readme(
    models: Mapping[str, TrainedModel],
    numbers: Mapping[str, Any],
    measured: Mapping[str, float],
    n_images: int,
) -> str:
    """``results/figures/README.md``: the models, then a caption and the numbers of each
    figure (fixed formats, no timestamps: the same models give the same text)."""
    sections = [
        "# Figures\n\nGenerated by `make figures` (`python -m bench.figures`) from the weights "
        "in `results/analysis/weights/` and the run records in `results/runs/`; do not edit "
        "by hand. How the models were trained: `results/analysis/README.md`.",
        "## Models\n\n" + models_markdown(models, measured, n_images),
    ]
    if "class_specificity" in numbers:
        sections.append(
            "## SENet Fig. 6: excitations by class (`excitation_se.png`, "
            "`class_specificity.png`)\n\nMean gate of every channel over the test images of "
            "each class. Class specificity: mean over channels of the standard deviation "
            "across the classes of the class-mean gate (0: every class gets the same "
            "gates).\n\n" + specificity_markdown(numbers["class_specificity"], models)
        )
    if numbers.get("excitation_se", {}).get("activity"):
        sections.append(
            "Hidden units of SE's excitation MLP (C -> C/16 -> C: 1, 2 and 4 units in "
            "ResNet-20's stages) that fire (ReLU output > 0) on the test images; a block "
            "whose units never fire gives every image the same gate, sigmoid(bias):\n\n"
            + activity_markdown(numbers["excitation_se"]["activity"])
        )
    if "attention_maps" in numbers:
        sections.append(
            "## Grad-CAM and CBAM's spatial gates (`attention_maps.png`)\n\nOne test image "
            "per class (the first of each); Grad-CAM of the true class at the last stage's "
            "output; p: the model's probability of the true class.\n\n"
            + attention_maps_markdown(numbers["attention_maps"], models)
        )
    if "non_local" in numbers:
        sections.append(
            "## GCNet Fig. 2: non-local attention maps (`non_local.png`)\n\n"
            + non_local_markdown(numbers["non_local"])
        )
    if "receptive_fields" in numbers:
        sections.append(
            "## ParseNet Fig. 2: receptive fields (`receptive_fields.png`)\n\nHeight x width "
            "in input pixels of the centre unit's receptive field: theoretical (convolutions "
            "and poolings alone) and empirical (where a 1-pixel noise patch changes the unit "
            "by at least 10% of its largest change).\n\n"
            + receptive_fields_markdown(numbers["receptive_fields"], models)
        )
    if numbers.get("cost_vs_gain"):
        sections.append(
            "## Gain against cost, from the run records (`cost_vs_gain.png`)\n\n"
            + cost_gain_markdown(numbers["cost_vs_gain"])
        )
    return "\n\n".join(section.rstrip("\n") for section in sections) + "\n"


# --- notebooks --------------------------------------------------------------------------

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def execute_notebook(
    path: str | os.PathLike, out: str | os.PathLike | None = None, timeout: int = 1800
) -> Any:
    """Run every cell of a notebook in a fresh ``python3`` kernel (headless, nbclient),
    from the notebook's folder, and write it with its outputs to ``out`` (default: in
    place). The kernel inherits this process's environment, so variables such as
    ``ATTN_BENCH_WEIGHTS`` reach the notebook. A failing cell raises nbclient's
    ``CellExecutionError`` and nothing is written. Returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no timestamps: re-running unchanged code gives a small diff
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    nbformat.write(notebook, Path(out) if out is not None else path)
    return notebook


def error_outputs(notebook: Any) -> list[str]:
    """``ename: evalue`` of every error output of an executed notebook."""
    return [
        f"{output.get('ename')}: {output.get('evalue')}"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


# --- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(
            prog="python -m bench.figures export",
            description="write <weights>/<NAME>.pt (weights) and <NAME>.json (run record)",
        )
        parser.add_argument("name", help="model name: none, se, cbam, eca, non_local, ...")
        parser.add_argument("record", type=Path, help="the run record (<run_id>.json)")
        parser.add_argument("checkpoint", type=Path, help="last.ckpt or a weights file")
        parser.add_argument("--weights", type=Path, default=Path("results/analysis/weights"))
        args = parser.parse_args(argv[1:])
        try:
            paths = export_weights(args.name, args.record, args.checkpoint, args.weights)
        except (OSError, ValueError, RuntimeError) as err:
            print(f"python -m bench.figures export: error: {err}", file=sys.stderr)
            return 2
        print(" ".join(str(p) for p in paths))
        return 0
    if argv[:1] == ["notebooks"]:
        parser = argparse.ArgumentParser(
            prog="python -m bench.figures notebooks",
            description="execute notebooks headless and save them with their outputs",
        )
        parser.add_argument(
            "paths", nargs="*", type=Path, help="default: notebooks/*.ipynb, in place"
        )
        args = parser.parse_args(argv[1:])
        for path in args.paths or sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
            print(f"executing {path}", flush=True)
            execute_notebook(path)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.figures",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("results/figures"))
    parser.add_argument("--weights", type=Path, default=Path("results/analysis/weights"))
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="CIFAR-10 ImageFolder root (default: $ATTN_BENCH_DATA/cifar10)",
    )
    parser.add_argument(
        "--runs", type=Path, default=Path("results/runs"), help="run records for cost_vs_gain.png"
    )
    parser.add_argument(
        "--per-class",
        type=int,
        default=100,
        help="test images per class for the statistics (default 100)",
    )
    parser.add_argument(
        "--rf-images",
        type=int,
        default=RF_IMAGES,
        help=f"images (one per class) for the receptive fields (default {RF_IMAGES})",
    )
    parser.add_argument(
        "--rf-trials",
        type=int,
        default=RF_TRIALS,
        help=f"noise draws per position for the receptive fields (default {RF_TRIALS})",
    )
    args = parser.parse_args(argv)
    try:
        make_figures(
            args.out, args.weights, args.data, args.runs, per_class=args.per_class,
            rf_images=args.rf_images, rf_trials=args.rf_trials,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"python -m bench.figures: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
