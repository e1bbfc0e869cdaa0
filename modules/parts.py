"""Parts shared by many blocks, written once: global pooling operators, gates, the
reduced width of a bottleneck, the excitation MLP, the arrangement of a channel and a
spatial gate, and argument checks with helpful messages.

Blocks combine these instead of carrying their own copies, so that e.g. "max pooling"
means the same thing in SE, CBAM and GC.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from timm.layers import make_divisible
from torch import Tensor, nn


def check_choice(key: str, value, choices: Iterable) -> None:
    """Raise a ValueError naming ``key`` and the accepted values if ``value`` is not one."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"{key}={value!r} is not accepted; choose one of {', '.join(map(repr, choices))}"
        )


def check_positive(key: str, value, integer: bool = False) -> None:
    """Raise a ValueError naming ``key`` unless ``value`` is a number > 0 (an int if asked)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive int" if integer else "a positive number"
        raise ValueError(f"{key} must be {what}, got {value!r}")


def check_odd_kernel(key: str, value) -> None:
    """Raise a ValueError naming ``key`` unless ``value`` is an odd positive int."""
    check_positive(key, value, integer=True)
    if value % 2 == 0:
        raise ValueError(f"{key} must be odd so the output keeps its size, got {value}")


# --- global (spatial) pooling: (B, C, H, W) -> (B, C, 1, 1) -------------------------


def _lse_pool(x: Tensor) -> Tensor:
    # log-sum-exp over positions, stabilised by the max as in CBAM's official code.
    flat = x.flatten(2)
    return torch.logsumexp(flat, dim=2)[..., None, None]


def std_pool(x: Tensor, unbiased: bool = False) -> Tensor:
    """Per-channel standard deviation over positions, ``(B, C, 1, 1)``: divided by N
    (``unbiased=False``) or by N - 1 (``unbiased=True``, ``torch.std``'s default). With one
    position the unbiased estimate is undefined (``torch.std`` gives NaN); it is 0 here."""
    flat = x.flatten(2)
    correction = 1 if unbiased and flat.shape[2] > 1 else 0
    return flat.std(dim=2, correction=correction)[..., None, None]


def _std_pool(x: Tensor) -> Tensor:
    return std_pool(x, unbiased=False)


GLOBAL_POOLS: dict[str, Callable[[Tensor], Tensor]] = {
    "avg": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "max": lambda x: x.amax(dim=(2, 3), keepdim=True),
    # L2-norm pooling, CBAM official code's 'lp' (F.lp_pool2d with p=2 over the whole map).
    "lp": lambda x: x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt(),
    "lse": _lse_pool,
    "std": _std_pool,
}


def global_pool(x: Tensor, kind: str) -> Tensor:
    """Pool every channel over all positions with the named operator."""
    return GLOBAL_POOLS[kind](x)


def parse_pool_types(
    key: str, value: str | Iterable[str], choices: Iterable[str]
) -> tuple[str, ...]:
    """Accept ``'avg'``, ``'avg+max'``, ``'avgmax'`` or ``['avg', 'max']``; return a tuple.

    Used by blocks that pool with several operators and combine the results.
    """
    choices = tuple(choices)
    if isinstance(value, str):
        parts = ["avg", "max"] if value in ("avgmax", "avg&max") else value.split("+")
    else:
        parts = list(value)
    if not parts:
        raise ValueError(f"{key} needs at least one pooling type out of {choices}")
    for part in parts:
        check_choice(key, part, choices)
    if len(set(parts)) != len(parts):
        raise ValueError(f"{key}={value!r} names a pooling type twice")
    return tuple(parts)


# --- channel pooling, for spatial attention: (B, C, H, W) -> (B, 1, H, W) ------------

CHANNEL_POOLS: dict[str, Callable[[Tensor], Tensor]] = {
    "avg": lambda x: x.mean(dim=1, keepdim=True),
    "max": lambda x: x.amax(dim=1, keepdim=True),
}


# --- gates ----------------------------------------------------------------------------

GATES: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": F.hardsigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
}


def get_gate(key: str, name: str) -> Callable[[Tensor], Tensor]:
    """The gate function called ``name``; a ValueError naming ``key`` if unknown."""
    check_choice(key, name, GATES)
    return GATES[name]


# --- reduction width ------------------------------------------------------------------


def reduction_width(
    channels: int,
    rd_ratio: float = 1 / 16,
    rd_divisor: int = 1,
    rd_channels: int | None = None,
    min_channels: int = 1,
) -> int:
    """Width of the bottleneck inside a channel-attention MLP.

    Paper-faithful by default: ``channels * rd_ratio`` rounded down (SE's ``C // r``),
    never below ``min_channels``. ``rd_divisor > 1`` gives timm's rounding to a multiple
    (timm's own blocks use 8). ``rd_channels`` overrides everything with an exact width.
    A ``rd_ratio`` above 1 is read as the paper's ``r`` (16 means 1/16).
    """
    if rd_channels is not None:
        check_positive("rd_channels", rd_channels, integer=True)
        return rd_channels
    check_positive("rd_ratio", rd_ratio)
    check_positive("rd_divisor", rd_divisor, integer=True)
    ratio = 1.0 / rd_ratio if rd_ratio > 1 else rd_ratio
    if rd_divisor == 1:
        # floor(C * ratio) computed as C // r when the ratio is 1/r, avoiding 0.999.. errors
        r = 1.0 / ratio
        width = channels // round(r) if math.isclose(r, round(r)) else math.floor(channels * ratio)
        return max(min_channels, width)
    return make_divisible(channels * ratio, rd_divisor, min_value=max(min_channels, rd_divisor))


# --- excitation MLP -------------------------------------------------------------------


class ChannelMLP(nn.Sequential):
    """The excitation MLP of SE and CBAM: ``channels -> hidden -> channels`` with a ReLU.

    Written as 1x1 convolutions so it maps pooled ``(B, C, 1, 1)`` descriptors without
    reshaping; the parameter count equals that of the papers' fully connected layers.
    """

    def __init__(self, channels: int, hidden: int, bias: bool = True):
        super().__init__(
            nn.Conv2d(channels, hidden, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=bias),
        )


# --- arrangement of a channel gate and a spatial gate -----------------------------------

ARRANGEMENTS = ("channel_spatial", "spatial_channel", "parallel")


def arrange(
    x: Tensor,
    channel_gate: Callable[[Tensor], Tensor],
    spatial_gate: Callable[[Tensor], Tensor],
    order: str,
) -> Tensor:
    """Refine ``x`` with a channel gate ``(B, C, 1, 1)`` and a spatial gate ``(B, 1, H, W)``.

    Sequential orders (CBAM's Table 3) feed the map refined by the first gate to the
    second; ``parallel`` computes both gates from ``x`` itself and applies their product,
    so only what each gate sees changes between the three arrangements.
    """
    if order == "channel_spatial":
        x = x * channel_gate(x)
        return x * spatial_gate(x)
    if order == "spatial_channel":
        x = x * spatial_gate(x)
        return x * channel_gate(x)
    check_choice("order", order, ARRANGEMENTS)
    return x * channel_gate(x) * spatial_gate(x)


# --- softmax attention with memory linear in the number of positions ---------------------


_EXACT_WIDTHS = contextvars.ContextVar("exact_attention_widths", default=False)


@contextlib.contextmanager
def exact_attention_widths():
    """Within this context ``softmax_attention`` runs at the blocks' own widths, without
    the zero padding: a FLOP counter then sees the matrix products the papers count
    (``N*M*E`` for ``q k^T``, ``N*M*Ev`` for the values), not the padded kernel's work.
    The unpadded call may take the ``N x M``-memory path; the profiler uses it, training
    does not."""
    token = _EXACT_WIDTHS.set(True)
    try:
        yield
    finally:
        _EXACT_WIDTHS.reset(token)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` for ``q (B, N, E)``, ``k (B, M, E)``, ``v (B, M, Ev)``.

    Runs through ``scaled_dot_product_attention`` so that fused kernels can avoid the
    ``N x M`` matrix. Those kernels need one width for q, k and v, so the narrower side is
    zero-padded: zero columns add nothing to ``q . k``, and padded output columns are
    dropped. Inputs may be strided views; they are copied to contiguous memory (linear).
    ``scale=None`` is ``1/sqrt(E)`` of the unpadded width (SDPA's default); self-attention
    blocks in CNN papers (non-local, DANet) use ``scale=1.0``.
    """
    width, value_width = q.shape[-1], v.shape[-1]
    if scale is None:
        scale = width**-0.5
    if not _EXACT_WIDTHS.get():
        padded = max(width, value_width)
        q, k = (F.pad(t, (0, padded - width)) for t in (q, k))
        v = F.pad(v, (0, padded - value_width))
    # one head, (B, 1, N, E); the fused CPU kernel also wants the last dim contiguous,
    # which channel-first feature maps read as tokens are not
    q, k, v = (t.contiguous()[:, None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out[:, 0, :, :value_width]
