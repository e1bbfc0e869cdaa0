"""Second-order (covariance / bilinear) channel attention.

GSoP: Gao, Xie, Wang, Li, "Global Second-order Pooling Convolutional Networks", CVPR 2019,
https://arxiv.org/abs/1811.12006. Official code:
github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks
(``torchvision/models/resnet.py``, ``Bottleneck.chan_att``).

``GSoPChannel(channels)`` (``"gsop"``, the paper's GSoP-Net1 channel block):
``ReLU -> 1x1 conv C->c' (bias) -> BN -> ReLU -> covariance (c' x c', over positions, /N)
-> BN over the c' rows -> row-wise conv (a grouped conv, one group per covariance row, each
row mapped to ``row_multiplier`` = 4 outputs, so 4c' in all) -> 1x1 conv 4c'->C (bias)
-> sigmoid``, and ``y = x * gate``. Options: ``reduced_channels`` (c', 128 in the paper,
capped at C) or ``rd_ratio`` (c' = reduction_width(C, rd_ratio) instead of a fixed width),
``row_multiplier`` (4), ``input_relu`` and ``reduce_stride`` (see below).

Where this follows the official code rather than the paper's text: the leading ReLU on the
block input (the official block sees the pre-residual BN output and rectifies it first,
``input_relu=True``); the order conv -> BN -> ReLU before the covariance; BN on the rows of
the covariance (which we take to be the paper's "row-wise normalization"); NO
non-linearity between the row-wise conv and the final 1x1 conv (the channel branch of the
official code has none; its spatial branch does).

Differences from the official code: the official code reduces with stride 2 in stage 1
(``planes <= 64``) to save compute; here that is ``reduce_stride`` (default 1 everywhere;
set it per stage with the injector's ``stage_args``). The covariance is computed by centring
the features and one batched matmul instead of MPN-COV's ``X I_hat X^T`` with an explicit
``N x N`` centring matrix (the same values, without the ``N x N`` matrix).

Bilinear (``"bilinear"``): OUR READING of "second-order / bilinear channel attention" as
surveyed by Guo et al., "Attention Mechanisms in Computer Vision: A Survey", 2022,
https://arxiv.org/abs/2111.07624, with the pooling of bilinear CNNs (Lin, RoyChowdhury,
Maji, "Bilinear CNN Models for Fine-grained Visual Recognition", ICCV 2015,
https://arxiv.org/abs/1504.07889): ``1x1 conv C->c' -> BN -> ReLU -> Gram matrix
Z Z^T / N (uncentred, unlike GSoP's covariance) -> upper triangle (c'(c'+1)/2 entries;
the Gram is symmetric, as in MPN-COV's Triuvec) -> signed square root -> l2 normalisation
-> FC to C (bias) -> sigmoid``, ``y = x * gate``. There is no official code for this block;
c' defaults to 16 so that its FC (c'(c'+1)/2 x C) costs about what SE's MLP costs.
``signed_sqrt=False`` drops the signed square root (plain normalised bilinear pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parts import check_positive, reduction_width
from .registry import register


def covariance_pool(z: Tensor) -> Tensor:
    """Channel covariance over positions, ``(B, c, H, W) -> (B, c, c)``, normalised by N.

    The same values as MPN-COV's ``CovpoolLayer`` (``X (I - 11^T / N) / N X^T``).
    """
    flat = z.flatten(2)  # (B, c, N)
    centred = flat - flat.mean(dim=2, keepdim=True)
    return centred @ centred.transpose(1, 2) / flat.shape[2]


def gram_pool(z: Tensor) -> Tensor:
    """Uncentred second moment (bilinear pooling), ``(B, c, H, W) -> (B, c, c)``, / N."""
    flat = z.flatten(2)  # (B, c, N)
    return flat @ flat.transpose(1, 2) / flat.shape[2]


def _second_order_width(channels: int, reduced_channels: int, rd_ratio: float | None) -> int:
    check_positive("reduced_channels", reduced_channels, integer=True)
    if rd_ratio is not None:
        return reduction_width(channels, rd_ratio)
    return min(channels, reduced_channels)


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")


@register("gsop")
class GSoPChannel(nn.Module):
    """GSoP channel attention: a gate computed from the covariance of reduced features."""

    def __init__(
        self,
        channels: int,
        *,
        reduced_channels: int = 128,
        rd_ratio: float | None = None,
        row_multiplier: int = 4,
        input_relu: bool = True,
        reduce_stride: int = 1,
    ):
        super().__init__()
        width = _second_order_width(channels, reduced_channels, rd_ratio)
        check_positive("row_multiplier", row_multiplier, integer=True)
        check_positive("reduce_stride", reduce_stride, integer=True)
        _check_bool("input_relu", input_relu)
        self.input_relu = input_relu
        self.reduced_channels = width
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, width, 1, stride=reduce_stride, bias=True),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.row_norm = nn.BatchNorm2d(width)
        # Row-wise convolution: the covariance enters as (B, c', c', 1), one channel per row;
        # a (c', 1) kernel with c' groups maps each row alone to row_multiplier outputs.
        self.row_conv = nn.Conv2d(
            width, row_multiplier * width, kernel_size=(width, 1), groups=width, bias=True
        )
        self.fc = nn.Conv2d(row_multiplier * width, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        z = self.reduce(F.relu(x) if self.input_relu else x)  # (B, c', H', W')
        cov = covariance_pool(z)  # (B, c', c')
        rows = self.row_norm(cov.unsqueeze(-1))  # (B, c', c', 1)
        s = self.fc(self.row_conv(rows))  # (B, C, 1, 1)
        return x * torch.sigmoid(s)

    def extra_repr(self) -> str:
        return f"reduced_channels={self.reduced_channels}, input_relu={self.input_relu}"


@register("bilinear")
class BilinearChannel(nn.Module):
    """Channel attention from normalised bilinear (Gram) pooling of reduced features."""

    def __init__(
        self,
        channels: int,
        *,
        reduced_channels: int = 16,
        rd_ratio: float | None = None,
        signed_sqrt: bool = True,
    ):
        super().__init__()
        width = _second_order_width(channels, reduced_channels, rd_ratio)
        _check_bool("signed_sqrt", signed_sqrt)
        self.signed_sqrt = signed_sqrt
        self.reduced_channels = width
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        rows, cols = torch.triu_indices(width, width)
        self.register_buffer("triu_index", rows * width + cols, persistent=False)
        self.fc = nn.Linear(len(rows), channels, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gram = gram_pool(self.reduce(x))  # (B, c', c')
        v = gram.flatten(1)[:, self.triu_index]  # (B, c'(c'+1)/2)
        if self.signed_sqrt:
            # The offset bounds the slope of sqrt near 0 (unbounded there) and, unlike a
            # smaller one, survives float16, so exact zeros give 0 * finite, not 0 * inf.
            v = torch.sign(v) * torch.sqrt(v.abs() + 1e-5)
        v = F.normalize(v, dim=1)
        s = self.fc(v)[..., None, None]  # (B, C, 1, 1)
        return x * torch.sigmoid(s)

    def extra_repr(self) -> str:
        return f"reduced_channels={self.reduced_channels}, signed_sqrt={self.signed_sqrt}"
