"""SENet's excitation analysis: how the channel gates differ between classes, by depth.

Hu et al., "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507, Sec. 7.2
and Fig. 6: the mean excitation of every channel over the images of one class, plotted for
a few classes at several depths; early gates are nearly the same for every class, later
ones become class-specific, and the last stage's saturate.

``class_excitations(model, batches)`` accumulates the class-mean gate of every injected
block with a channel gate (``collect``'s ``"channel"`` outputs, so also ECA, CBAM, ...);
``class_specificity`` turns one block's class means into one number.
``hidden_activity`` says how many hidden units of each excitation MLP (SE's and CBAM's
``channels -> channels / r -> channels``) ever fire: on a narrow network the bottleneck
is one to four units, and a dead one leaves a gate that is the same for every image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modules import attention_modules
from modules.parts import ChannelMLP

from .collect import collect
from .common import evaluating, model_device


def class_specificity(class_means: Tensor) -> float:
    """How class-specific a block's excitations are: the mean over channels of the
    standard deviation across classes of the class-mean excitation,

        specificity = mean_c sqrt( mean_k (e_kc - mean_k' e_k'c)^2 ),

    for ``class_means`` ``(K, C)`` (``e_kc`` the mean gate of channel c over the images of
    class k; population std over the K classes). It is 0 exactly when every class has the
    same mean excitation (e.g. a constant gate), and it is in the gate's units: for a
    sigmoid gate at most 0.5, reached when half the classes open a channel fully and the
    other half close it."""
    if class_means.ndim != 2 or class_means.shape[0] < 2:
        raise ValueError(
            f"class_means must be (K, C) with K >= 2 classes, got {tuple(class_means.shape)}"
        )
    return class_means.double().std(dim=0, unbiased=False).mean().item()


@dataclass(frozen=True)
class ClassExcitation:
    """The class-mean excitations of one block (one depth of SENet's Fig. 6)."""

    path: str
    block: str
    stage: int | None
    classes: tuple[int, ...]  # the rows of ``mean``
    mean: Tensor  # (K, C): mean gate per channel over the images of each class
    count: Tensor  # (K,): images of each class seen
    overall: Tensor  # (C,): mean gate over every image seen (Fig. 6's "all")

    @property
    def specificity(self) -> float:
        """``class_specificity(self.mean)``."""
        return class_specificity(self.mean)


def class_excitations(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    classes: Sequence[int] | None = None,
) -> list[ClassExcitation]:
    """Mean channel gate per class of every block with a channel gate, in ``collect``'s order.

    ``batches``: ``(images, labels)`` pairs, e.g. a DataLoader or a few batches of it.
    ``classes``: the classes to report (rows in this order); None: every label seen, sorted.
    Images of other classes count only in ``overall``. A requested class without images is
    a ValueError."""
    sums: dict[str, dict[int, Tensor]] = {}
    totals: dict[str, Tensor] = {}
    counts: dict[int, int] = {}
    seen = 0
    info: dict[str, tuple[str, int | None]] = {}
    for images, labels in batches:
        labels = torch.as_tensor(labels).cpu().long()
        outputs = collect(model, images, kinds=("channel",))
        if not outputs:
            raise ValueError("the model has no block with a channel gate")
        for label in labels.unique().tolist():
            counts[label] = counts.get(label, 0) + int((labels == label).sum())
        seen += len(labels)
        for out in outputs:
            info[out.path] = (out.block, out.stage)
            gates = out.tensor.double()  # (N, C)
            per_class = sums.setdefault(out.path, {})
            for label in labels.unique().tolist():
                part = gates[labels == label].sum(dim=0)
                per_class[label] = per_class.get(label, 0) + part
            totals[out.path] = totals.get(out.path, 0) + gates.sum(dim=0)
    if not seen:
        raise ValueError("batches is empty")
    rows = sorted(counts) if classes is None else [int(k) for k in classes]
    absent = [k for k in rows if k not in counts]
    if absent:
        raise ValueError(f"no images of classes {absent} in the batches")
    count = torch.tensor([counts[k] for k in rows])
    return [
        ClassExcitation(
            path=path,
            block=info[path][0],
            stage=info[path][1],
            classes=tuple(rows),
            mean=(torch.stack([per_class[k] for k in rows]) / count[:, None]).float(),
            count=count,
            overall=(totals[path] / seen).float(),
        )
        for path, per_class in sums.items()
    ]


@dataclass(frozen=True)
class HiddenActivity:
    """The hidden layer of one block's excitation MLP(s) on a set of images."""

    path: str  # the block's path
    units: int  # hidden units (of all its MLPs)
    active: int  # units with a positive ReLU output on at least one image
    fraction: float  # mean over images and units of (output > 0)


def hidden_activity(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor] | Tensor]
) -> dict[str, HiddenActivity]:
    """How much of every excitation MLP's bottleneck (``modules.parts.ChannelMLP``, the
    ``C -> C/r -> C`` MLP of SE and CBAM) is in use: per injected block, its hidden units,
    how many fire (ReLU output > 0) on some image, and the mean fraction that fire.
    ``batches``: images, or ``(images, labels)`` pairs. Blocks without such an MLP are
    left out. Runs in eval mode without gradients; modes are restored."""
    outputs: dict[str, list[Tensor]] = {}
    handles = []
    for path, block in attention_modules(model):
        for module in block.modules():
            if isinstance(module, ChannelMLP):

                def hook(mod, args, out, path=path):
                    outputs.setdefault(path, []).append(out.detach().flatten(1).cpu())

                handles.append(module[1].register_forward_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for path, chunks in outputs.items():
        # rows: one per image and pooled descriptor (CBAM sends its average and max
        # descriptors through the MLP as one batch), columns: the hidden units
        rows = torch.cat(chunks)
        fires = rows > 0
        result[path] = HiddenActivity(
            path=path,
            units=rows.shape[1],
            active=int(fires.any(dim=0).sum()),
            fraction=fires.float().mean().item(),
        )
    return result
