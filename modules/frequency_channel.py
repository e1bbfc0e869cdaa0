"""FcaNet: multi-spectral (DCT) channel attention.

Qin, Zhang, Wu, Li, "FcaNet: Frequency Channel Attention Networks", ICCV 2021,
https://arxiv.org/abs/2012.11879. Official code: github.com/cfzd/FcaNet (``model/layer.py``).

``FrequencyChannelAttention(channels)`` (``"fca"``): the channels are split into n groups;
group i is pooled with the 2D DCT basis of frequency ``(u_i, v_i)``,
``sum_hw x[c, h, w] B_u(h) B_v(w)`` with the orthonormal DCT-II basis
``B_u(h) = cos(pi u (h + 1/2) / H) / sqrt(H)`` (times ``sqrt(2)`` for ``u > 0``); the pooled
vector goes through SE's MLP ``C -> C*rd_ratio -> C`` (ReLU between, no biases, as in the
official code) and a sigmoid; ``y = x * gate``. With only ``(0, 0)`` the pooling is average
pooling times ``sqrt(HW)`` (the paper's point that GAP is the lowest DCT frequency).

``freq_sel``: ``top{1,2,4,8,16,32}`` (default ``top16``, the paper's ResNet setting),
``low{...}`` and ``bot{...}``, the first n entries of the official index tables below,
defined on a 7x7 frequency grid (index 0 = first spatial axis H, 1 = W). ``rd_ratio``,
``rd_divisor``, ``rd_channels`` as in SE (``parts.reduction_width``; official ``C // 16``).
``bias`` adds biases to the two FC layers (SE has them; the official FcaNet has none, the
default). Without biases a width-1 hidden layer (16 channels at ``rd_ratio=1/16``) whose
ReLU is off for a whole batch passes no gradient to either layer.

Differences from the official code, by choice:
- Any feature-map size. The official block fixes ``dct_h x dct_w`` per stage (56/28/14/7 on
  ImageNet) and adaptive-average-pools other inputs to it. Here the DCT filters are built
  for the actual ``(H, W)`` on first use (cached per size, device and dtype) and the 7x7
  indices are scaled as ``u * H // 7``, ``v * W // 7``. For ``H, W`` multiples of 7 this is
  exactly the official ``u * (H // 7)`` (so ImageNet ResNets get the official filters);
  on small maps (CIFAR's 8x8, 4x4) nearby frequencies may coincide.
- Channels need not be divisible by n: channel c belongs to group ``c * n // C`` (contiguous,
  near-equal groups; identical to the official split when n divides C). n must not exceed C.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .parts import ChannelMLP, check_choice, reduction_width
from .registry import register

# Frequency indices (first axis, second axis) on a 7x7 grid, ordered as in the official
# code's get_freq_indices (cfzd/FcaNet, model/layer.py): "top" by the single-frequency
# ImageNet accuracy of the paper's Fig. 4, "low" in zig-zag order from (0, 0), "bot" the
# worst first. Each selection takes the first n entries.
# fmt: off
FREQ_TABLES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "top": (
        (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2,
         4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1),
        (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2,
         6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3),
    ),
    "low": (
        (0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0,
         1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4),
        (0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5,
         4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3),
    ),
    "bot": (
        (6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5,
         6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6),
        (6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1,
         4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3),
    ),
}
# fmt: on
FREQ_GRID = 7
FREQ_SELECTIONS = tuple(f"{kind}{n}" for kind in FREQ_TABLES for n in (1, 2, 4, 8, 16, 32))


def frequency_indices(freq_sel: str) -> list[tuple[int, int]]:
    """The ``(u, v)`` pairs on the 7x7 grid that ``freq_sel`` (e.g. ``'top16'``) names."""
    check_choice("freq_sel", freq_sel, FREQ_SELECTIONS)
    first, second = FREQ_TABLES[freq_sel[:3]]
    n = int(freq_sel[3:])
    return list(zip(first[:n], second[:n], strict=True))


def dct_basis(size: int, freq: int) -> Tensor:
    """Orthonormal 1D DCT-II basis vector of frequency ``freq`` on ``size`` points, float64."""
    pos = torch.arange(size, dtype=torch.float64)
    basis = torch.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
    return basis * math.sqrt(2.0) if freq > 0 else basis


def dct_filters(height: int, width: int, freqs: list[tuple[int, int]]) -> Tensor:
    """2D DCT filters ``(n, H, W)`` for 7x7-grid frequencies scaled to an ``H x W`` map."""
    return torch.stack(
        [
            torch.outer(
                dct_basis(height, u * height // FREQ_GRID), dct_basis(width, v * width // FREQ_GRID)
            )
            for u, v in freqs
        ]
    )


@register("fca")
class FrequencyChannelAttention(nn.Module):
    """FcaNet: SE whose squeeze is multi-spectral DCT pooling."""

    def __init__(
        self,
        channels: int,
        *,
        freq_sel: str = "top16",
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self.freq_sel = freq_sel
        self.freqs = frequency_indices(freq_sel)
        if len(self.freqs) > channels:
            raise ValueError(
                f"freq_sel={freq_sel!r} splits the channels into {len(self.freqs)} groups, "
                f"more than the {channels} channels; choose a selection of at most {channels}"
            )
        self.rd_channels = reduction_width(channels, rd_ratio, rd_divisor, rd_channels)
        self.register_buffer(
            "channel_group", torch.arange(channels) * len(self.freqs) // channels, persistent=False
        )
        self.fc = ChannelMLP(channels, self.rd_channels, bias=bias)
        self._filters: dict[tuple, Tensor] = {}

    def channel_filters(self, height: int, width: int, like: Tensor) -> Tensor:
        """The ``(C, H, W)`` DCT filter of every channel, built once per size/device/dtype."""
        key = (height, width, like.device, like.dtype)
        if key not in self._filters:
            per_group = dct_filters(height, width, self.freqs)  # (n, H, W)
            self._filters[key] = per_group[self.channel_group.cpu()].to(like.device, like.dtype)
        return self._filters[key]

    def pool(self, x: Tensor) -> Tensor:
        """Multi-spectral pooling ``(B, C, H, W) -> (B, C, 1, 1)``."""
        filters = self.channel_filters(x.shape[2], x.shape[3], x)
        return torch.einsum("bchw,chw->bc", x, filters)[..., None, None]

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(self.pool(x)))

    def extra_repr(self) -> str:
        return f"freq_sel={self.freq_sel}, rd_channels={self.rd_channels}"
