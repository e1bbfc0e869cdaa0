import pytest
import torch
from timm.layers import DropPath
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modules import backbone_names, backbone_spec, build_backbone, describe_backbone
from modules.backbones import build_resnet, residual_units


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def units(model: nn.Module) -> list[nn.Module]:
    return [u for name in model.stage_names for u in residual_units(getattr(model, name))]


@pytest.mark.parametrize(
    "name, num_classes, cifar_stem, expected",
    [
        ("resnet18", 1000, False, 11_689_512),  # CBAM Table 4: 11.69M
        ("resnet50", 1000, False, 25_557_032),  # CBAM Table 4: 25.56M
        ("resnet18", 10, True, 11_173_962),  # kuangliu/pytorch-cifar: 11.17M
    ],
)
def test_params_match_the_papers(name, num_classes, cifar_stem, expected):
    model = build_backbone(name, num_classes=num_classes, cifar_stem=cifar_stem)
    assert n_params(model) == expected


@pytest.mark.parametrize(
    "name, millions",
    # He et al.: 0.27M / 1.7M (option-A shortcuts); ResNet-164 1.7M. Ours have projections.
    [("resnet20_cifar", 0.27), ("resnet110_cifar", 1.73), ("resnet164_cifar", 1.70)],
)
def test_cifar_params(name, millions):
    assert n_params(build_backbone(name, num_classes=10)) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("name", backbone_names())
def test_spec_matches_built_model(name):
    model = build_backbone(name)
    assert isinstance(model, ResNet)
    assert describe_backbone(model) == backbone_spec(name)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_spec_matches_built_model_with_cifar_stem(name):
    assert describe_backbone(build_backbone(name, cifar_stem=True)) == backbone_spec(name, True)


def test_spec_contents():
    spec = backbone_spec("resnet50")
    assert [s.num_blocks for s in spec.stages] == [3, 4, 6, 3]
    assert [s.out_channels for s in spec.stages] == [256, 512, 1024, 2048]
    assert [s.width for s in spec.stages] == [64, 128, 256, 512]
    assert spec.stages[1].in_channels == (256, 512, 512, 512)
    assert [s.stride for s in spec.stages] == [1, 2, 2, 2]
    assert not spec.cifar_stem and spec.stem_channels == 64
    cifar = backbone_spec("resnet164_cifar")
    assert cifar.cifar_stem and cifar.stem_channels == 16 and cifar.num_stages == 3
    assert {s.block for s in cifar.stages} == {"bottleneck"}
    assert cifar.stages[0].in_channels[:2] == (16, 64)
    assert [s.num_blocks for s in backbone_spec("resnet56_cifar").stages] == [9, 9, 9]


def test_cifar_stem_layout():
    for model in (build_backbone("resnet20_cifar"), build_backbone("resnet18", cifar_stem=True)):
        assert isinstance(model.maxpool, nn.Identity)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert model.conv1.out_channels == model.bn1.num_features
    assert build_backbone("resnet20_cifar").conv1.out_channels == 16
    assert build_backbone("resnet18").conv1.kernel_size == (7, 7)


def test_forward_shapes():
    x = torch.randn(2, 3, 32, 32)
    cifar = build_backbone("resnet20_cifar", num_classes=10).eval()
    assert cifar.forward_features(x).shape == (2, 64, 8, 8)
    assert cifar(x).shape == (2, 10)
    assert [i["reduction"] for i in cifar.feature_info] == [1, 1, 2, 4]
    r18 = build_backbone("resnet18", num_classes=10, cifar_stem=True).eval()
    assert r18.forward_features(x).shape == (2, 512, 4, 4)
    imagenet = build_backbone("resnet18", num_classes=7).eval()
    assert imagenet.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_three_stage_net_with_gradient_checkpointing():
    model = build_backbone("resnet20_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    model.set_grad_checkpointing(True)
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_stride_in_1x1_moves_the_stride_to_the_first_conv():
    v15 = build_backbone("resnet50")
    v1 = build_backbone("resnet50", stride_in_1x1=True)
    moved = 0
    for a, b in zip(units(v15), units(v1), strict=True):
        assert b.conv1.stride == a.conv2.stride and b.conv2.stride == (1, 1)
        moved += a.conv2.stride == (2, 2)
    assert moved == 3  # layer2..layer4
    x = torch.randn(1, 3, 64, 64)
    assert v1.eval().forward_features(x).shape == v15.eval().forward_features(x).shape


def test_stride_in_1x1_gives_the_papers_gmacs():
    model = build_backbone("resnet50", stride_in_1x1=True).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() / 2e9 == pytest.approx(3.858, abs=1e-3)  # CBAM Table 4


def test_stride_in_1x1_leaves_basic_blocks_alone():
    a, b = build_backbone("resnet18"), build_backbone("resnet18", stride_in_1x1=True)
    for ua, ub in zip(units(a), units(b), strict=True):
        assert isinstance(ub, BasicBlock)
        assert (ua.conv1.stride, ua.conv2.stride) == (ub.conv1.stride, ub.conv2.stride)


def test_timm_kwargs_pass_through():
    model = build_backbone("resnet20_cifar", drop_path_rate=0.1, zero_init_last=False)
    assert any(isinstance(m, DropPath) for m in model.modules())
    assert all(torch.all(u.bn2.weight == 1) for u in units(model))
    assert all(torch.all(u.bn2.weight == 0) for u in units(build_backbone("resnet20_cifar")))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"drop_pat_rate": 0.1}, "drop_pat_rate.*drop_path_rate"),
        ({"layers": (1, 1, 1)}, "'layers' is not accepted"),
        ({"stem_width": 32}, "'stem_width' is not accepted"),
    ],
)
def test_bad_timm_kwargs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone("resnet20_cifar", **kwargs)


def test_unknown_name_lists_the_closest_first():
    for fn in (build_backbone, backbone_spec):
        with pytest.raises(
            ValueError, match=r"unknown backbone 'resnet5'; choose one of resnet50, "
        ):
            fn("resnet5")
    with pytest.raises(ValueError, match="resnet20_cifar"):
        build_backbone("resnet20")


def test_build_resnet_custom_layout():
    model = build_resnet("bottleneck", (1, 2), (4, 8), stem_width=8, cifar_stem=True)
    spec = describe_backbone(model)
    assert [s.out_channels for s in spec.stages] == [16, 32]
    assert isinstance(residual_units(model.layer2)[1], Bottleneck)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 1000)
    with pytest.raises(ValueError, match="choose one of 'basic', 'bottleneck'"):
        build_resnet("basik", (1,), (4,))
    with pytest.raises(ValueError, match="stem_width=12 needs cifar_stem=True"):
        build_resnet("basic", (1,), (4,), stem_width=12)


def test_describe_rejects_other_models():
    with pytest.raises(ValueError, match="not a timm ResNet"):
        describe_backbone(nn.Sequential(nn.Conv2d(3, 4, 3)))
