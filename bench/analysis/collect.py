"""What the injected attention blocks compute on a batch, collected with forward hooks.

``collect(model, images)`` runs the model once (eval mode, no gradients) and returns one
:class:`BlockOutput` per injected block and kind of output, blocks in the order of
``modules.attention_modules`` (registration order, e.g. a unit's ``post`` block may come
before its ``residual`` one):

- ``"channel"``, ``(N, C)``: the channel gate that multiplies the feature map, for SE, ECA,
  GCT (``1 + tanh``, in [0, 2]), SRM, FcaNet, GSoP, bilinear, EncNet, CBAM's channel
  attention and GC with ``fusion`` containing ``scale``. For BAM with both branches the
  attention ``sigmoid(M_c + M_s)`` is 3D; its channel weights are its mean over positions.
- ``"spatial"``, ``(N, H, W)``: the spatial gate of CBAM, and BAM's attention averaged over
  channels (BAM multiplies by ``1 + attention``; the map is the attention itself).
- ``"attention"``, ``(N, Q, M)``: rows of the pairwise attention of non-local blocks and of
  DANet's position attention (``danet_position`` and the position part of ``danet``), for
  Q chosen query positions over the M key positions (``M = H * W``; for a non-local
  block with ``subsample`` the keys lie on the 2x2 max-pooled grid, see ``key_shape``).
- ``"context"``, ``(N, H, W)``: the softmax weights with which GC and SNL pool the
  positions into one context vector (query-independent by construction; sums to 1).

Blocks without such a tensor (ParseNet, DANet's channel attention) give nothing. All
tensors are detached float32 on the CPU.

Where each value is read (a forward hook on a submodule of the block):

- the no-op ``gate`` hook points (``nn.Identity``) of CBAM's two attentions, ECA, GCT, BAM;
- the last layer before the gate nonlinearity, with that nonlinearity applied here: SE
  (``fc``, then the block's own ``gate`` function), SRM (``bn``), FcaNet, GSoP, bilinear,
  EncNet (``fc``), GC (``scale``); GC/SNL's pooling logits (``pool.key``) then a softmax;
- non-local and DANet never form the attention matrix in their forward (a fused kernel
  does the work), so the block's INPUT is captured and the rows are recomputed from it:
  ``NonLocal.attention_map``, and ``softmax_j(q_i . k_j)`` (unscaled, as in the block)
  from DANet's ``query`` and ``key`` convolutions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modules import attention_modules

from .common import evaluating, model_device, stage_of

KINDS = ("channel", "spatial", "attention", "context")

# Query positions as (y, x) fractions of the map: the centre and the four quadrant centres.
DEFAULT_QUERIES = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75))


@dataclass(frozen=True)
class BlockOutput:
    """One kind of output of one injected block on one batch.

    ``tensor`` is ``(N, C)`` for ``channel``, ``(N, H, W)`` for ``spatial`` and ``context``,
    ``(N, Q, M)`` for ``attention``. Attention outputs also carry the flat indices of the
    queries in the block's ``query_shape`` grid and the ``key_shape`` grid of the M keys
    (``maps()`` reshapes the rows to it)."""

    path: str  # the block's path in the model, e.g. "layer2.0.se.attention.0"
    block: str  # registry name, e.g. "cbam"
    stage: int | None  # 1-based residual stage, from the path
    kind: str  # one of KINDS
    tensor: Tensor
    query_index: Tensor | None = None  # (Q,) long, attention only
    query_shape: tuple[int, int] | None = None  # (H, W) of the queries, attention only
    key_shape: tuple[int, int] | None = None  # (H', W') of the keys, attention only

    def maps(self) -> Tensor:
        """Attention rows as key-grid maps, ``(N, Q, H', W')``."""
        if self.kind != "attention":
            raise ValueError(f"maps() is for attention outputs, this one is {self.kind!r}")
        return self.tensor.unflatten(-1, self.key_shape)


# --- how each block's outputs are read ---------------------------------------------------


def _channel(gate: Tensor) -> Tensor:
    """(N, C), (N, C, 1, 1) or a full (N, C, H, W) attention -> (N, C)."""
    return gate if gate.ndim == 2 else gate.mean(dim=(2, 3))


def _spatial(gate: Tensor) -> Tensor:
    """(N, 1, H, W) or a full (N, C, H, W) attention -> (N, H, W)."""
    return gate.mean(dim=1)


def _sigmoid_channel(block: nn.Module, logits: Tensor) -> Tensor:
    return _channel(torch.sigmoid(logits))


def _softmax_positions(block: nn.Module, logits: Tensor) -> Tensor:
    # (N, 1, H, W) pooling logits -> softmax over all positions, (N, H, W)
    return logits.flatten(1).softmax(dim=1).view(logits.shape[0], *logits.shape[2:])


@dataclass(frozen=True)
class _Tap:
    """Read ``kind`` from the output of the block's submodule ``module`` ("" = the block)."""

    kind: str
    module: str
    read: Callable[[nn.Module, Tensor], Tensor]
    applies: Callable[[nn.Module], bool] = lambda block: True


