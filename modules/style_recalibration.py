"""SRM: style-based recalibration.

Lee, Kim, Nam, "SRM: A Style-based Recalibration Module for Convolutional Neural Networks",
ICCV 2019, https://arxiv.org/abs/1903.10829. Official code:
github.com/hyunjaelee410/style-based-recalibration-module (``models/recalibration_modules.py``).

``StyleRecalibration(channels)`` (``"srm"``): style pooling (per-channel mean and standard
deviation over positions, ``parts.global_pool('avg')`` and ``parts.std_pool``), style integration
by a channel-wise fully connected layer (CFC: channel c's gate input is
``w_c1 * mean_c + w_c2 * std_c``, a ``C x 2`` weight, no bias), BatchNorm, sigmoid, and
``y = x * gate``. Parameters: 2C (CFC) + 2C (BN).

Options: ``style`` = ``('mean', 'std')`` (default), ``('mean',)`` or ``('std',)`` -- the
paper's style-pooling ablation (``'mean+std'`` strings are accepted too); the CFC weight has
one column per statistic.

``unbiased_std``: the official ``SRMLayer._style_pooling`` computes
``x.view(N, C, -1).std(dim=2)``, i.e. ``torch.std``'s unbiased estimate (divided by
HW - 1), so ``unbiased_std=True`` (default) follows it; ``False`` is the paper's Eq. 1
(divided by HW). On a 1x1 map, where the official code gives NaN, the std is 0.

As in the official code: the CFC weight starts at zero (so every gate starts at
``sigmoid(0) = 0.5``) and neither the CFC weight nor the BN affine parameters get weight
decay (``no_weight_decay``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import global_pool, parse_pool_types, std_pool
from .registry import register

# The style statistics (the pooling operators of parts that compute them).
STYLE_POOLS = {"mean": "avg", "std": "std"}


@register("srm")
class StyleRecalibration(nn.Module):
    """SRM: a gate from each channel's style (mean, std), integrated channel by channel."""

    def __init__(
        self,
        channels: int,
        *,
        style: str | tuple[str, ...] = ("mean", "std"),
        unbiased_std: bool = True,
    ):
        super().__init__()
        self.style = parse_pool_types("style", style, STYLE_POOLS)
        if not isinstance(unbiased_std, bool):
            raise ValueError(f"unbiased_std must be True or False, got {unbiased_std!r}")
        self.unbiased_std = unbiased_std
        self.cfc = nn.Parameter(torch.zeros(channels, len(self.style)))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, 1, S): the S style statistics of every channel side by side.
        t = torch.cat([self._statistic(x, s) for s in self.style], dim=3)
        z = (t * self.cfc[:, None, :]).sum(dim=3, keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.bn(z))

    def _statistic(self, x: Tensor, style: str) -> Tensor:
        if style == "std":
            return std_pool(x, unbiased=self.unbiased_std)
        return global_pool(x, STYLE_POOLS[style])

    def no_weight_decay(self) -> set[str]:
        return {"cfc", "bn.weight", "bn.bias"}

    def extra_repr(self) -> str:
        return f"style={'+'.join(self.style)}, unbiased_std={self.unbiased_std}"
