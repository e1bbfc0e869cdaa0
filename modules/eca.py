"""Efficient Channel Attention, with the options of its ablations.

Wang, Wu, Zhu, Wang, Zuo, Hu, "ECA-Net: Efficient Channel Attention for Deep Convolutional
Neural Networks", CVPR 2020, https://arxiv.org/abs/1910.03151. Official code:
github.com/BangguWu/ECANet.

``EfficientChannelAttention(channels)`` pools every channel to one number (global average
pooling), lets each channel see its ``k`` neighbours through a 1D convolution across the
channel axis (no bias, zero padding at both ends), and gates the input with a sigmoid:
``y = x * sigmoid(conv1d_k(avgpool(x)))``. It has ``k`` parameters.

Options, each one axis of an ablation:
- ``kernel_size`` (Fig. 4): ``None`` (default) picks ``k`` from the channel count,
  ``k = |log2(C)/gamma + b/gamma|_odd`` with ``gamma=2``, ``b=1``
  (:func:`adaptive_kernel_size`; 5, 5, 5, 7 for 256, 512, 1024, 2048 channels); an odd
  int fixes it; ``'released'`` takes the per-stage kernels of the released ImageNet
  models (below), which the injector resolves from the backbone and the stage, so it
  works in placements only (``args: {kernel_size: released}``).
- ``shared`` (Table 2): True is ECA; False is ECA-NS, where every channel has its own ``k``
  weights over its neighbours (``C * k`` parameters).

Released kernels (``RELEASED_KERNELS``). The official ``models/eca_resnet.py`` takes a
per-stage ``k_size`` list (default ``[3, 3, 3, 3]``), and the README's released
checkpoints are named by it: ``eca_resnet50_k3557``, ``eca_resnet101_k3357``,
``eca_resnet152_k3357``, ``eca_resnet34_k3357``, ``eca_resnet18_k3577``. So the released
ResNet-50 uses 3, 5, 5, 7 where the formula gives 5, 5, 5, 7 (ResNet-101/152: 3, 3, 5, 7).
Caveat for ResNet-18: the official ``eca_resnet18`` ignores its ``k_size`` argument and
builds ``[3, 3, 3, 3]``; we follow the checkpoint's name (3, 5, 7, 7). The released kernels
are defined for those five ImageNet ResNets only (any stem); other backbones get a
ValueError.

ECA-NS is in the official repository, ``models/eca_ns.py`` (not used by its ResNets): a
depth-wise ``Conv1d(C, C, k, groups=C, bias=False)`` applied to the zero-padded
``k``-neighbourhood of every channel's pooled value (``F.unfold`` of the ``(B, 1, 1, C)``
descriptor), i.e. ``logit_c = sum_j w_{c,j} y_{c-(k-1)/2+j}``. Ours computes the same sum as
a window unfold times a ``(C, k)`` weight, with the same initial bound ``1/sqrt(k)`` as that
grouped Conv1d's default initialisation.

Differences from the official code: none in the computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parts import check_odd_kernel, check_positive
from .registry import register

# Per-stage kernel sizes of the released ECA-ResNets (checkpoint names in the official
# README, see the module docstring).
RELEASED_KERNELS: dict[str, tuple[int, ...]] = {
    "resnet18": (3, 5, 7, 7),
    "resnet34": (3, 3, 5, 7),
    "resnet50": (3, 5, 5, 7),
    "resnet101": (3, 3, 5, 7),
    "resnet152": (3, 3, 5, 7),
}
RELEASED = "released"


def adaptive_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's kernel size for ``channels``: ``t = int(|(log2(C) + b) / gamma|)``, made odd."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register("eca")
class EfficientChannelAttention(nn.Module):
    """ECA block: a sigmoid gate from a 1D convolution over the pooled channel vector."""

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        b: float = 1,
        shared: bool = True,
    ):
        super().__init__()
        check_positive("gamma", gamma)
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"b must be a number, got {b!r}")
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be True or False, got {shared!r}")
        if kernel_size == RELEASED:
            raise ValueError(
                "kernel_size='released' names ECA-Net's per-stage kernels of a released "
                "ResNet, which only a placement can resolve (inject with args "
                "{kernel_size: released}); here give an odd int, or None for the formula"
            )
        if kernel_size is None:
            kernel_size = adaptive_kernel_size(channels, gamma, b)
        else:
            check_odd_kernel("kernel_size", kernel_size)
        self.kernel_size = kernel_size
        self.shared = shared
        # No-op hook point: a forward hook on ``gate`` sees the (B, C, 1, 1) gate values.
        self.gate = nn.Identity()
        if shared:
            self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        else:
            # Same initial scale as the shared Conv1d (kaiming-uniform over fan-in k).
            bound = 1 / math.sqrt(kernel_size)
            self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))

    adaptive_kernel_size = staticmethod(adaptive_kernel_size)

    @classmethod
    def resolve_arguments(cls, kwargs: dict, backbone, stage) -> dict:
        """``kernel_size='released'`` -> the released model's kernel for this stage."""
        if kwargs.get("kernel_size") != RELEASED:
            return kwargs
        known = ", ".join(RELEASED_KERNELS)
        if stage is None:
            raise ValueError(
                "kernel_size='released' is a per-stage choice, and position 'stem' is in no "
                "stage; give an odd int or None"
            )
        if backbone.name not in RELEASED_KERNELS:
            raise ValueError(
                f"kernel_size='released' is known for {known} (ECA-Net's released models), "
                f"not for {backbone.name}; give an odd int, or None for the formula"
            )
        return {**kwargs, "kernel_size": RELEASED_KERNELS[backbone.name][stage.index - 1]}

    def forward(self, x: Tensor) -> Tensor:
        y = x.mean(dim=(2, 3))  # (B, C)
        if self.shared:
            logits = self.conv(y[:, None, :])[:, 0]  # (B, C)
        else:
            pad = self.kernel_size // 2
            windows = F.pad(y, (pad, pad)).unfold(1, self.kernel_size, 1)  # (B, C, k)
            logits = (windows * self.weight).sum(dim=-1)  # (B, C)
        return x * self.gate(torch.sigmoid(logits)[..., None, None])

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, shared={self.shared}"
