"""Empirical and theoretical receptive fields of one unit.

Liu, Rabinovich, Berg, "ParseNet: Looking Wider to See Better",
https://arxiv.org/abs/1506.04579, Sec. 3.1 and Fig. 2: the receptive field a unit
actually uses is much smaller than the theoretical one. They measure it by sliding a small
patch of random noise over the input and recording how much the unit's activation changes;
the region where the change is large is the empirical receptive field. That gap is the
paper's argument for adding global context.

``empirical_receptive_field`` does that for one unit (by default the centre unit of a
layer's output); ``theoretical_receptive_field`` computes the textbook size from the
kernel sizes, strides and dilations of the convolutions and poolings on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modules import attention_modules

from .common import evaluating, find_layer, model_device

_COUNTED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class TheoreticalReceptiveField:
    size: tuple[int, int]  # (height, width) in input pixels
    jump: tuple[int, int]  # input pixels between neighbouring units (product of strides)
    layers: tuple[str, ...]  # paths of the convolutions and poolings counted, in order


def theoretical_receptive_field(
    model: nn.Module, layer: str | nn.Module | None = None
) -> TheoreticalReceptiveField:
    """Receptive field of a unit of ``layer``'s output (None: of the last conv/pool layer),
    through every ``Conv2d``, ``MaxPool2d`` and ``AvgPool2d`` in registration order up to
    and including ``layer``: ``r += (k - 1) * d * j`` then ``j *= s`` per layer, from
    ``r = j = 1`` (k kernel size, d dilation, s stride, per axis).

    Registration order is the order of execution along the residual branches of our timm
    ResNets, whose chain of convolutions is the longest path. Skipped: shortcut
    projections (any ``downsample`` submodule, which would count a stage's stride twice),
    attention blocks (a global-pooling block makes every later unit see the whole image:
    this is the receptive field of the convolutions alone, as ParseNet compares) and
    adaptive (global) poolings."""
    stop = None if layer is None else find_layer(model, layer)[0]
    skipped = [path for path, _ in attention_modules(model)]
    size, jump, counted = [1, 1], [1, 1], []
    entered = stop is None
    for path, module in model.named_modules():
        inside = stop is not None and (stop == "" or path == stop or path.startswith(stop + "."))
        if entered and stop is not None and not inside:
            break
        entered = entered or inside
        parts = path.split(".")
        if "downsample" in parts or any(path == s or path.startswith(s + ".") for s in skipped):
            continue
        if not isinstance(module, _COUNTED):
            continue
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        for axis in range(2):
            size[axis] += (kernel[axis] - 1) * dilation[axis] * jump[axis]
            jump[axis] *= stride[axis]
        counted.append(path)
    return TheoreticalReceptiveField(tuple(size), tuple(jump), tuple(counted))


@dataclass(frozen=True)
class EmpiricalReceptiveField:
    """ParseNet's measurement for one unit.

    ``change[i, j]`` is the mean change (L2 norm over the selected channels) of the unit's
    activation when the noise patch is centred on input pixel ``(i * stride, j * stride)``.
    ``box`` is ``(top, left, bottom, right)``, inclusive, in input pixels: the bounding box
    of the patch centres whose change is at least ``threshold`` times the largest change;
    ``size`` is its ``(height, width)``."""

    change: Tensor
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    unit: tuple[int, int]  # (y, x) of the unit in the layer's output
    layer: str | None
    patch_size: int
    stride: int
    threshold: float


class _Stop(Exception):
    """Raised by the capture hook: nothing after the layer needs to run."""


def _layer_output(model: nn.Module, module: nn.Module | None, images: Tensor) -> Tensor:
    if module is None:
        return model(images)
    captured = []

    def hook(mod, args, output):
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the layer did not run in the forward pass")
    return captured[0]


def _with_noise(image, centres, patch_size, generator, mean, std) -> Tensor:
    """Copies of ``image`` (C, H, W), one per centre, with the patch there (clipped at the
    border) replaced by Gaussian noise of the given mean and std."""
    batch = image.repeat(len(centres), 1, 1, 1)
    channels, height, width = image.shape
    half = patch_size // 2
    for i, (y, x) in enumerate(centres):
        top, left = max(y - half, 0), max(x - half, 0)
        bottom, right = min(y - half + patch_size, height), min(x - half + patch_size, width)
        noise = torch.randn(channels, bottom - top, right - left, generator=generator)
        batch[i, :, top:bottom, left:right] = noise.to(batch) * std + mean
    return batch


def empirical_receptive_field(
    model: nn.Module,
    image: Tensor,
    *,
    layer: str | nn.Module | None = None,
    unit: tuple[int, int] | None = None,
    channel: int | None = None,
    patch_size: int = 1,
    stride: int = 1,
    threshold: float = 0.1,
    trials: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> EmpiricalReceptiveField:
    """Slide a ``patch_size`` square of random noise over ``image`` and record how much
    one unit of ``layer``'s output changes (ParseNet, Sec. 3.1).

    ``image``: ``(C, H, W)`` or ``(N, C, H, W)`` (the changes are averaged over the
    images); ParseNet uses real images, a random one measures the architecture alone.
    ``layer``: a module or its path whose output is ``(N, C', H', W')``; None is the model's
    output. ``unit``: ``(y, x)`` in that output, default the centre ``(H' // 2, W' // 2)``.
    ``channel``: one channel of the unit, or None for the L2 norm of the change over all
    channels. The patch covers rows ``y - patch_size // 2`` onwards (clipped at the border)
    and is filled with noise of the image's own mean and standard deviation (std 1 if the
    image is constant); ``trials`` noise draws per position are averaged. With
    ``patch_size`` p the box is the true receptive field grown by ``p // 2`` on each side,
    so ``patch_size=1`` (default) measures it exactly; ``stride`` > 1 measures every
    ``stride``-th position only. Runs in eval mode without gradients; modes are restored."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"image must be (C, H, W) or (N, C, H, W), got {tuple(image.shape)}")
    for key, value in (("patch_size", patch_size), ("stride", stride), ("trials", trials)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    path, module = (None, None) if layer is None else find_layer(model, layer)
    images = image.to(model_device(model))
    height, width = images.shape[-2:]
    ys, xs = range(0, height, stride), range(0, width, stride)
    centres = [(y, x) for y in ys for x in xs]
    generator = torch.Generator().manual_seed(seed)
    change = torch.zeros(len(centres), dtype=torch.float64)
    with evaluating(model), torch.no_grad():
        reference = _layer_output(model, module, images)
        if reference.ndim != 4:
            raise ValueError(
                f"the layer's output must be (N, C, H, W), got {tuple(reference.shape)}"
            )
        out_h, out_w = reference.shape[-2:]
        uy, ux = (out_h // 2, out_w // 2) if unit is None else unit
        if not (0 <= uy < out_h and 0 <= ux < out_w):
            raise ValueError(f"unit {(uy, ux)} is outside the layer's {out_h}x{out_w} output")
        picked = slice(None) if channel is None else slice(channel, channel + 1)
        for img, ref in zip(images, reference[:, picked, uy, ux], strict=True):
            mean, std = img.mean().item(), img.std().item() or 1.0
            for _ in range(trials):
                for start in range(0, len(centres), batch_size):
                    chunk = centres[start : start + batch_size]
                    batch = _with_noise(img, chunk, patch_size, generator, mean, std)
                    out = _layer_output(model, module, batch)[:, picked, uy, ux]
                    change[start : start + len(chunk)] += (out - ref).double().norm(dim=1).cpu()
        change /= trials * len(images)
    change = change.view(len(ys), len(xs)).float()
    peak = change.max().item()
    if peak <= 0:
        raise ValueError("the unit does not respond to a noise patch anywhere")
    mask = change >= threshold * peak
    rows = mask.any(dim=1).nonzero()[:, 0]
    cols = mask.any(dim=0).nonzero()[:, 0]
    top, bottom = ys[rows.min()], ys[rows.max()]
    left, right = xs[cols.min()], xs[cols.max()]
    return EmpiricalReceptiveField(
        change=change,
        box=(top, left, bottom, right),
        size=(bottom - top + 1, right - left + 1),
        unit=(uy, ux),
        layer=path,
        patch_size=patch_size,
        stride=stride,
        threshold=threshold,
    )
