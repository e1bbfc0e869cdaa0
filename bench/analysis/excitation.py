"""SENet's excitation analysis: how the channel gates differ between classes, by depth.

Hu et al., "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507, Sec. 7.2
and Fig. 6: the mean excitation of every channel over the images of one class, plotted for
a few classes at several depths; early gates are nearly the same for every class, later
ones become class-specific, and the last stage's saturate.

``class_excitations(model, batches)`` accumulates the class-mean gate of every injected
block with a channel gate (``collect``'s ``"channel"`` outputs, so also ECA, CBAM, ...);
``class_specificity`` turns one block's class means into one number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .collect import collect


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
