"""BAM: Bottleneck Attention Module.

Park et al., "BAM: Bottleneck Attention Module", BMVC 2018, https://arxiv.org/abs/1807.06514

    M_c(x) = BN(MLP(AvgPool(x)))                      channel branch, (B, C, 1, 1)
    M_s(x) = BN(f_1x1(f_3x3,d(f_3x3,d(f_1x1(x)))))    spatial branch, (B, 1, H, W)
    out    = x * (1 + sigmoid(M_c(x) + M_s(x)))       broadcast to (B, C, H, W)

Defaults are the paper's: r = 16 (``rd_ratio``), dilation d = 4, two dilated 3x3 convs,
both branches summed. Inside each branch every hidden layer is followed by BN and ReLU
(the paper's equations omit these; the official code has them); the paper's final BN
on each branch output is ``output_bn=True``. ``mode`` keeps one branch only (the
paper's Table 1 ablation); ``combine`` chooses how the two branches meet.

Where it may go: the paper places one BAM at each bottleneck of the network, where the
feature map is downsampled, i.e. after every stage but the last ("stage_end" on stages
1..3 of a ResNet, as in the official ResNet). Because the output is ``x * (1 + M)``, a
refinement of the whole feature map rather than a gate on a residual branch, it is also
sound between residual units ("post", or "unit_input": before a unit, so ``stages: [2],
blocks: first, position: unit_input`` is the same spot as "stage_end" of stage 1), which
lets a sweep compare "one BAM per stage" with "one BAM per unit" at an identical block;
"residual" is left to SE/CBAM-style gates.

Differences from the official code (Jongchan/attention-module, ``MODELS/bam.py``):
- The official forward combines the branches by a PRODUCT, ``sigmoid(M_c * M_s)``,
  while the paper (Sec. 3, and its ablation of combination strategies) uses a sum.
  ``combine="sum"`` (default) is the paper, ``combine="product"`` the official code.
- The official branches end in a plain linear/conv layer, without the paper's final BN;
  ``output_bn=False`` reproduces the official code.
- Every conv/linear bias directly before a BN is left out: the BN subtracts it again, so
  it would never receive a gradient (the official code has them).
- The channel MLP is written with 1x1 convs and BatchNorm2d on (B, C, 1, 1) tensors,
  which equals the official Linear + BatchNorm1d (same parameters).
- Like the official code, the BNs in the channel branch normalise over the batch only,
  so training needs a batch of at least 2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import check_choice, check_positive, reduction_width
from .registry import register

MODES = ("both", "channel", "spatial")
COMBINES = ("sum", "product")


def _conv_bn_relu(cin: int, cout: int, kernel_size: int = 1, dilation: int = 1) -> list:
    padding = dilation * (kernel_size // 2)
    return [
        # no bias: the BN right after cancels it
        nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@register("bam")
class BottleneckAttention(nn.Module):
    """BAM: ``x * (1 + sigmoid(M_c + M_s))`` with parallel channel and spatial branches."""

    positions = ("stage_end", "post", "unit_input")

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        dilation: int = 4,
        num_dilated_convs: int = 2,
        mode: str = "both",
        combine: str = "sum",
        output_bn: bool = True,
    ):
        super().__init__()
        check_choice("mode", mode, MODES)
        check_choice("combine", combine, COMBINES)
        check_choice("output_bn", output_bn, (True, False))
        check_positive("dilation", dilation, integer=True)
        if isinstance(num_dilated_convs, bool) or not isinstance(num_dilated_convs, int):
            raise ValueError(f"num_dilated_convs must be an int >= 0, got {num_dilated_convs!r}")
        if num_dilated_convs < 0:
            raise ValueError(f"num_dilated_convs must be an int >= 0, got {num_dilated_convs!r}")
        if combine != "sum" and mode != "both":
            raise ValueError(f"combine={combine!r} only applies to mode='both', got {mode!r}")
        width = reduction_width(channels, rd_ratio, rd_divisor, rd_channels)
        self.combine = combine
        # No-op hook point: a forward hook on ``gate`` sees ``attention(x)``, the sigmoid map.
        self.gate = nn.Identity()

        self.channel_branch = None
        if mode in ("both", "channel"):
            layers = [nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(channels, width)]
            layers.append(nn.Conv2d(width, channels, 1, bias=not output_bn))
            if output_bn:
                layers.append(nn.BatchNorm2d(channels))
            self.channel_branch = nn.Sequential(*layers)

        self.spatial_branch = None
        if mode in ("both", "spatial"):
            layers = _conv_bn_relu(channels, width)
            for _ in range(num_dilated_convs):
                layers += _conv_bn_relu(width, width, kernel_size=3, dilation=dilation)
            layers.append(nn.Conv2d(width, 1, 1, bias=not output_bn))
            if output_bn:
                layers.append(nn.BatchNorm2d(1))
            self.spatial_branch = nn.Sequential(*layers)

    def attention(self, x: Tensor) -> Tensor:
        """The attention map ``sigmoid(...)`` before ``1 +``; broadcastable to x."""
        if self.spatial_branch is None:
            logits = self.channel_branch(x)  # (B, C, 1, 1)
        elif self.channel_branch is None:
            logits = self.spatial_branch(x)  # (B, 1, H, W)
        elif self.combine == "sum":
            logits = self.channel_branch(x) + self.spatial_branch(x)  # (B, C, H, W)
        else:
            logits = self.channel_branch(x) * self.spatial_branch(x)
        return self.gate(torch.sigmoid(logits))

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 + self.attention(x))
