"""Squeeze-and-Excitation, with the variants of its ablations.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2019,
https://arxiv.org/abs/1709.01507. The SE-Var1/2/3 variants are from Wang et al.,
"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", CVPR 2020,
https://arxiv.org/abs/1910.03151 (Table 2).

``SqueezeExcite(channels)`` squeezes every channel to one number (global average pooling),
excites through ``C -> C // r -> C`` with a ReLU between and a sigmoid gate, and rescales
the input: ``y = x * sigmoid(W2 relu(W1 avgpool(x) + b1) + b2)``.

Options, each one axis of an ablation:
- ``rd_ratio`` (SE Table 10): ``1/16`` by default; a value above 1 is read as ``r``.
  The hidden width is exactly ``channels // r`` (``rd_divisor=1``); ``rd_divisor=8`` gives
  timm's rounding to a multiple of 8; ``rd_channels`` sets the width outright.
- ``pool_types`` (SE Table 11, squeeze operator): ``'avg'`` (default), ``'max'``, or
  several (``'avg+max'``, a list; also ``lp``, ``lse``, ``std`` from ``parts``). Several
  descriptors are SUMMED BEFORE the MLP, so the excitation runs once and the parameter
  count does not change. Passing each descriptor through the shared MLP and summing the
  outputs instead is CBAM's channel attention: ``cbam`` with ``mode='channel'``.
- ``gate`` (SE Table 12, excitation operator): ``sigmoid`` (default), ``tanh``, ``relu``,
  ``hard_sigmoid``.
- ``bias``: biases of the FC layers. ``None`` picks the paper's choice per variant: True for
  ``standard`` (SENet's released Caffe models have them, and they make SE-ResNet-50 come to
  the 28.09M of CBAM's Table 4), False for ``var2``/``var3`` (ECA's Eqs. 5-6 have none).
- ``variant`` (ECA Table 2, SE without dimensionality reduction): ``standard``; ``var1``
  (no parameters, ``gate(avgpool(x))``); ``var2`` (one weight per channel, a depthwise
  1x1 convolution); ``var3`` (one full ``C x C`` layer). ``rd_*`` do not apply to them.

Differences from the official code: the FC layers are 1x1 convolutions (same parameters
and MACs as SENet's InnerProduct layers); ``rd_ratio`` is validated even for the variants
that ignore it.
"""

from __future__ import annotations

from torch import Tensor, nn

from .parts import (
    GLOBAL_POOLS,
    ChannelMLP,
    check_choice,
    get_gate,
    global_pool,
    parse_pool_types,
    reduction_width,
)
from .registry import register

SE_VARIANTS = ("standard", "var1", "var2", "var3")


@register("se")
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation block: ``x * gate(excite(squeeze(x)))``."""

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        pool_types: str | list[str] = "avg",
        gate: str = "sigmoid",
        bias: bool | None = None,
        variant: str = "standard",
    ):
        super().__init__()
        check_choice("variant", variant, SE_VARIANTS)
        self.pool_types = parse_pool_types("pool_types", pool_types, GLOBAL_POOLS)
        self.gate_name = gate
        self.gate = get_gate("gate", gate)
        if bias is None:
            bias = variant == "standard"
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True, False or None (per variant), got {bias!r}")
        if variant == "var1" and bias:
            raise ValueError("bias=True has no effect with variant='var1' (it has no weights)")
        if rd_channels is not None and variant != "standard":
            raise ValueError(f"rd_channels applies to variant='standard' only, not {variant!r}")
        width = reduction_width(channels, rd_ratio, rd_divisor, rd_channels)
        self.variant = variant
        self.rd_channels = width if variant == "standard" else None

        if variant == "standard":
            self.fc = ChannelMLP(channels, width, bias=bias)
        elif variant == "var1":
            self.fc = nn.Identity()
        elif variant == "var2":
            self.fc = nn.Conv2d(channels, channels, 1, groups=channels, bias=bias)
        else:
            self.fc = nn.Conv2d(channels, channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, 1, 1): several squeeze statistics are summed into one descriptor.
        s = sum(global_pool(x, kind) for kind in self.pool_types)
        return x * self.gate(self.fc(s))

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, rd_channels={self.rd_channels}, "
            f"pool_types={'+'.join(self.pool_types)}, gate={self.gate_name}"
        )
