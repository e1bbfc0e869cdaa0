"""Global context blocks: GC and the simplified non-local block (SNL).

Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
https://arxiv.org/abs/1904.11492

The paper observes that the non-local block's attention map is nearly the same for every
query position, so it computes ONE query-independent context vector per image:

    context = sum_j softmax_j(W_k x_j) x_j                         ("attention" pooling)
    SNL:  z_i = x_i + W_v context                                  (paper Eq. 3, Fig. 4b)
    GC:   z_i = x_i + W_v2 ReLU(LN(W_v1 context))                  (paper Eq. 4, Fig. 4d)

``gc`` exposes the paper's ablations (Tables 2 and 4): ``pooling`` ("attention" or "avg",
the latter making GC an SE-like block), the bottleneck width ``rd_ratio`` (r=16 by
default), ``layer_norm`` (LayerNorm over ``[C/r, 1, 1]`` before the ReLU), and
``fusion``: "add" (the paper's choice), "scale" (``x * sigmoid(transform)``, SE-style)
or "add+scale" (alias "both"; scaling first, as in the official code).

Differences from the official code (mmcv ``ContextBlock``), all deliberate:
- The official key conv ``W_k`` (C -> 1) has a bias. A softmax over positions cancels
  a constant exactly, so that bias never receives a gradient; it is left out here (one
  parameter per block fewer than the official count).
- Initialisation follows the official code: the last conv of every transform is zero
  (``last_zero_init``), so an "add" block starts as the identity and a "scale" block
  starts as a constant gate of sigmoid(0) = 0.5; the key conv is Kaiming (fan_in).
- With ``layer_norm`` the bottleneck is at least 2 wide (C/r would be 1 for C < 32, and
  LayerNorm over one value ignores its input); only narrow CIFAR stages are affected.
- SNL has no official code; it reuses GC's attention pooling with a single C -> C 1x1
  conv ``W_v`` (with bias), zero-initialised like GC's transforms so it also starts as
  the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parts import check_choice, reduction_width
from .registry import register

POOLINGS = ("attention", "avg")
FUSIONS = ("add", "scale")


class AttentionPool(nn.Module):
    """One context vector per image: positions weighted by a softmax over one 1x1 map."""

    def __init__(self, channels: int):
        super().__init__()
        # no bias: the softmax over positions would cancel it (see module docstring)
        self.key = nn.Conv2d(channels, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")

    def weights(self, x: Tensor) -> Tensor:
        """Attention over positions, (B, H*W), the same for every query position."""
        return self.key(x).flatten(1).softmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        weights = self.weights(x)  # (B, N)
        context = torch.bmm(x.flatten(2), weights[:, :, None])  # (B, C, 1)
        return context[..., None]  # (B, C, 1, 1)


def _bottleneck(channels: int, width: int, layer_norm: bool) -> nn.Sequential:
    """GC's transform: 1x1 conv to ``width``, [LayerNorm], ReLU, 1x1 conv back, last conv 0."""
    layers = [nn.Conv2d(channels, width, 1)]
    if layer_norm:
        layers.append(nn.LayerNorm([width, 1, 1]))
    layers += [nn.ReLU(inplace=True), nn.Conv2d(width, channels, 1)]
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


def _parse_fusion(fusion: str | list | tuple) -> tuple[str, ...]:
    if fusion == "both":
        fusion = "scale+add"
    parts = fusion.split("+") if isinstance(fusion, str) else list(fusion)
    if not parts or len(set(parts)) != len(parts) or any(p not in FUSIONS for p in parts):
        raise ValueError(
            f"fusion={fusion!r} is not accepted; choose one of 'add', 'scale', 'add+scale', "
            "'both' (= 'add+scale') or a list of 'add' and 'scale'"
        )
    return tuple(parts)


@register("gc")
class GlobalContext(nn.Module):
    """GC block: query-independent context, bottleneck transform, add and/or scale fusion."""

    def __init__(
        self,
        channels: int,
        *,
        pooling: str = "attention",
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        layer_norm: bool = True,
        fusion: str | list | tuple = "add",
    ):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        check_choice("layer_norm", layer_norm, (True, False))
        fusions = _parse_fusion(fusion)
        # LayerNorm over a single value outputs its bias whatever the input, which would cut
        # the context off; with layer_norm the bottleneck is therefore at least 2 wide.
        min_width = 2 if layer_norm else 1
        width = reduction_width(channels, rd_ratio, rd_divisor, rd_channels, min_width)
        self.pool = AttentionPool(channels) if pooling == "attention" else None
        self.scale = _bottleneck(channels, width, layer_norm) if "scale" in fusions else None
        self.add = _bottleneck(channels, width, layer_norm) if "add" in fusions else None

    def context(self, x: Tensor) -> Tensor:
        """The per-image context vector, (B, C, 1, 1)."""
        return self.pool(x) if self.pool is not None else x.mean(dim=(2, 3), keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        context = self.context(x)  # (B, C, 1, 1)
        out = x
        if self.scale is not None:
            out = out * torch.sigmoid(self.scale(context))
        if self.add is not None:
            out = out + self.add(context)
        return out


@register("snl")
class SimplifiedNonLocal(nn.Module):
    """Simplified non-local block (GCNet Eq. 3): ``z_i = x_i + W_v sum_j a_j x_j``."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = AttentionPool(channels)
        self.value = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value(self.pool(x))
