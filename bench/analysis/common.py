"""Small helpers shared by the analysis functions: evaluation mode, stage of a block path,
the device of a model, and turning a layer name into the layer."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

_STAGE = re.compile(r"^layer(\d+)(\.|$)")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (BatchNorm on running statistics) and put every submodule
    back in the mode it had, even if the modes were mixed."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def stage_of(path: str) -> int | None:
    """The 1-based residual stage of a module path (``layer2.0.se.attention.0`` -> 2), or
    None for a path outside the stages."""
    match = _STAGE.match(path)
    return int(match.group(1)) if match else None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU if it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def find_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """``(path, module)`` for a layer given by its path in ``model`` or as the module."""
    if isinstance(layer, str):
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"model has no submodule {layer!r}") from None
    for path, module in model.named_modules():
        if module is layer:
            return path, module
    raise ValueError(f"{type(layer).__name__} is not a submodule of the model")
