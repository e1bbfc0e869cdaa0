"""GCNet's query-independence measure of non-local attention.

Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
https://arxiv.org/abs/1904.11492, Sec. 3 (Fig. 2, Table 1): the attention maps of
different query positions of a trained non-local block are almost the same, measured by
the average cosine distance between the maps of different queries. This is what lets
GC/SNL compute one query-independent context per image.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .collect import collect


def query_independence(attention: Tensor) -> Tensor:
    """Mean pairwise cosine distance between the attention maps of different queries.

    ``attention`` is ``(..., Q, M)``: row i is the attention map (over M key positions) of
    query i, Q >= 2. Returns ``(...)``: the mean of ``1 - cos(a_i, a_j)`` over the
    ``Q (Q - 1)`` ordered pairs ``i != j``. 0 means every query attends the same way (a
    query-independent block, as GCNet finds); for non-negative rows (softmax weights) it is
    at most 1, reached when the queries attend to disjoint positions (e.g. each only to
    itself). An all-zero row has cosine 0 with every row."""
    if attention.ndim < 2 or attention.shape[-2] < 2:
        raise ValueError(
            f"attention must be (..., Q, M) with Q >= 2 queries, got {tuple(attention.shape)}"
        )
    rows = F.normalize(attention.double(), dim=-1)
    cosine = rows @ rows.transpose(-1, -2)  # (..., Q, Q)
    q = cosine.shape[-1]
    off_diagonal = cosine.sum(dim=(-1, -2)) - cosine.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    return (1.0 - off_diagonal / (q * (q - 1))).to(attention.dtype)


def block_query_independence(model: nn.Module, images: Tensor) -> dict[str, float]:
    """``query_independence`` of every non-local / DANet position-attention block of
    ``model`` on ``images``, over all query positions, averaged over the images; keyed by
    the block's path. The full attention matrices are formed (quadratic in H*W)."""
    return {
        out.path: query_independence(out.tensor).mean().item()
        for out in collect(model, images, kinds=("attention",), queries="all")
    }
