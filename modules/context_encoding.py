"""EncNet's Context Encoding Module used as channel attention.

Zhang, Dana, Shi, Zhang, Wang, Tyagi, Agrawal, "Context Encoding for Semantic Segmentation",
CVPR 2018, https://arxiv.org/abs/1803.08904. Official code: github.com/zhanghang1989/
PyTorch-Encoding (``encoding/nn/encoding.py`` ``Encoding``; ``EncModule`` in the EncNet
segmentation model; ``EncLayer`` in its CIFAR classification experiments).

``ContextEncoding(channels)`` (``"enc"``):
``1x1 conv C->D (no bias) -> BN -> ReLU`` (``projection=True``; D = C * ``rd_ratio``,
C by default as in ``EncModule``) -> Encoding layer with K = ``num_codes`` codewords
``d_k`` and smoothing factors: residuals ``r_ik = x_i - d_k``, soft assignments
``a_ik = softmax_k(-s_k ||r_ik||^2)``, encodings ``e_k = sum_i a_ik r_ik`` -> then
- ``aggregate='mean'`` (default; the paper's Fig. 2 and ``EncModule``): BN over the K codes
  (``BatchNorm1d(K)``) + ReLU, mean over k, FC D->C (bias), sigmoid;
- ``aggregate='concat'`` (the official CIFAR ``EncLayer``, used with ``num_codes=16``,
  ``rd_ratio=1/4``): flatten the K x D encodings, l2-normalise, FC K*D->C (bias), sigmoid;
and ``y = x * gate``.

As in the official code: codewords start uniform in ``+-1/sqrt(K*D)``; the smoothing
parameter ``scale`` starts uniform in ``(-1, 0)`` and multiplies ``||r||^2`` directly, so
``scale = -s_k``; codes are averaged (the paper writes a sum; the two differ by the factor K
in front of the FC).

Differences from the official code: ``||x_i - d_k||^2`` is computed as
``||x_i||^2 - 2 x_i.d_k + ||d_k||^2`` and ``e_k`` as ``sum_i a_ik x_i - (sum_i a_ik) d_k``,
two matmuls that never hold a ``(B, N, K, D)`` tensor (the official code has custom
kernels, ``scaled_l2`` and ``aggregate``, for these two steps). The official segmentation
module combines as ``relu(x + x * gate)`` and adds the SE-loss head; here the gate
multiplies, as in SE and in the CIFAR ``EncLayer``. The projection conv has no bias in both
aggregates (``EncLayer``'s has one; BN follows it, so it is redundant).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parts import check_choice, check_positive, reduction_width
from .registry import register

ENC_AGGREGATES = ("mean", "concat")


def squared_distances(feats: Tensor, codewords: Tensor) -> Tensor:
    """``||x_i - d_k||^2`` for ``feats (B, N, D)`` and ``codewords (K, D)`` -> ``(B, N, K)``."""
    cross = feats @ codewords.t()  # (B, N, K)
    return feats.pow(2).sum(-1, keepdim=True) - 2 * cross + codewords.pow(2).sum(-1)


class Encoding(nn.Module):
    """The Encoding layer: ``(B, D, H, W) -> (B, K, D)`` soft-assigned residual encodings."""

    def __init__(self, dim: int, num_codes: int):
        super().__init__()
        self.codewords = nn.Parameter(torch.empty(num_codes, dim))
        self.scale = nn.Parameter(torch.empty(num_codes))
        bound = 1.0 / math.sqrt(num_codes * dim)
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.scale, -1.0, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        feats = x.flatten(2).transpose(1, 2)  # (B, N, D)
        assign = F.softmax(self.scale * squared_distances(feats, self.codewords), dim=2)
        # e_k = sum_i a_ik x_i - (sum_i a_ik) d_k, without forming the residuals.
        weighted = assign.transpose(1, 2) @ feats  # (B, K, D)
        return weighted - assign.sum(dim=1)[..., None] * self.codewords


@register("enc")
class ContextEncoding(nn.Module):
    """Context Encoding Module: a gate from soft-assigned residuals to learned codewords."""

    def __init__(
        self,
        channels: int,
        *,
        num_codes: int = 32,
        projection: bool = True,
        rd_ratio: float = 1.0,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        aggregate: str = "mean",
    ):
        super().__init__()
        check_positive("num_codes", num_codes, integer=True)
        check_choice("aggregate", aggregate, ENC_AGGREGATES)
        if not isinstance(projection, bool):
            raise ValueError(f"projection must be True or False, got {projection!r}")
        width = reduction_width(channels, rd_ratio, rd_divisor, rd_channels)
        if not projection and width != channels:
            raise ValueError(
                "rd_ratio / rd_channels set a projected width, which needs projection=True "
                f"(got width {width} for {channels} channels with projection=False)"
            )
        self.aggregate = aggregate
        self.width = width
        self.project = (
            nn.Sequential(
                nn.Conv2d(channels, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
            if projection
            else nn.Identity()
        )
        self.encoding = Encoding(width, num_codes)
        if aggregate == "mean":
            self.code_norm = nn.BatchNorm1d(num_codes)
            self.fc = nn.Linear(width, channels)
        else:
            self.fc = nn.Linear(num_codes * width, channels)

    def forward(self, x: Tensor) -> Tensor:
        e = self.encoding(self.project(x))  # (B, K, D)
        if self.aggregate == "mean":
            e = F.relu(self.code_norm(e)).mean(dim=1)  # (B, D)
        else:
            e = F.normalize(e.flatten(1), dim=1)  # (B, K*D)
        return x * torch.sigmoid(self.fc(e))[..., None, None]

    def extra_repr(self) -> str:
        return f"width={self.width}, aggregate={self.aggregate}"
