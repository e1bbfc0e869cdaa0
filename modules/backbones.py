"""Backbones: timm's ``ResNet`` class in the layouts the attention papers use.

- ImageNet ResNet-18/34/50/101/152 ("Deep Residual Learning for Image Recognition",
  https://arxiv.org/abs/1512.03385), optionally with a CIFAR stem: one 3x3 stride-1
  convolution and no max-pool, as in kuangliu/pytorch-cifar.
- The 3-stage CIFAR ResNets of the same paper and of "Identity Mappings in Deep Residual
  Networks" (https://arxiv.org/abs/1603.05027): ResNet-20/56/110 (BasicBlock, 3/9/18 blocks
  per stage) and ResNet-164 (Bottleneck, 18 per stage), widths 16/32/64, 16-channel stem.
- ``stride_in_1x1``: the original ResNet-v1 bottleneck, whose downsampling stride sits on
  the first 1x1 convolution. timm (like torchvision) puts it on the 3x3 convolution
  ("v1.5"); the FLOPs in SE, CBAM and ECA assume v1 (ResNet-50: 3.86 instead of 4.09 GMACs).

Differences from the papers, on purpose: the CIFAR nets use timm's blocks, so they are
post-activation and their shortcuts are 1x1 projections where the shape changes (option B)
rather than He et al.'s zero-padding (option A) or pre-activation units; this adds ~1% of
parameters. ``zero_init_last`` keeps timm's default (True; pass False for plain init).

``backbone_spec`` describes a named backbone as plain data without building it;
``describe_backbone`` reads the same description off a built timm ResNet.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from timm.models import checkpoint_seq
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

BLOCK_TYPES: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class _Arch(NamedTuple):
    block: str
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    cifar_only: bool


_ARCHS: dict[str, _Arch] = {
    "resnet18": _Arch("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64, False),
    "resnet34": _Arch("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64, False),
    "resnet50": _Arch("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64, False),
    "resnet101": _Arch("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), 64, False),
    "resnet152": _Arch("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512), 64, False),
    "resnet20_cifar": _Arch("basic", (3, 3, 3), (16, 32, 64), 16, True),
    "resnet56_cifar": _Arch("basic", (9, 9, 9), (16, 32, 64), 16, True),
    "resnet110_cifar": _Arch("basic", (18, 18, 18), (16, 32, 64), 16, True),
    "resnet164_cifar": _Arch("bottleneck", (18, 18, 18), (16, 32, 64), 16, True),
}

# Arguments build_resnet sets itself; everything else of timm's ResNet passes through.
_OWN_ARGUMENTS = (
    "block",
    "layers",
    "channels",
    "stem_type",
    "stem_width",
    "cifar_stem",
    "stride_in_1x1",
    "num_classes",
)


@dataclass(frozen=True)
class StageSpec:
    """One residual stage: ``layer<index>`` in the model."""

    index: int  # 1-based, as in the placements
    block: str  # "basic" | "bottleneck"
    in_channels: tuple[int, ...]  # input channels of each block
    width: int  # channels after the first (and, in a bottleneck, second) convolution
    out_channels: int
    stride: int  # of the stage's first block

    @property
    def name(self) -> str:
        return f"layer{self.index}"

    @property
    def num_blocks(self) -> int:
        return len(self.in_channels)

    def has_projection(self, unit: int) -> bool:
        """Whether unit ``unit`` has a projection shortcut (timm's ``downsample``): only a
        stage's first unit, where the stride or the width changes."""
        return unit == 0 and (self.stride != 1 or self.in_channels[0] != self.out_channels)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    cifar_stem: bool
    stem_channels: int  # channels out of the stem, into the first stage
    stages: tuple[StageSpec, ...]
    in_channels: int = 3  # image channels, into the stem's first convolution

    @property
    def num_stages(self) -> int:
        return len(self.stages)


def backbone_names() -> list[str]:
    """Names ``build_backbone`` accepts."""
    return list(_ARCHS)


def _arch(name: str) -> _Arch:
    if name not in _ARCHS:
        close = difflib.get_close_matches(str(name), _ARCHS, n=len(_ARCHS), cutoff=0.0)
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(close)}")
    return _ARCHS[name]


def _stage_specs(
    block: str, layers: tuple[int, ...], widths: tuple[int, ...], stem_width: int
) -> tuple[StageSpec, ...]:
    expansion = BLOCK_TYPES[block].expansion
    stages, inplanes = [], stem_width
    for i, (num_blocks, width) in enumerate(zip(layers, widths, strict=True)):
        out = width * expansion
        in_channels = (inplanes,) + (out,) * (num_blocks - 1)
        stages.append(StageSpec(i + 1, block, in_channels, width, out, 1 if i == 0 else 2))
        inplanes = out
    return tuple(stages)


def backbone_spec(name: str, cifar_stem: bool = False) -> BackboneSpec:
    """The layout of a named backbone as plain data; builds nothing."""
    arch = _arch(name)
    stages = _stage_specs(arch.block, arch.layers, arch.widths, arch.stem_width)
    return BackboneSpec(name, cifar_stem or arch.cifar_only, arch.stem_width, stages)