def _non_local_rows(block: nn.Module, x: Tensor, index: Tensor) -> tuple[Tensor, tuple]:
    rows = block.attention_map(x)[:, index]  # (N, Q, M)
    h, w = x.shape[-2:]
    keys = (-(-h // 2), -(-w // 2)) if block.subsample else (h, w)  # ceil-mode 2x2 pool
    if keys[0] * keys[1] != rows.shape[-1]:
        raise RuntimeError(f"non-local keys: {rows.shape[-1]} positions, expected grid {keys}")
    return rows, keys


def _position_rows(block: nn.Module, x: Tensor, index: Tensor) -> tuple[Tensor, tuple]:
    pam = block.position if hasattr(block, "position") else block  # danet or danet_position
    q = pam.query(x).flatten(2).transpose(1, 2)[:, index]  # (N, Q, E)
    k = pam.key(x).flatten(2)  # (N, E, M)
    return torch.softmax(q @ k, dim=-1), tuple(x.shape[-2:])  # scale 1, as the block


_CHANNEL_GATE = [_Tap("channel", "gate", lambda block, gate: _channel(gate))]
_SIGMOID_FC = [_Tap("channel", "fc", _sigmoid_channel)]
_POOLING = _Tap("context", "pool.key", _softmax_positions, lambda b: b.pool is not None)

_TAPS: dict[str, list[_Tap]] = {
    "se": [_Tap("channel", "fc", lambda block, logits: _channel(block.gate(logits)))],
    "cbam": [
        _Tap("channel", "channel.gate", lambda b, g: _channel(g), lambda b: b.channel is not None),
        _Tap("spatial", "spatial.gate", lambda b, g: _spatial(g), lambda b: b.spatial is not None),
    ],
    "eca": _CHANNEL_GATE,
    "gct": _CHANNEL_GATE,
    "srm": [_Tap("channel", "bn", _sigmoid_channel)],
    "fca": _SIGMOID_FC,
    "gsop": _SIGMOID_FC,
    "bilinear": _SIGMOID_FC,
    "enc": _SIGMOID_FC,
    "bam": [
        _Tap("channel", "gate", lambda b, g: _channel(g), lambda b: b.channel_branch is not None),
        _Tap("spatial", "gate", lambda b, g: _spatial(g), lambda b: b.spatial_branch is not None),
    ],
    "gc": [
        _Tap("channel", "scale", _sigmoid_channel, lambda b: b.scale is not None),
        _POOLING,
    ],
    "snl": [_POOLING],
}
# Blocks whose attention rows are recomputed from their input: name -> rows(block, x, index).
_ATTENTION: dict[str, Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, tuple]]] = {
    "non_local": _non_local_rows,
    "danet_position": _position_rows,
    "danet": _position_rows,
}


