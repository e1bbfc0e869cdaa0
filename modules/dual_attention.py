"""Dual attention: DANet's position and channel attention modules.

Fu et al., "Dual Attention Network for Scene Segmentation", https://arxiv.org/abs/1809.02983

- ``danet_position`` (PAM, Sec. 3.2): queries and keys are 1x1 convs to C/8 (the
  official width; ``rd_ratio``), values a 1x1 conv C -> C,
  ``out_i = gamma * sum_j softmax_j(q_i . k_j) v_j + x_i``, unscaled, through
  ``scaled_dot_product_attention`` (scale=1) so memory stays linear in H*W.
- ``danet_channel`` (CAM, Sec. 3.3): no convs,
  ``energy = X X^T`` over channels (C x C), ``out = gamma * softmax(energy) X + x``.
- ``danet``: both modules on the same input, fused by a sum.

Both gammas start at 0, so every block here (with the default fusion) is the identity at
initialisation; the gammas are returned by ``no_weight_decay`` (the official code decays
them with everything else). Like non-local, these blocks carry their own skip connection,
so ``positions`` are between residual units: "unit_input" (before a unit, shortcut
included), "post", "stage_end". DANet itself puts its heads on the backbone's last
feature map, i.e. ``stages: [4], position: stage_end`` on a ResNet-50. "pre" is refused:
it wraps only the residual branch's input, so the shortcut would skip the block.

Differences from the paper and the official code (junfu1115/DANet, ``da_att.py``):
- CAM energy: the paper's Eq. 3 is ``softmax(A_i . A_j)``; the official code computes
  ``softmax(max_j(energy) - energy)``, which (softmax being shift-invariant per row) is
  ``softmax(-energy)``. ``energy="max_minus"`` (default) is the official code,
  ``energy="plain"`` the paper.
- PAM key bias: the official key conv has a bias, which the softmax over keys cancels
  exactly (it never receives a gradient); it is left out here.
- ``danet`` fusion. The official head first reduces the channels to C/4 with a
  3x3 conv-BN-ReLU per branch, runs PAM / CAM there, passes each output through another
  3x3 conv-BN-ReLU (the paper's "transform by a convolution layer") and sums them, before
  dropout and segmentation classifiers. A block must map C -> C inside a backbone, so
  here nothing is reduced and the classifiers are gone:
  ``fusion="sum"`` (default): ``x + gamma_p * PAM_term + gamma_c * CAM_term``, i.e. the
  sum of the two module outputs with the shared input counted once, which keeps the
  block the identity at initialisation;
  ``fusion="conv"``: the paper's form, ``convbnrelu(PAM(x)) + convbnrelu(CAM(x))`` with
  3x3 C -> C convs (no identity at init, and 2 * 9 * C^2 extra weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import check_choice, reduction_width, softmax_attention
from .registry import register

ENERGIES = ("max_minus", "plain")
FUSIONS = ("sum", "conv")
POSITIONS = ("unit_input", "post", "stage_end")


@register("danet_position")
class PositionAttention(nn.Module):
    """DANet's position attention module (PAM)."""

    positions = POSITIONS

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 8,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
    ):
        super().__init__()
        width = reduction_width(channels, rd_ratio, rd_divisor, rd_channels)
        self.query = nn.Conv2d(channels, width, 1)
        # no bias: the softmax over keys would cancel it (see module docstring)
        self.key = nn.Conv2d(channels, width, 1, bias=False)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def no_weight_decay(self) -> set[str]:
        return {"gamma"}

    def attend(self, x: Tensor) -> Tensor:
        """``sum_j softmax_j(q_i . k_j) v_j`` for every position i, (B, C, H, W)."""
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        k = self.key(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, N, C)
        out = softmax_attention(q, k, v, scale=1.0)  # (B, N, C)
        return out.transpose(1, 2).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.attend(x)


@register("danet_channel")
class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM); no parameters but ``gamma``."""

    positions = POSITIONS

    def __init__(self, channels: int, *, energy: str = "max_minus"):
        super().__init__()
        check_choice("energy", energy, ENERGIES)
        self.energy = energy
        self.gamma = nn.Parameter(torch.zeros(1))

    def no_weight_decay(self) -> set[str]:
        return {"gamma"}

    def attend(self, x: Tensor) -> Tensor:
        """``softmax(energy) X`` with channels attending to channels, (B, C, H, W)."""
        flat = x.flatten(2)  # (B, C, N)
        energy = flat @ flat.transpose(1, 2)  # (B, C, C)
        if self.energy == "max_minus":
            energy = energy.amax(dim=-1, keepdim=True) - energy
        return (energy.softmax(dim=-1) @ flat).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.attend(x)


def _conv_bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


@register("danet")
class DualAttention(nn.Module):
    """PAM and CAM on the same input, summed (see the module docstring for ``fusion``)."""

    positions = POSITIONS

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 8,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        energy: str = "max_minus",
        fusion: str = "sum",
    ):
        super().__init__()
        check_choice("fusion", fusion, FUSIONS)
        self.position = PositionAttention(
            channels, rd_ratio=rd_ratio, rd_divisor=rd_divisor, rd_channels=rd_channels
        )
        self.channel = ChannelAttention(channels, energy=energy)
        self.position_conv = _conv_bn_relu(channels) if fusion == "conv" else None
        self.channel_conv = _conv_bn_relu(channels) if fusion == "conv" else None

    def no_weight_decay(self) -> set[str]:
        return {"position.gamma", "channel.gamma"}

    def forward(self, x: Tensor) -> Tensor:
        if self.position_conv is None:
            return (
                x
                + self.position.gamma * self.position.attend(x)
                + self.channel.gamma * self.channel.attend(x)
            )
        return self.position_conv(self.position(x)) + self.channel_conv(self.channel(x))
