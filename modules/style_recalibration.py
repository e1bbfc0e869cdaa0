"""SRM: style-based recalibration.

Lee, Kim, Nam, "SRM: A Style-based Recalibration Module for Convolutional Neural Networks",
ICCV 2019, https://arxiv.org/abs/1903.10829. Official code:
github.com/hyunjaelee410/style-based-recalibration-module (``models/recalibration_modules.py``).

``StyleRecalibration(channels)`` (``"srm"``): style pooling (per-channel mean and standard
deviation over positions, ``parts.global_pool`` ``'avg'`` and ``'std'``), style integration
by a channel-wise fully connected layer (CFC: channel c's gate input is
``w_c1 * mean_c + w_c2 * std_c``, a ``C x 2`` weight, no bias), BatchNorm, sigmoid, and
``y = x * gate``. Parameters: 2C (CFC) + 2C (BN).

Options: ``style`` = ``('mean', 'std')`` (default), ``('mean',)`` or ``('std',)`` -- the
paper's style-pooling ablation (``'mean+std'`` strings are accepted too); the CFC weight has
one column per statistic.

As in the official code: the CFC weight starts at zero (so every gate starts at
``sigmoid(0) = 0.5``) and neither the CFC weight nor the BN affine parameters get weight
decay (``no_weight_decay``). Difference from the official code: the standard deviation is
the paper's (divided by N, ``parts`` ``'std'``); the official code uses ``torch.std``'s
unbiased estimate (divided by N - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import global_pool, parse_pool_types
from .registry import register

# Style statistic -> the global pooling operator in parts that computes it.
STYLE_POOLS = {"mean": "avg", "std": "std"}


@register("srm")
class StyleRecalibration(nn.Module):
    """SRM: a gate from each channel's style (mean, std), integrated channel by channel."""

    def __init__(self, channels: int, *, style: str | tuple[str, ...] = ("mean", "std")):
        super().__init__()
        self.style = parse_pool_types("style", style, STYLE_POOLS)
        self.cfc = nn.Parameter(torch.zeros(channels, len(self.style)))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, 1, S): the S style statistics of every channel side by side.
        t = torch.cat([global_pool(x, STYLE_POOLS[s]) for s in self.style], dim=3)
        z = (t * self.cfc[:, None, :]).sum(dim=3, keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.bn(z))

    def no_weight_decay(self) -> set[str]:
        return {"cfc", "bn.weight", "bn.bias"}

    def extra_repr(self) -> str:
        return f"style={'+'.join(self.style)}"
