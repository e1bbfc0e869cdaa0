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
  int fixes it.
- ``shared`` (Table 2): True is ECA; False is ECA-NS, where every channel has its own ``k``
  weights over its neighbours (``C * k`` parameters).

Differences from the official code: none in the computation; ECA-NS, which the official
code does not include, is written as a window unfold times a ``(C, k)`` weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parts import check_odd_kernel, check_positive
from .registry import register


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
