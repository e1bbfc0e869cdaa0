"""Grad-CAM maps of a classifier, through the ``grad-cam`` library (pytorch_grad_cam).

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", https://arxiv.org/abs/1610.02391 (CBAM's Fig. 4 compares such maps with and
without attention). The CAM itself is the library's ``GradCAM``; this module only picks
the target layer of our timm ResNets and returns a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from modules import describe_backbone

from .common import evaluating, find_layer, model_device


def default_target_layer(model: nn.Module) -> nn.Module:
    """The last residual stage (``layer4`` of an ImageNet ResNet, ``layer3`` of a CIFAR
    ResNet), whose output, including any ``stage_end`` attention block, is what global
    pooling and the classifier see: Grad-CAM's usual choice."""
    names = getattr(model, "stage_names", None)
    if not names:
        names = [stage.name for stage in describe_backbone(model).stages]
    return getattr(model, names[-1])


def grad_cam(
    model: nn.Module,
    images: Tensor,
    targets: Sequence[int] | Tensor | None = None,
    target_layer: nn.Module | str | None = None,
) -> Tensor:
    """Grad-CAM maps ``(N, H, W)`` at the input resolution, each scaled to [0, 1] (the
    library's min-max scaling per image), as a float32 CPU tensor.

    ``targets``: one class index per image; None explains each image's top prediction.
    ``target_layer``: a module or its path in ``model``; None is
    ``default_target_layer(model)``. The model runs in eval mode; its modes are restored."""
    layer = (
        default_target_layer(model) if target_layer is None else find_layer(model, target_layer)[1]
    )
    if targets is not None:
        targets = [ClassifierOutputTarget(int(t)) for t in targets]
        if len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images; give one each")
    with evaluating(model), torch.enable_grad():
        cam = GradCAM(model=model, target_layers=[layer])
        try:
            maps = cam(input_tensor=images.to(model_device(model)), targets=targets)
        finally:
            # not the library's context manager: its __exit__ swallows IndexErrors
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)  # the library's backward left gradients
    return torch.from_numpy(maps).float().clamp(0.0, 1.0)
