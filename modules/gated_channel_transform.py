"""GCT: gated channel transformation.

Yang, Zhu, Wu, Yang, "Gated Channel Transformation for Visual Recognition", CVPR 2020,
https://arxiv.org/abs/1909.11519. Official code: github.com/z-x-yang/GCT (``PyTorch/GCT.py``).

``GatedChannelTransform(channels)`` (``"gct"``), three per-channel parameters:
- global context embedding ``s_c = alpha_c * ||x_c||_2`` (``mode='l2'``, with
  ``sqrt(sum x^2 + eps)``) or ``s_c = alpha_c * sum |x_c|`` (``mode='l1'``);
- channel normalisation ``s_hat = sqrt(C) s / ||s||_2`` (l2, computed as
  ``s / sqrt(mean_c s^2 + eps)``) or ``C s / ||s||_1`` (l1, ``s / (mean_c |s| + eps)``);
- gating adaptation ``y = x * (1 + tanh(gamma * s_hat + beta))``.
``alpha`` starts at 1, ``gamma`` and ``beta`` at 0, so the block is the identity at
initialisation (and ``alpha`` receives no gradient until ``gamma`` moves off zero).

Weight decay: the paper's default and the official PyTorch ``main.py`` exclude only the
gating bias ``beta`` from weight decay (the official README notes that decaying it helps
ResNet-50 but not other backbones), so ``no_weight_decay()`` is ``{"beta"}``; ``alpha`` and
``gamma`` are decayed.

Where it goes: the official PyTorch ResNet (``PyTorch/resnet.py``, maskrcnn-benchmark's
ResNet with ``STRIDE_IN_1X1``) puts a GCT before every convolution: ``GCT(3)`` before the
stem's 7x7 conv, ``GCT(in)`` before conv1, ``GCT(width)`` before conv2 and conv3, and,
in the units whose shortcut is a projection (``in_channels != out_channels``), a separate
``GCT(in)`` as the first layer of ``downsample`` (it sees the same x as conv1's GCT but has
its own parameters). In placements that is ``{block: gct, position: stem}`` plus
``{block: gct, stages: all, position: before_convs}`` (on
``build_backbone(..., stride_in_1x1=True)`` for the official strides); ResNet-50 then has 53
GCTs, 67,593 parameters. The official code has no BasicBlock version; ``before_convs`` on a
BasicBlock puts one before conv1, conv2 and the projection.

Difference from the official code: ``mode='l1'`` always takes ``|x|`` (the official
``after_relu`` flag only skips the ``abs`` when the input is known to be non-negative, which
gives the same values). ``eps`` is the official 1e-5.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import check_choice, check_positive
from .registry import register

GCT_MODES = ("l2", "l1")


@register("gct")
class GatedChannelTransform(nn.Module):
    """GCT: normalised channel embeddings drive a ``1 + tanh`` gate; identity at init."""

    def __init__(self, channels: int, *, mode: str = "l2", eps: float = 1e-5):
        super().__init__()
        check_choice("mode", mode, GCT_MODES)
        check_positive("eps", eps)
        self.mode = mode
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # No-op hook point: a forward hook on ``gate`` sees the (B, C, 1, 1) factor 1 + tanh.
        self.gate = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "l2":
            s = (x.pow(2).sum(dim=(2, 3), keepdim=True) + self.eps).sqrt() * self.alpha
            s_hat = s / (s.pow(2).mean(dim=1, keepdim=True) + self.eps).sqrt()
        else:
            s = x.abs().sum(dim=(2, 3), keepdim=True) * self.alpha
            s_hat = s / (s.abs().mean(dim=1, keepdim=True) + self.eps)
        return x * self.gate(1.0 + torch.tanh(self.gamma * s_hat + self.beta))  # (B, C, 1, 1)

    def no_weight_decay(self) -> set[str]:
        return {"beta"}

    def extra_repr(self) -> str:
        return f"mode={self.mode}, eps={self.eps}"
