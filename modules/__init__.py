"""The attention library: a registry of attention blocks from the papers, and their
injection into timm ResNets.

    from modules import available, build_attention, build_backbone, inject
"""

import importlib
import pkgutil

from .backbones import backbone_names, backbone_spec, build_backbone, describe_backbone
from .inject import attention_modules, inject, validate_placements
from .registry import POSITIONS, available, block_class, build_attention, register

# Each block family lives in its own file and registers itself on import; importing
# every submodule here means a new family file needs no edit anywhere else.
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "POSITIONS",
    "attention_modules",
    "available",
    "backbone_names",
    "backbone_spec",
    "block_class",
    "build_attention",
    "build_backbone",
    "describe_backbone",
    "inject",
    "register",
    "validate_placements",
]
