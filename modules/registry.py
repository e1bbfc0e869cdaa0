"""The attention-block registry: a plain dict from name to block class.

Every block is built the same way, ``build_attention(name, channels, **kwargs)``, and
every mistake in a name or keyword is reported with what would have been accepted.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

# Where a block can sit inside or around a residual unit (see modules/inject.py).
POSITIONS = (
    "residual",
    "pre",
    "post",
    "identity",
    "after_conv1",
    "after_conv2",
    "stage_end",
    "unit_input",
    "before_convs",
    "stem",
)

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` buildable as ``build_attention(name, ...)``.

    A block class may set ``positions`` (a tuple drawn from ``POSITIONS``) to say where
    it makes sense; the injector refuses the others. The default is every position.

    A block class may also define a classmethod
    ``resolve_arguments(kwargs, backbone, stage) -> dict``: the injector calls it with a
    placement's arguments for one stage (``backbone`` a ``BackboneSpec``, ``stage`` a
    ``StageSpec``, or None for position ``stem``) before building, so that an argument
    value can name something only the backbone knows (ECA's ``kernel_size='released'``).
    """

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"attention block {name!r} is registered twice")
        unknown = set(getattr(cls, "positions", POSITIONS)) - set(POSITIONS)
        if unknown:
            raise ValueError(f"{cls.__name__}.positions has unknown entries {sorted(unknown)}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return add


def available() -> list[str]:
    """Names of every registered block, sorted."""
    return sorted(_REGISTRY)


def block_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; a ValueError naming the closest names if none."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown attention block {name!r}.{hint} Available: {', '.join(available())}"
        )
    return _REGISTRY[name]


def block_arguments(name: str) -> list[str]:
    """The keyword arguments a block accepts (besides ``channels``)."""
    params = inspect.signature(block_class(name).__init__).parameters
    return [p for p in params if p not in ("self", "channels")]


def block_positions(name: str) -> tuple[str, ...]:
    """Positions where the block may be injected."""
    return tuple(getattr(block_class(name), "positions", POSITIONS))


def check_arguments(name: str, kwargs: dict) -> None:
    """Raise a ValueError if ``kwargs`` holds a keyword the block does not take."""
    accepted = block_arguments(name)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"attention block {name!r} got unknown argument(s) {unknown}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )


def build_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the block registered as ``name`` for ``channels`` input channels."""
    cls = block_class(name)
    check_arguments(name, kwargs)
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return cls(channels, **kwargs)