class ResNetBackbone(ResNet):
    """timm's ResNet with any number of stages (timm's forward_features assumes four)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(kwargs["layers"])))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        stages = [getattr(self, name) for name in self.stage_names]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x


def _check_timm_kwargs(timm_kwargs: dict) -> None:
    accepted = [p for p in inspect.signature(ResNet.__init__).parameters if p != "self"]
    for key in timm_kwargs:
        if key in _OWN_ARGUMENTS or key not in accepted:
            others = [p for p in accepted if p not in _OWN_ARGUMENTS]
            raise ValueError(
                f"backbone argument {key!r} is not accepted; timm ResNet options: "
                f"{', '.join(others)}"
            )


def build_resnet(
    block: str,
    layers: tuple[int, ...],
    widths: tuple[int, ...],
    /,
    stem_width: int = 64,
    cifar_stem: bool = False,
    stride_in_1x1: bool = False,
    num_classes: int = 1000,
    **timm_kwargs,
) -> ResNetBackbone:
    """A timm ResNet of any layout: ``widths`` are the planes of each stage (a bottleneck
    stage outputs 4x), ``stem_width`` the channels entering the first stage."""
    if block not in BLOCK_TYPES:
        raise ValueError(f"block={block!r} is not accepted; choose one of 'basic', 'bottleneck'")
    if len(layers) != len(widths) or not layers:
        raise ValueError(f"layers {layers} and widths {widths} need one entry per stage each")
    _check_timm_kwargs(timm_kwargs)
    # timm's stem is 64 channels wide unless it is the 'deep' stem (2 * stem_width): any
    # other width goes through the deep stem, whose convolutions the CIFAR stem replaces.
    if stem_width == 64:
        stem = {}
    elif cifar_stem and stem_width % 2 == 0:
        stem = {"stem_type": "deep", "stem_width": stem_width // 2}
    else:
        raise ValueError(f"stem_width={stem_width} needs cifar_stem=True and an even width")
    model = ResNetBackbone(
        BLOCK_TYPES[block],
        layers=tuple(layers),
        channels=tuple(widths),
        num_classes=num_classes,
        **stem,
        **timm_kwargs,
    )
    if cifar_stem:
        model.conv1 = nn.Conv2d(model.in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        for info in model.feature_info:
            info["reduction"] = max(1, info["reduction"] // (2 if info["module"] == "act1" else 4))
    if stride_in_1x1:
        for stage_name in model.stage_names:
            for unit in getattr(model, stage_name):
                if isinstance(unit, Bottleneck) and unit.conv2.stride != (1, 1):
                    unit.conv1.stride, unit.conv2.stride = unit.conv2.stride, (1, 1)
    return model


def build_backbone(
    name: str,
    num_classes: int = 1000,
    cifar_stem: bool = False,
    stride_in_1x1: bool = False,
    **timm_kwargs,
) -> ResNetBackbone:
    """Build a named backbone (see ``backbone_names()``) as a timm ResNet.

    ``cifar_stem``: 3x3 stride-1 first convolution and no max-pool (the ``*_cifar`` nets
    always have it, whatever the flag says). ``stride_in_1x1``: ResNet-v1 bottlenecks
    (no effect on BasicBlock nets, whose stride is on the first convolution anyway).
    ``timm_kwargs`` go to timm's ResNet (``drop_path_rate``, ``zero_init_last``, ...).
    """
    arch = _arch(name)
    _check_timm_kwargs(timm_kwargs)
    model = build_resnet(
        arch.block,
        arch.layers,
        arch.widths,
        stem_width=arch.stem_width,
        cifar_stem=cifar_stem or arch.cifar_only,
        stride_in_1x1=stride_in_1x1,
        num_classes=num_classes,
        **timm_kwargs,
    )
    model.backbone_name = name
    return model


def residual_units(stage: nn.Module) -> list[nn.Module]:
    """The residual blocks of a stage, skipping anything the injector appended to it. A
    unit the injector wrapped (position ``unit_input``) keeps the original as ``.layer``;
    the original is returned."""
    units = [getattr(m, "layer", m) for m in stage.children()]
    return [m for m in units if isinstance(m, (BasicBlock, Bottleneck))]


def _conv(module: nn.Module) -> nn.Conv2d:
    # A convolution the injector wrapped keeps the original as ``.layer``; a deep stem is
    # a Sequential whose first convolution is the one that sees the input.
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def describe_backbone(model: nn.Module) -> BackboneSpec:
    """The layout of a built timm ResNet (stages ``layer1``, ``layer2``, ...)."""
    stages = []
    while isinstance(stage := getattr(model, f"layer{len(stages) + 1}", None), nn.Sequential):
        units = residual_units(stage)
        kinds = {"basic" if isinstance(u, BasicBlock) else "bottleneck" for u in units}
        if len(kinds) != 1:
            raise ValueError(
                f"layer{len(stages) + 1} must hold timm BasicBlocks or Bottlenecks, one kind"
            )
        first = units[0]
        last_norm = first.bn2 if isinstance(first, BasicBlock) else first.bn3
        stages.append(
            StageSpec(
                index=len(stages) + 1,
                block=kinds.pop(),
                in_channels=tuple(_conv(u.conv1).in_channels for u in units),
                width=_conv(first.conv1).out_channels,
                out_channels=last_norm.num_features,
                stride=first.stride,
            )
        )
    if not stages:
        raise ValueError(
            f"{type(model).__name__} is not a timm ResNet: it has no stages layer1, layer2, ..."
        )
    return BackboneSpec(
        name=getattr(model, "backbone_name", type(model).__name__),
        cifar_stem=isinstance(model.maxpool, nn.Identity),
        stem_channels=model.bn1.num_features,
        stages=tuple(stages),
        in_channels=_conv(model.conv1).in_channels,
    )
