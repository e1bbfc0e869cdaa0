"""The papers' params and GFLOPs, reproduced by building their models and counting.

Every published number is read from ``results/reference/*.yaml`` and compared at the
precision the paper printed (``bench.reference.agrees``). All models are built on the meta
device: counting needs shapes, not weights, so ResNet-50 at 224 takes a fraction of a second.

A few published numbers do not come out of a plain count; they are listed in KNOWN_GAPS
with what was found. For those the test checks that the count is still close (0.5%) AND
still differs, so a change in either the blocks or the YAML shows up here.
"""

import pytest
import torch
from torch import nn

from bench.profile import build_model, profile
from bench.reference import agrees, reference_table
from modules import build_backbone, inject

KNOWN_GAPS = {
    # SENet Table 10's params for r = 4, 8, 32 are 0.06-0.1M above a count of the SE-ResNet-50
    # they describe (FC biases included or not: 35.64 / 35.62, 30.60 / 30.59, 26.83 / 26.81),
    # while r = 2 and 16 match either way. No single constant offset fits all five rows.
    ("senet", "reduction_ratio", "r4"): "35.636M counted",
    ("senet", "reduction_ratio", "r8"): "30.604M counted",
    ("senet", "reduction_ratio", "r32"): "26.830M counted",
    # SE in conv4_x only: 26,349,992 parameters with FC biases, 8 short of rounding to 26.4.
    ("senet", "stage", "se_stage_4"): "26.349992M counted",
    # SENet Table 2's ResNet-101/152 GFLOPs exceed the v1 count by 0.01-0.02 (7.570, 11.282);
    # ResNet-50 agrees (3.858), so it is not the stride position.
    ("senet", "imagenet", "resnet101"): "7.570 GMACs counted",
    ("senet", "imagenet", "resnet101_se"): "7.593 GMACs counted (with SE element-wise)",
    ("senet", "imagenet", "resnet152"): "11.282 GMACs counted",
}


def check(measured: float, key: tuple, published) -> None:
    if key in KNOWN_GAPS:
        assert measured == pytest.approx(published, rel=5e-3), KNOWN_GAPS[key]
        assert not agrees(measured, published), f"{key} now agrees: drop it from KNOWN_GAPS"
    else:
        assert agrees(measured, published), f"{key}: measured {measured:.6f}, paper {published}"


def params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def v1_model(backbone: str, attention: str = "none", **block_args) -> nn.Module:
    return build_model(backbone, attention, block_args, stride_in_1x1=True, device="meta")


CBAM = reference_table("cbam", "imagenet")


@pytest.mark.parametrize("row", list(CBAM))
def test_cbam_table4_params_and_gflops(row):
    spec = CBAM[row]
    costs = profile(v1_model(spec["backbone"], spec["attention"]))
    check(costs["params"] / 1e6, ("cbam", "imagenet", row), spec["params_m"])
    check(costs["gmacs"], ("cbam", "imagenet", row), spec["gmacs"])


SENET = reference_table("senet", "imagenet")


@pytest.mark.parametrize("row", list(SENET))
def test_senet_table2_gflops(row):
    """SENet's 3.87 for SE-ResNet-50 counts the SE block's own pooling and gating (one op
    per element): the MACs alone give 3.8605, which is CBAM's 3.860 for the same model."""
    spec = SENET[row]
    costs = profile(v1_model(spec["backbone"], spec["attention"]))
    attention = costs["attention"]
    measured = costs["gmacs"] - attention["gmacs"] + attention["gmacs_elementwise"]
    check(measured, ("senet", "imagenet", row), spec["gmacs"])
    if "params_m" in spec:
        check(costs["params"] / 1e6, ("senet", "imagenet", row), spec["params_m"])
    if spec["attention"] == "se":
        plain = round(costs["gmacs"], spec["gmacs"].decimals)
        assert plain < spec["gmacs"], "the plain MAC count alone should fall short"


@pytest.mark.parametrize("row", list(reference_table("senet", "reduction_ratio")))
def test_senet_reduction_ratio_params(row):
    spec = reference_table("senet", "reduction_ratio")[row]
    model = v1_model(spec["backbone"], "se", rd_ratio=1 / spec["reduction"])
    check(params_m(model), ("senet", "reduction_ratio", row), spec["params_m"])


@pytest.mark.parametrize("row", list(reference_table("senet", "stage")))
def test_senet_stage_ablation_params(row):
    spec = reference_table("senet", "stage")[row]
    with torch.device("meta"):
        model = build_backbone(spec["backbone"], stride_in_1x1=True)
    summary = inject(model, [{"block": "se", "stages": spec["stages"]}])
    assert {r.stage for r in summary} == set(spec["stages"])
    check(params_m(model), ("senet", "stage", row), spec["params_m"])


def test_se_stage_names_follow_the_paper():
    # SE_stage_2 is conv2_x, the 256-channel stage: our stage 1.
    stages = reference_table("senet", "stage")
    with torch.device("meta"):
        model = build_backbone("resnet50")
    summary = inject(model, [{"block": "se", "stages": stages["se_stage_2"]["stages"]}])
    assert {r.channels for r in summary} == {256}


def test_eca_adaptive_kernel_sizes_on_resnet50():
    rows = reference_table("eca", "adaptive_kernel")
    with torch.device("meta"):
        model = build_backbone("resnet50", stride_in_1x1=True)
    summary = inject(model, [{"block": "eca"}])
    for spec in rows.values():
        (stage,) = spec["stages"]
        blocks = [r for r in summary if r.stage == stage]
        assert blocks and {r.channels for r in blocks} == {spec["channels"]}
        for r in blocks:
            convs = [m for m in model.get_submodule(r.path).modules() if isinstance(m, nn.Conv1d)]
            assert [c.kernel_size for c in convs] == [(spec["kernel_size"],)]
            assert r.params == spec["kernel_size"]


@pytest.mark.parametrize("row", ["resnet50", "resnet50_eca"])
def test_eca_table3_gflops(row):
    # ECA's params are as its authors counted them (see eca.yaml): recorded, not tested.
    spec = reference_table("eca", "imagenet")[row]
    costs = profile(v1_model(spec["backbone"], spec["attention"]))
    check(costs["gmacs"], ("eca", "imagenet", row), spec["gmacs"])


def test_resnet18_cifar_stem_reference_point():
    """11.17M params as counted; the 0.556 GMACs also counts each BatchNorm output element
    once (as thop/ptflops do): the plain count is 0.5554."""
    spec = reference_table("simam_cifar", "resnet18_cifar_stem")["resnet18"]
    with torch.device("meta"):
        model = build_backbone(spec["backbone"], num_classes=10, cifar_stem=spec["cifar_stem"])
    norm_elements = []
    hooks = [
        # o[0]: one image's output (the profile runs a batch of one and reports per image)
        m.register_forward_hook(lambda m, i, o: norm_elements.append(o[0].numel()))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    costs = profile(model, input_size=(3, spec["input"], spec["input"]))
    for hook in hooks:
        hook.remove()
    assert agrees(costs["params"] / 1e6, spec["params_m"])
    assert not agrees(costs["gmacs"], spec["gmacs"])
    assert agrees(costs["gmacs"] + sum(norm_elements) / 1e9, spec["gmacs"])