def query_positions(queries, height: int, width: int) -> Tensor:
    """Flat indices (row-major) into an ``height x width`` grid of the query positions.

    ``queries`` is ``"all"`` or a sequence of ``(y, x)`` fractions in [0, 1] of the map
    (``(0.5, 0.5)`` is the centre), so that one choice means the same place at every stage;
    ``(y, x)`` maps to row ``min(floor(y * H), H - 1)``, likewise for columns."""
    if isinstance(queries, str):
        if queries != "all":
            raise ValueError(f"queries={queries!r}: use 'all' or a list of (y, x) fractions")
        return torch.arange(height * width)
    index = []
    for query in queries:
        if len(query) != 2 or not all(0.0 <= float(f) <= 1.0 for f in query):
            raise ValueError(f"query {query!r} is not a (y, x) pair of fractions in [0, 1]")
        row = min(int(float(query[0]) * height), height - 1)
        col = min(int(float(query[1]) * width), width - 1)
        index.append(row * width + col)
    if not index:
        raise ValueError("queries is empty; give at least one (y, x) or 'all'")
    return torch.tensor(index)


def _as_output(tensor: Tensor) -> Tensor:
    return tensor.detach().float().contiguous().cpu()


def collect(
    model: nn.Module,
    images: Tensor,
    *,
    kinds: Sequence[str] = KINDS,
    queries: str | Sequence[tuple[float, float]] = DEFAULT_QUERIES,
) -> list[BlockOutput]:
    """Run ``model`` on ``images`` (eval mode, no gradients; the modes are restored) and
    return what every injected block computed, as described in the module docstring.

    ``kinds``: which outputs to collect (any of ``KINDS``). ``queries``: the query
    positions of attention rows, ``"all"`` or ``(y, x)`` fractions (``query_positions``).
    A model without injected blocks gives an empty list."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    found: dict[int, BlockOutput] = {}
    expected: list[tuple[int, str, str]] = []
    handles = []

    def output_hook(slot, path, block, tap):
        def hook(module, args, output):
            found[slot] = BlockOutput(
                path,
                block.registry_name,
                stage_of(path),
                tap.kind,
                _as_output(tap.read(block, output)),
            )

        return hook

    def input_hook(slot, path, block, rows):
        def hook(module, args):
            x = args[0]
            index = query_positions(queries, *x.shape[-2:]).to(x.device)
            attention, keys = rows(block, x, index)
            found[slot] = BlockOutput(
                path,
                block.registry_name,
                stage_of(path),
                "attention",
                _as_output(attention),
                query_index=index.cpu(),
                query_shape=tuple(x.shape[-2:]),
                key_shape=tuple(keys),
            )

        return hook

    for path, block in attention_modules(model):
        name = block.registry_name
        for tap in _TAPS.get(name, ()):
            if tap.kind in kinds and tap.applies(block):
                slot = len(expected)
                expected.append((slot, path, tap.kind))
                hook = output_hook(slot, path, block, tap)
                handles.append(block.get_submodule(tap.module).register_forward_hook(hook))
        if "attention" in kinds and name in _ATTENTION:
            slot = len(expected)
            expected.append((slot, path, "attention"))
            hook = input_hook(slot, path, block, _ATTENTION[name])
            handles.append(block.register_forward_pre_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            model(images.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    missing = [f"{path} ({kind})" for slot, path, kind in expected if slot not in found]
    if missing:
        raise RuntimeError(f"these blocks did not run in the forward pass: {', '.join(missing)}")
    return [found[slot] for slot, _, _ in expected]


def select(outputs: Sequence[BlockOutput], kind: str | None = None, block: str | None = None):
    """The outputs of one kind and/or one block name, in their order."""
    return [
        out
        for out in outputs
        if (kind is None or out.kind == kind) and (block is None or out.block == block)
    ]
