"""ParseNet global context: fuse L2-normalised local features with the global average.

Liu, Rabinovich, Berg, "ParseNet: Looking Wider to See Better", ICLR 2016 workshop,
https://arxiv.org/abs/1506.04579. Official release: Caffe models and prototxt by W. Liu
(``Normalize`` layer in github.com/weiliu89/caffe).

``ParseNetContext(channels)`` (``"parsenet"``): global average pooling gives the context
vector; both the context vector and the local features (every position's C-vector) are
L2-normalised across channels and multiplied by a learned per-channel scale (the paper's
``y = gamma * x / ||x||_2``, Caffe ``Normalize`` with ``across_spatial=false,
channel_shared=false``); the context is unpooled (broadcast to every position) and fused
with the local features.

Adaptation (ours): the paper concatenates the two into a 2C-channel map that feeds the
classifier. To keep ``(B, C, H, W) -> (B, C, H, W)``, ``fusion='concat'`` (default) follows
the concatenation with a 1x1 conv 2C->C (with bias); ``fusion='add'`` adds the two
normalised maps instead (no parameters besides the scales). The 1x1 conv is applied to the
two halves separately (local part per position, context part once per image) and summed,
which equals the conv of the concatenation without materialising it.

``scale_init`` (10 by default): the paper stresses that the scales must start large because
unit-norm features are tiny and learn slowly; 10 is our choice (SSD, by the same first
author, starts its conv4_3 ``Normalize`` at 20), not a value we could check in the ParseNet
release. ``eps`` guards positions whose features are all zero (e.g. after a ReLU); Caffe's
``Normalize`` uses 1e-10, which underflows in float16, hence 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parts import check_choice, check_positive
from .registry import register

PARSENET_FUSIONS = ("concat", "add")


@register("parsenet")
class ParseNetContext(nn.Module):
    """ParseNet: L2-normalised, scaled local features fused with the global context."""

    def __init__(
        self,
        channels: int,
        *,
        fusion: str = "concat",
        scale_init: float = 10.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        check_choice("fusion", fusion, PARSENET_FUSIONS)
        check_positive("scale_init", scale_init)
        check_positive("eps", eps)
        self.fusion = fusion
        self.eps = eps
        self.local_scale = nn.Parameter(torch.full((1, channels, 1, 1), float(scale_init)))
        self.context_scale = nn.Parameter(torch.full((1, channels, 1, 1), float(scale_init)))
        self.fuse = nn.Conv2d(2 * channels, channels, 1) if fusion == "concat" else None

    def forward(self, x: Tensor) -> Tensor:
        local = F.normalize(x, dim=1, eps=self.eps) * self.local_scale  # (B, C, H, W)
        context = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        context = F.normalize(context, dim=1, eps=self.eps) * self.context_scale
        if self.fuse is None:
            return local + context
        w_local, w_context = self.fuse.weight.split(x.shape[1], dim=1)
        return F.conv2d(local, w_local, self.fuse.bias) + F.conv2d(context, w_context)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}"
