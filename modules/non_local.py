"""Non-local block.

Wang et al., "Non-local Neural Networks", https://arxiv.org/abs/1711.07971

    y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j),     z_i = W_z y_i + x_i          (Eq. 1, 6)

with ``g``, ``theta``, ``phi`` 1x1 convs to ``inter_channels`` (C/2 by default) and
``W_z`` a 1x1 conv back to C followed by BatchNorm whose gamma starts at 0, so the block
is the identity at initialisation (as in the paper's implementation details).
``pairwise`` picks f (Sec. 3.2):

- "gaussian":          softmax_j(x_i . x_j)            on the raw input (no theta/phi)
- "embedded_gaussian": softmax_j(theta_i . phi_j)      (the default, = self-attention)
- "dot_product":       theta_i . phi_j / N
- "concatenation":     ReLU(w^T [theta_i, phi_j]) / N

N is the number of key positions. ``subsample`` is the paper's trick of a 2x2 max-pool
on the key/value side, which cuts the pairwise cost by 4; it is on by default, as in the
official code. ``subsample_order`` says where the pool sits:

- "before_conv" (default): the official Caffe2 code (facebookresearch/video-nonlocal-net,
  ``lib/models/nonlocal_helper.py``, ``spacetime_nonlocal``) max-pools x once and feeds
  the pooled map to both phi and g, so those two 1x1 convs run on a quarter of the
  positions (theta stays at full resolution);
- "after_conv": phi and g run on the full map and their outputs are pooled, as in popular
  PyTorch ports; same parameters, different function, and phi/g cost 4x more.

For "gaussian" (no phi) the keys are the pooled x either way; only g's order differs.

Memory: the softmax forms run through ``scaled_dot_product_attention`` (linear in H*W),
"dot_product" is computed as ``theta (phi^T g) / N`` (exact by associativity, also
linear), and only "concatenation" builds the N x N matrix, since its ReLU sits between
the pairwise terms and the sum.

Where it may go: the paper inserts non-local blocks between residual units; its default
2D model has one block "right before the last residual block of res4", i.e.
``stages: [3], blocks: last, position: unit_input`` here (our stages 1..4 are res2..res5;
the official ``res_stage_nonlocal`` adds the block after unit ``idx``, which is the same
spot). The block carries its own residual connection and is the identity at
initialisation, so ``positions`` are "unit_input" (before a unit, shortcut included),
"post" (after a unit) and "stage_end". "pre" is refused: it wraps only the residual
branch's input, so the shortcut would skip the block; inside a residual branch it would
nest a second skip connection in the branch.

Differences from the official code (facebookresearch/video-nonlocal-net) and the paper:
- The official config scales the embedded-Gaussian affinity by 1/sqrt(inter_channels)
  (``USE_SCALE``); the paper has no scale. ``scaled=False`` (default) is the paper,
  ``scaled=True`` the official code.
- Biases that a following normalisation cancels exactly are left out, because they never
  receive a gradient: phi's bias under a softmax over keys, and (for the softmax forms)
  g's and W_z's biases before the BatchNorm, since softmax weights sum to one.
- The official convs are initialised N(0, 0.01); here PyTorch's defaults are kept (the
  zero BatchNorm gamma is what makes the block start as the identity either way).
- The max-pool uses ``ceil_mode=True`` so odd maps (7x7) keep their border and a 1x1 map
  still works; on even maps this is the official 2x2 stride-2 pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parts import check_choice, check_positive, reduction_width, softmax_attention
from .registry import register

PAIRWISE = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
SUBSAMPLE_ORDERS = ("before_conv", "after_conv")
SOFTMAX_PAIRWISE = ("gaussian", "embedded_gaussian")


@register("non_local")
class NonLocal(nn.Module):
    """Non-local block, ``z = BN(W_z y) + x`` with BN gamma initialised to 0."""

    positions = ("unit_input", "post", "stage_end")

    def __init__(
        self,
        channels: int,
        *,
        pairwise: str = "embedded_gaussian",
        rd_ratio: float = 1 / 2,
        rd_divisor: int = 1,
        inter_channels: int | None = None,
        subsample: bool = True,
        subsample_order: str = "before_conv",
        scaled: bool = False,
    ):
        super().__init__()
        check_choice("pairwise", pairwise, PAIRWISE)
        check_choice("subsample", subsample, (True, False))
        check_choice("subsample_order", subsample_order, SUBSAMPLE_ORDERS)
        check_choice("scaled", scaled, (True, False))
        if scaled and pairwise not in SOFTMAX_PAIRWISE:
            raise ValueError(
                f"scaled=True only applies to pairwise in {SOFTMAX_PAIRWISE}, got {pairwise!r}"
            )
        if inter_channels is not None:
            check_positive("inter_channels", inter_channels, integer=True)
        inter = reduction_width(channels, rd_ratio, rd_divisor, inter_channels)
        softmax = pairwise in SOFTMAX_PAIRWISE
        self.pairwise = pairwise
        self.subsample = subsample
        self.subsample_order = subsample_order

        self.g = nn.Conv2d(channels, inter, 1, bias=not softmax)
        if pairwise == "gaussian":
            self.theta = self.phi = None
            query_width = channels
        else:
            self.theta = nn.Conv2d(channels, inter, 1)
            self.phi = nn.Conv2d(channels, inter, 1, bias=not softmax)
            query_width = inter
        self.scale = query_width**-0.5 if scaled else 1.0
        # w^T [theta_i, phi_j], kept as one vector of length 2 * inter as in the paper
        self.concat = nn.Linear(2 * inter, 1, bias=False) if pairwise == "concatenation" else None
        self.out = nn.Sequential(
            nn.Conv2d(inter, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        nn.init.zeros_(self.out[1].weight)

    def _pool(self, t: Tensor) -> Tensor:
        return F.max_pool2d(t, 2, ceil_mode=True) if self.subsample else t

    def _embed(self, x: Tensor, values: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Queries (B, N, E), keys (B, M, E) and values (B, M, inter), keys and values
        subsampled if asked, the pool before or after phi and g (``subsample_order``)."""
        query = x if self.theta is None else self.theta(x)
        if self.subsample and self.subsample_order == "before_conv":
            pooled = self._pool(x)
            key = pooled if self.phi is None else self.phi(pooled)
            value = self.g(pooled) if values else None
        else:
            key = self._pool(x if self.phi is None else self.phi(x))
            value = self._pool(self.g(x)) if values else None

        def tokens(t: Tensor) -> Tensor:
            return t.flatten(2).transpose(1, 2)

        return tokens(query), tokens(key), None if value is None else tokens(value)

    def _pairwise(self, q: Tensor, k: Tensor) -> Tensor:
        """The explicit (B, N, M) weights f(x_i, x_j) / C(x)."""
        if self.pairwise in SOFTMAX_PAIRWISE:
            return torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)
        if self.pairwise == "dot_product":
            return q @ k.transpose(1, 2) / k.shape[1]
        w_query, w_key = self.concat.weight[0].chunk(2)  # (E,), (E,)
        pair = (q @ w_query)[:, :, None] + (k @ w_key)[:, None, :]  # (B, N, M)
        return F.relu(pair) / k.shape[1]

    def attention_map(self, x: Tensor) -> Tensor:
        """The (B, N, M) pairwise weights, for inspection; quadratic in H*W."""
        q, k, _ = self._embed(x, values=False)
        return self._pairwise(q, k)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self._embed(x)  # (B, N, E), (B, M, E), (B, M, inter)
        if self.pairwise in SOFTMAX_PAIRWISE:
            y = softmax_attention(q, k, v, scale=self.scale)  # (B, N, inter)
        elif self.pairwise == "dot_product":
            # (E, inter) in the middle: never the N x M matrix
            y = q @ (k.transpose(1, 2) @ v) / k.shape[1]
        else:
            y = self._pairwise(q, k) @ v
        y = y.transpose(1, 2).reshape(B, -1, H, W)  # (B, inter, H, W)
        return x + self.out(y)
