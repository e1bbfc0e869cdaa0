"""Convolutional Block Attention Module, with the options of its ablations.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018,
https://arxiv.org/abs/1807.06521. Official code: github.com/Jongchan/attention-module.

``CBAM(channels)`` refines a map with a channel gate, then a spatial gate:
``x' = x * Mc(x)``, ``y = x' * Ms(x')`` where
``Mc(x) = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` (one MLP ``C -> C/r -> C`` with a
ReLU, shared by both descriptors) and
``Ms(x) = sigmoid(BN(conv_kxk([mean_c(x); max_c(x)])))``.

The parts are reusable classes, :class:`ChannelAttention` and :class:`SpatialAttention`,
each with ``attention(x)`` (the gate) and ``forward(x)`` (``x`` times the gate).

Options, each one axis of an ablation:
- ``pool_types`` (Table 1): descriptors of the channel attention, any of ``avg``, ``max``,
  ``lp``, ``lse`` (the official code's extra two); default ``'avg+max'``; ``'avg'`` alone
  is SE with the same weights.
- ``rd_ratio``, ``rd_divisor``, ``rd_channels``: width of the MLP as in ``se``.
- ``spatial_descriptor`` (Table 2): ``'avgmax'`` (mean and max over channels, 2 maps, the
  paper's) or ``'conv1x1'``. Our reading of the paper's alternative, "standard 1x1
  convolution reducing the channel dimension into 1": a learned ``C -> 1`` 1x1
  convolution (no bias) replaces the channel pooling, and the ``k x k`` convolution then
  maps that one map to the attention map (``C + k*k`` weights instead of ``2*k*k``).
- ``kernel_size`` (Table 2): the spatial convolution, any odd size; 7 by default.
- ``spatial_bn``: a BatchNorm on the spatial logits, as in the official code (its
  ``BasicConv``: conv without bias, then BN with momentum 0.01), not in the paper's
  equations. ``spatial_bn=False`` gives the paper's equation, the convolution with a bias.
- ``spatial_bn_init``: the initial weight (gamma) of that BatchNorm. ``'zeros'``
  (default) is the official code: ``ResNet.__init__`` in ``MODELS/model_resnet.py`` sets
  every ``bn`` weight whose state-dict key contains ``SpatialGate`` to 0 (the residual
  branch's BNs and all others to 1, every bias to 0), so the spatial gate starts as the
  constant ``sigmoid(0) = 0.5`` and the k x k convolution gets no gradient until gamma
  moves off zero. ``'ones'`` is PyTorch's default, a spatial gate that varies from the
  first step. It has no effect with ``spatial_bn=False`` (no BatchNorm to initialise).
- ``order`` (Table 3): ``channel_spatial`` (default), ``spatial_channel``, ``parallel``.
  The paper gives no formula for its parallel arrangement; ours computes both gates from
  the same input and applies their product, ``y = x * Mc(x) * Ms(x)``, so each submodule
  is unchanged and only what it sees differs (``parts.arrange``).
- ``mode``: ``both`` (default), ``channel`` (channel attention only), ``spatial``
  (spatial attention only); options of the absent part are still validated.

Differences from the official code: the MLP is two 1x1 convolutions instead of Linear
layers (same parameters); the spatial descriptor stacks mean then max (the official code
stacks max then mean, a permutation of the convolution's input channels). Of the official
initialisation only the spatial BN's zero gamma is followed (a property of the block);
the official network-wide choices (kaiming-normal fan-out convs, zero MLP biases) are left
to PyTorch's defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import (
    ARRANGEMENTS,
    CHANNEL_POOLS,
    ChannelMLP,
    arrange,
    check_choice,
    check_odd_kernel,
    global_pool,
    parse_pool_types,
    reduction_width,
)
from .registry import register

CHANNEL_ATTENTION_POOLS = ("avg", "max", "lp", "lse")
SPATIAL_DESCRIPTORS = ("avgmax", "conv1x1")
MODES = ("both", "channel", "spatial")
SPATIAL_BN_INITS = {"zeros": 0.0, "ones": 1.0}


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")


class ChannelAttention(nn.Module):
    """CBAM's channel attention: every pooled descriptor through one shared MLP, summed."""

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        pool_types: str | list[str] = "avg+max",
    ):
        super().__init__()
        self.pool_types = parse_pool_types("pool_types", pool_types, CHANNEL_ATTENTION_POOLS)
        self.rd_channels = reduction_width(channels, rd_ratio, rd_divisor, rd_channels)
        self.mlp = ChannelMLP(channels, self.rd_channels, bias=True)
        # No-op hook point: a forward hook on ``gate`` sees the (B, C, 1, 1) gate values.
        self.gate = nn.Identity()

    def attention(self, x: Tensor) -> Tensor:
        """The channel gate, ``(B, C, 1, 1)``."""
        # (P*B, C, 1, 1): all descriptors go through the MLP in one batch.
        pooled = torch.cat([global_pool(x, kind) for kind in self.pool_types], dim=0)
        logits = self.mlp(pooled).unflatten(0, (len(self.pool_types), x.shape[0])).sum(0)
        return self.gate(torch.sigmoid(logits))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)

    def extra_repr(self) -> str:
        return f"pool_types={'+'.join(self.pool_types)}, rd_channels={self.rd_channels}"


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: a ``k x k`` convolution over a per-position descriptor."""

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 7,
        descriptor: str = "avgmax",
        bn: bool = True,
        bn_init: str = "zeros",
    ):
        super().__init__()
        check_odd_kernel("kernel_size", kernel_size)
        check_choice("spatial_descriptor", descriptor, SPATIAL_DESCRIPTORS)
        _check_bool("spatial_bn", bn)
        check_choice("spatial_bn_init", bn_init, SPATIAL_BN_INITS)
        self.descriptor = descriptor
        if descriptor == "conv1x1":
            self.reduce = nn.Conv2d(channels, 1, 1, bias=False)
            maps = 1
        else:
            maps = 2
        # A bias right before a BatchNorm would be cancelled by it.
        self.conv = nn.Conv2d(maps, 1, kernel_size, padding=kernel_size // 2, bias=not bn)
        self.norm = nn.BatchNorm2d(1, momentum=0.01) if bn else nn.Identity()
        if bn:
            nn.init.constant_(self.norm.weight, SPATIAL_BN_INITS[bn_init])
        # No-op hook point: a forward hook on ``gate`` sees the (B, 1, H, W) gate values.
        self.gate = nn.Identity()

    def attention(self, x: Tensor) -> Tensor:
        """The spatial gate, ``(B, 1, H, W)``."""
        if self.descriptor == "conv1x1":
            d = self.reduce(x)  # (B, 1, H, W)
        else:
            d = torch.cat([CHANNEL_POOLS["avg"](x), CHANNEL_POOLS["max"](x)], dim=1)  # (B, 2, H, W)
        return self.gate(torch.sigmoid(self.norm(self.conv(d))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


@register("cbam")
class CBAM(nn.Module):
    """Channel attention and spatial attention, arranged by ``order``."""

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        pool_types: str | list[str] = "avg+max",
        spatial_descriptor: str = "avgmax",
        kernel_size: int = 7,
        spatial_bn: bool = True,
        spatial_bn_init: str = "zeros",
        order: str = "channel_spatial",
        mode: str = "both",
    ):
        super().__init__()
        check_choice("order", order, ARRANGEMENTS)
        check_choice("mode", mode, MODES)
        # Both parts are built first so that every option is validated whatever the mode.
        channel = ChannelAttention(
            channels,
            rd_ratio=rd_ratio,
            rd_divisor=rd_divisor,
            rd_channels=rd_channels,
            pool_types=pool_types,
        )
        spatial = SpatialAttention(
            channels,
            kernel_size=kernel_size,
            descriptor=spatial_descriptor,
            bn=spatial_bn,
            bn_init=spatial_bn_init,
        )
        self.order = order
        self.mode = mode
        self.channel = channel if mode != "spatial" else None
        self.spatial = spatial if mode != "channel" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial is None:
            return self.channel(x)
        if self.channel is None:
            return self.spatial(x)
        return arrange(x, self.channel.attention, self.spatial.attention, self.order)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, order={self.order}"
