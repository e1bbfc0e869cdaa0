"""SE, CBAM and ECA blocks: every option builds through the registry, keeps the shape,
trains every parameter, and computes what its paper says."""

import copy

import pytest
import torch
import torch.nn.functional as F

from modules import available, build_attention, build_backbone, inject
from modules.eca import RELEASED_KERNELS, EfficientChannelAttention, adaptive_kernel_size

C = 32


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def positive_input(channels: int = C, size: int = 8) -> torch.Tensor:
    # Strictly positive, so y / x recovers the gate exactly.
    return torch.rand(2, channels, size, size) + 0.5


SE_OPTIONS = [
    {},
    {"rd_ratio": 4},
    {"rd_ratio": 0.25, "rd_divisor": 8},
    {"rd_channels": 3},
    {"pool_types": "max"},
    {"pool_types": "avg+max"},
    {"pool_types": ["avg", "max", "std"]},
    {"gate": "tanh"},
    {"gate": "relu"},
    {"gate": "hard_sigmoid"},
    {"bias": False},
    {"variant": "var1"},
    {"variant": "var2"},
    {"variant": "var2", "bias": True},
    {"variant": "var3"},
]
CBAM_OPTIONS = [
    {},
    {"pool_types": "avg"},
    {"pool_types": "max"},
    {"pool_types": ["avg", "max", "lp", "lse"]},
    {"rd_ratio": 8, "rd_divisor": 8},
    {"spatial_descriptor": "conv1x1"},
    {"spatial_descriptor": "conv1x1", "kernel_size": 3},
    {"kernel_size": 3},
    {"kernel_size": 5, "spatial_bn": False},
    {"order": "spatial_channel"},
    {"order": "parallel"},
    {"mode": "channel"},
    {"mode": "spatial"},
    {"mode": "spatial", "spatial_descriptor": "conv1x1"},
    {"spatial_bn_init": "ones"},
]
ECA_OPTIONS = [
    {},
    {"kernel_size": 3},
    {"kernel_size": 9},
    {"gamma": 1, "b": 2},
    {"shared": False},
    {"shared": False, "kernel_size": 5},
]
ALL_OPTIONS = (
    [("se", kw) for kw in SE_OPTIONS]
    + [("cbam", kw) for kw in CBAM_OPTIONS]
    + [("eca", kw) for kw in ECA_OPTIONS]
)


def test_registered():
    assert {"se", "cbam", "eca"} <= set(available())


@pytest.mark.parametrize(("name", "kwargs"), ALL_OPTIONS, ids=str)
def test_shape_and_gradients(name, kwargs):
    # 128 channels give the r=16 MLP 8 hidden units: with only 2, both are dead at
    # initialisation for some seeds (max-pooled descriptors are all positive), and the
    # first layer then gets no gradient at all, which is a fact of the init, not a bug.
    channels = 128
    block = build_attention(name, channels, **kwargs)
    spatial = getattr(block, "spatial", None)
    if spatial is not None and isinstance(spatial.norm, torch.nn.BatchNorm2d):
        # the official zero BN gamma blocks the spatial conv's gradient at the first step
        # (test_cbam_spatial_gate_starts_at_one_half_like_the_official_code)
        torch.nn.init.ones_(spatial.norm.weight)
    offset, scale = torch.randn(2, channels, 1, 1), torch.rand(2, channels, 1, 1) + 0.5
    x = (torch.randn(2, channels, 8, 8) * scale + offset).requires_grad_()
    y = block(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x), "the block must change its input"
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for param_name, p in block.named_parameters():
        assert p.grad is not None, f"{param_name} gets no gradient"
        assert p.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


# --- SE ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "kwargs", "width"),
    [
        (100, {"rd_ratio": 16}, 6),
        (100, {"rd_ratio": 1 / 16}, 6),
        (256, {}, 16),
        (100, {"rd_ratio": 16, "rd_divisor": 8}, 8),
        (200, {"rd_ratio": 1 / 16, "rd_divisor": 8}, 16),
        (100, {"rd_channels": 7}, 7),
    ],
)
def test_se_reduced_width(channels, kwargs, width):
    block = build_attention("se", channels, **kwargs)
    assert block.rd_channels == width
    assert block.fc[0].out_channels == width


@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_se_param_count_formula(r, bias):
    channels = 64
    block = build_attention("se", channels, rd_ratio=r, bias=bias)
    hidden = channels // r
    assert n_params(block) == 2 * channels * hidden + bias * (hidden + channels)


@pytest.mark.parametrize(
    ("kwargs", "count"),
    [
        ({"variant": "var1"}, 0),
        ({"variant": "var2"}, C),
        ({"variant": "var2", "bias": True}, 2 * C),
        ({"variant": "var3"}, C * C),
        ({"variant": "var3", "bias": True}, C * C + C),
    ],
)
def test_se_variant_param_count(kwargs, count):
    assert n_params(build_attention("se", C, **kwargs)) == count


@pytest.mark.parametrize("gate", ["sigmoid", "tanh", "relu", "hard_sigmoid"])
def test_se_var1_is_gated_mean(gate):
    x = torch.randn(2, C, 8, 8)
    y = build_attention("se", C, variant="var1", gate=gate)(x)
    fn = {
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": torch.relu,
        "hard_sigmoid": torch.nn.functional.hardsigmoid,
    }[gate]
    torch.testing.assert_close(y, x * fn(x.mean(dim=(2, 3), keepdim=True)))


def test_se_var2_is_one_weight_per_channel():
    x = torch.randn(2, C, 8, 8)
    block = build_attention("se", C, variant="var2")
    w = block.fc.weight.view(C)
    torch.testing.assert_close(block(x), x * torch.sigmoid(w * x.mean(dim=(2, 3)))[..., None, None])


@pytest.mark.parametrize("pool_types", ["avg", "max", "avg+max"])
@pytest.mark.parametrize("gate", ["sigmoid", "tanh"])
def test_se_matches_equation(pool_types, gate):
    x = torch.randn(2, C, 8, 8)
    block = build_attention("se", C, rd_ratio=4, pool_types=pool_types, gate=gate)
    w1, b1 = block.fc[0].weight.flatten(1), block.fc[0].bias
    w2, b2 = block.fc[2].weight.flatten(1), block.fc[2].bias
    stats = {"avg": x.mean(dim=(2, 3)), "max": x.amax(dim=(2, 3))}
    s = sum(stats[k] for k in pool_types.split("+"))  # (B, C), summed before the MLP
    z = torch.relu(s @ w1.T + b1) @ w2.T + b2
    expected = x * getattr(torch, gate)(z)[..., None, None]
    torch.testing.assert_close(block(x), expected)


def test_se_squeeze_max_differs_from_avg():
    x = torch.randn(2, C, 8, 8)
    avg = build_attention("se", C)
    mx = build_attention("se", C, pool_types="max")
    mx.load_state_dict(avg.state_dict())
    assert not torch.allclose(avg(x), mx(x))


# --- CBAM --------------------------------------------------------------------------------


def test_cbam_channel_only_gate_is_constant_over_positions():
    x = positive_input()
    gate = build_attention("cbam", C, mode="channel")(x) / x
    torch.testing.assert_close(gate, gate[..., :1, :1].expand_as(gate))
    assert gate[0, :, 0, 0].std() > 0, "the gate should differ between channels"


@pytest.mark.parametrize("descriptor", ["avgmax", "conv1x1"])
def test_cbam_spatial_only_gate_varies_over_positions(descriptor):
    x = positive_input()
    block = build_attention(
        "cbam", C, mode="spatial", spatial_descriptor=descriptor, spatial_bn_init="ones"
    )
    gate = block(x) / x
    # One map shared by all channels, different from position to position.
    torch.testing.assert_close(gate, gate[:, :1].expand_as(gate))
    assert gate[0, 0].std() > 1e-3


def test_cbam_modes_build_only_their_part():
    assert build_attention("cbam", C, mode="channel").spatial is None
    assert build_attention("cbam", C, mode="spatial").channel is None
    both = build_attention("cbam", C)
    assert n_params(both) == n_params(both.channel) + n_params(both.spatial)


def test_cbam_orders_differ_and_parallel_is_gate_product():
    x = torch.randn(2, C, 8, 8)
    # with the official zero BN gamma the spatial gate starts constant; make it vary
    ref = build_attention("cbam", C, order="channel_spatial", spatial_bn_init="ones")
    outputs = {}
    for order in ("channel_spatial", "spatial_channel", "parallel"):
        block = build_attention("cbam", C, order=order)
        block.load_state_dict(ref.state_dict())
        outputs[order] = block(x)
    assert not torch.allclose(outputs["channel_spatial"], outputs["spatial_channel"])
    assert not torch.allclose(outputs["channel_spatial"], outputs["parallel"])
    assert not torch.allclose(outputs["spatial_channel"], outputs["parallel"])
    # Train mode: the spatial BN normalises with batch statistics, so recomputing matches.
    expected = x * ref.channel.attention(x) * ref.spatial.attention(x)
    torch.testing.assert_close(outputs["parallel"], expected)
    x1 = x * ref.channel.attention(x)
    torch.testing.assert_close(outputs["channel_spatial"], x1 * ref.spatial.attention(x1))


def test_cbam_channel_attention_matches_equation():
    x = torch.randn(2, C, 8, 8)
    block = build_attention("cbam", C, mode="channel", rd_ratio=4)
    mlp = block.channel.mlp
    expected = x * torch.sigmoid(
        mlp(x.mean(dim=(2, 3), keepdim=True)) + mlp(x.amax(dim=(2, 3), keepdim=True))
    )
    torch.testing.assert_close(block(x), expected)


def test_cbam_avg_channel_attention_equals_se():
    # CBAM Table 1: channel attention with average pooling alone is SE.
    x = torch.randn(2, C, 8, 8)
    cbam = build_attention("cbam", C, mode="channel", pool_types="avg")
    se = build_attention("se", C)
    se.fc.load_state_dict(cbam.channel.mlp.state_dict())
    torch.testing.assert_close(cbam(x), se(x))


def test_cbam_spatial_attention_matches_equation():
    x = torch.randn(2, C, 8, 8)
    block = build_attention("cbam", C, mode="spatial", kernel_size=3, spatial_bn=False)
    conv = block.spatial.conv
    d = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    expected = x * torch.sigmoid(torch.nn.functional.conv2d(d, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "count"),
    [
        ({"kernel_size": 7}, 2 * 49 + 2),  # conv without bias, BN weight and bias
        ({"kernel_size": 3}, 2 * 9 + 2),
        ({"kernel_size": 7, "spatial_bn": False}, 2 * 49 + 1),
        ({"kernel_size": 7, "spatial_descriptor": "conv1x1"}, C + 49 + 2),
    ],
)
def test_cbam_spatial_param_count(kwargs, count):
    assert n_params(build_attention("cbam", C, mode="spatial", **kwargs)) == count


def test_cbam_spatial_bn_follows_official_code():
    norm = build_attention("cbam", C).spatial.norm
    assert isinstance(norm, torch.nn.BatchNorm2d) and norm.momentum == 0.01


def official_cbam(x, block):
    """CBAM as Jongchan/attention-module MODELS/cbam.py computes it, from our weights:
    ChannelGate (shared MLP on avg and max pools), then SpatialGate (max and mean over
    channels, in that order, 7x7 conv without bias, BN with momentum 0.01, sigmoid)."""
    mlp = block.channel.mlp
    avg = F.avg_pool2d(x, x.shape[2:], stride=x.shape[2:])
    mx = F.max_pool2d(x, x.shape[2:], stride=x.shape[2:])
    x = x * torch.sigmoid(mlp(avg) + mlp(mx))
    compress = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
    # our descriptor stacks mean then max: swap the conv's input channels to match
    weight = block.spatial.conv.weight.flip(1)
    norm = block.spatial.norm
    logits = F.batch_norm(
        F.conv2d(compress, weight, padding=3),
        norm.running_mean.clone(),
        norm.running_var.clone(),
        norm.weight,
        norm.bias,
        training=True,
        momentum=0.01,
        eps=norm.eps,
    )
    return x * torch.sigmoid(logits)


def test_cbam_spatial_gate_starts_at_one_half_like_the_official_code():
    # MODELS/model_resnet.py sets every BN weight whose key contains "SpatialGate" to 0
    # (and every bias to 0): the spatial gate starts as sigmoid(0) = 0.5 everywhere.
    block = build_attention("cbam", C)
    assert torch.equal(block.spatial.norm.weight, torch.zeros(1))
    assert torch.equal(block.spatial.norm.bias, torch.zeros(1))
    x = torch.randn(4, C, 8, 8)
    refined = block.channel(x)
    for mode in ("train", "eval"):
        getattr(block, mode)()
        torch.testing.assert_close(block(x), 0.5 * refined)
        torch.testing.assert_close(block.spatial.attention(refined), torch.full((4, 1, 8, 8), 0.5))
    # the same block as the official code computes it, on copied weights
    block.train()
    torch.testing.assert_close(block(x), official_cbam(x, block))
    # gamma learns from the first step; the conv only once gamma has left zero
    (block(x) * torch.randn_like(x)).sum().backward()
    assert block.spatial.norm.weight.grad.abs().item() > 0
    assert not block.spatial.conv.weight.grad.any()


def test_cbam_spatial_bn_init_ones_is_pytorchs_default():
    block = build_attention("cbam", C, spatial_bn_init="ones")
    assert torch.equal(block.spatial.norm.weight, torch.ones(1))
    x = torch.randn(4, C, 8, 8)
    gate = block.spatial.attention(block.channel(x))
    assert gate.std() > 1e-2  # varies over positions from the start
    torch.testing.assert_close(block(x), official_cbam(x, block))
    # without the BN there is nothing to initialise; the option is accepted and ignored
    plain = build_attention("cbam", C, spatial_bn=False, spatial_bn_init="ones")
    assert isinstance(plain.spatial.norm, torch.nn.Identity)


# --- ResNet parameter totals (CBAM Table 4, SE Table 2) -------------------------------

RESNET50 = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # block output widths
RESNET18 = [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2
TIMM_RESNET50 = 25_557_032
TIMM_RESNET18 = 11_689_512


def test_timm_baselines():
    timm = pytest.importorskip("timm")
    assert n_params(timm.create_model("resnet18")) == TIMM_RESNET18
    assert n_params(timm.create_model("resnet50")) == TIMM_RESNET50


@pytest.mark.parametrize(
    ("name", "widths", "base", "expected_m"),
    [
        ("se", RESNET50, TIMM_RESNET50, 28.09),
        ("cbam", RESNET50, TIMM_RESNET50, 28.09),
        ("se", RESNET18, TIMM_RESNET18, 11.78),
        ("cbam", RESNET18, TIMM_RESNET18, 11.78),
    ],
)
def test_resnet_param_totals(name, widths, base, expected_m):
    total = base + sum(n_params(build_attention(name, c)) for c in widths)
    assert round(total / 1e6, 2) == expected_m
    if (name, widths) == ("se", RESNET50):
        assert total == 28_088_024  # timm's legacy_seresnet50


# --- ECA ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "k"), [(256, 5), (512, 5), (1024, 5), (2048, 7), (64, 3)])
def test_eca_adaptive_kernel(channels, k):
    assert adaptive_kernel_size(channels) == k
    assert EfficientChannelAttention.adaptive_kernel_size(channels) == k
    block = build_attention("eca", channels)
    assert block.kernel_size == k and n_params(block) == k


def test_eca_adaptive_kernel_follows_gamma_and_b():
    # t = int(|(log2 256 + 3) / 1|) = 11, odd
    assert build_attention("eca", 256, gamma=1, b=3).kernel_size == 11
    # t = int((8 + 1) / 3) = 3
    assert adaptive_kernel_size(256, gamma=3) == 3
    assert all(adaptive_kernel_size(c) % 2 == 1 for c in (1, 2, 3, 16, 100, 4096))


@pytest.mark.parametrize("k", [3, 5, 9])
def test_eca_ns_param_count(k):
    assert n_params(build_attention("eca", C, kernel_size=k, shared=False)) == C * k
    assert n_params(build_attention("eca", C, kernel_size=k)) == k


def test_eca_matches_equation():
    x = torch.randn(2, C, 8, 8)
    block = build_attention("eca", C, kernel_size=3)
    w = block.conv.weight.view(3)
    y = torch.nn.functional.pad(x.mean(dim=(2, 3)), (1, 1))  # (B, C + 2)
    logits = w[0] * y[:, :-2] + w[1] * y[:, 1:-1] + w[2] * y[:, 2:]
    torch.testing.assert_close(block(x), x * torch.sigmoid(logits)[..., None, None])


def official_eca_ns(x, weight):
    """ECA-NS as BangguWu/ECANet models/eca_ns.py computes it: the pooled (B, C) vector
    unfolded into every channel's zero-padded k-neighbourhood, then a depth-wise Conv1d
    (C -> C, kernel k, groups=C, no bias) over each neighbourhood; ``weight`` is (C, k)."""
    b, c, k = x.shape[0], x.shape[1], weight.shape[1]
    y = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    windows = F.unfold(y.transpose(-1, -3), kernel_size=(1, k), padding=(0, (k - 1) // 2))
    logits = F.conv1d(windows.transpose(-1, -2), weight[:, None, :], groups=c)  # (B, C, 1)
    return x * torch.sigmoid(logits).view(b, c, 1, 1)


@pytest.mark.parametrize("k", [3, 5])
def test_eca_ns_matches_the_official_eca_ns(k):
    x = torch.randn(2, C, 6, 6)
    block = build_attention("eca", C, kernel_size=k, shared=False)
    torch.testing.assert_close(block(x), official_eca_ns(x, block.weight))
    # the same initial range as the official grouped Conv1d's default initialisation:
    # uniform in +-1/sqrt(fan_in), fan_in = k
    conv = torch.nn.Conv1d(C, C, k, groups=C, bias=False)
    bound = 1 / k**0.5
    assert conv.weight.abs().max() <= bound and block.weight.abs().max() <= bound
    assert block.weight.abs().max() > 0.8 * bound


@pytest.mark.parametrize(
    ("backbone", "kernels"),
    [("resnet50", (3, 5, 5, 7)), ("resnet101", (3, 3, 5, 7)), ("resnet152", (3, 3, 5, 7))],
)
def test_eca_released_kernels_per_stage(backbone, kernels):
    # The released checkpoints: eca_resnet50_k3557, eca_resnet101_k3357, eca_resnet152_k3357
    # (BangguWu/ECANet README); the formula would give 5, 5, 5, 7.
    assert RELEASED_KERNELS[backbone] == kernels
    with torch.device("meta"):
        model = build_backbone(backbone, num_classes=10)
    summary = inject(model, [{"block": "eca", "args": {"kernel_size": "released"}}])
    by_stage = {}
    for row in summary:
        by_stage.setdefault(row.stage, set()).add(model.get_submodule(row.path).kernel_size)
    assert by_stage == {i + 1: {k} for i, k in enumerate(kernels)}
    # the official placement's parameters: k weights per unit, units per stage
    units = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert summary.total_params() == sum(n * k for n, k in zip(units, kernels, strict=True))


def test_eca_released_kernels_in_placements_and_their_errors():
    model = build_backbone("resnet50", num_classes=10)
    placement = {
        "block": "eca",
        "args": {"kernel_size": "released"},
        "stage_args": {4: {"kernel_size": 9}},
    }
    reference = copy.deepcopy(model)
    summary = inject(model, [placement])
    sizes = {row.stage: model.get_submodule(row.path).kernel_size for row in summary}
    assert sizes == {1: 3, 2: 5, 3: 5, 4: 9}
    assert summary.total_params() == 3 * 3 + 4 * 5 + 6 * 5 + 3 * 9
    # ResNet-50 at stage 1: 256 channels, where the formula gives 5
    assert adaptive_kernel_size(256) == 5
    for backbone in ("resnet20_cifar", "resnet164_cifar"):
        with pytest.raises(ValueError, match=r"kernel_size='released' is known for resnet18"):
            inject(build_backbone(backbone, num_classes=10), [{**placement, "stage_args": {}}])
    with pytest.raises(ValueError, match=r"\(eca, stem\): kernel_size='released' is a per-stage"):
        inject(
            reference, [{"block": "eca", "position": "stem", "args": {"kernel_size": "released"}}]
        )
    with pytest.raises(ValueError, match=r"only a placement can resolve"):
        build_attention("eca", 256, kernel_size="released")


def test_eca_ns_with_equal_rows_equals_eca():
    x = torch.randn(2, C, 8, 8)
    eca = build_attention("eca", C, kernel_size=5)
    ns = build_attention("eca", C, kernel_size=5, shared=False)
    with torch.no_grad():
        ns.weight.copy_(eca.conv.weight.view(1, 5).expand(C, 5))
    torch.testing.assert_close(ns(x), eca(x))
    with torch.no_grad():
        ns.weight[3].mul_(-1)  # one channel's own weights change only that channel's gate
    gate_ratio = (ns(x) / eca(x))[:, :, 0, 0]
    assert not torch.allclose(gate_ratio[:, 3], torch.ones(2))
    torch.testing.assert_close(gate_ratio[:, 4:], torch.ones(2, C - 4))


# --- argument checking -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("se", {"pool_types": "mean"}, "pool_types"),
        ("se", {"pool_types": "avg+avg"}, "pool_types"),
        ("se", {"gate": "softmax"}, "gate"),
        ("se", {"variant": "var4"}, "variant"),
        ("se", {"rd_ratio": 0}, "rd_ratio"),
        ("se", {"rd_ratio": -0.5}, "rd_ratio"),
        ("se", {"rd_divisor": 0}, "rd_divisor"),
        ("se", {"rd_channels": 0}, "rd_channels"),
        ("se", {"rd_channels": 4, "variant": "var3"}, "rd_channels"),
        ("se", {"variant": "var1", "bias": True}, "bias"),
        ("se", {"bias": "yes"}, "bias"),
        ("cbam", {"pool_types": "std"}, "pool_types"),
        ("cbam", {"pool_types": []}, "pool_types"),
        ("cbam", {"order": "sequential"}, "order"),
        ("cbam", {"mode": "all"}, "mode"),
        ("cbam", {"spatial_descriptor": "conv"}, "spatial_descriptor"),
        ("cbam", {"kernel_size": 4}, "kernel_size"),
        ("cbam", {"kernel_size": 0}, "kernel_size"),
        ("cbam", {"kernel_size": -3}, "kernel_size"),
        ("cbam", {"rd_ratio": 0}, "rd_ratio"),
        ("cbam", {"spatial_bn": 1}, "spatial_bn"),
        ("cbam", {"spatial_bn_init": "official"}, "spatial_bn_init"),
        # options of the absent part are still checked
        ("cbam", {"mode": "channel", "kernel_size": 6}, "kernel_size"),
        ("cbam", {"mode": "spatial", "pool_types": "median"}, "pool_types"),
        ("eca", {"kernel_size": 4}, "kernel_size"),
        ("eca", {"kernel_size": 0}, "kernel_size"),
        ("eca", {"kernel_size": 2.5}, "kernel_size"),
        ("eca", {"gamma": 0}, "gamma"),
        ("eca", {"b": "one"}, "b"),
        ("eca", {"shared": "no"}, "shared"),
    ],
    ids=str,
)
def test_bad_argument_names_key(name, kwargs, key):
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        build_attention(name, C, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "accepted"),
    [
        ("se", {"reduction": 16}, ["rd_ratio", "pool_types", "gate", "bias", "variant"]),
        ("cbam", {"kernel": 7}, ["kernel_size", "order", "mode", "spatial_descriptor"]),
        ("eca", {"k_size": 3}, ["kernel_size", "gamma", "b", "shared"]),
    ],
)
def test_unknown_keyword_lists_accepted(name, kwargs, accepted):
    with pytest.raises(ValueError) as info:
        build_attention(name, C, **kwargs)
    message = str(info.value)
    assert next(iter(kwargs)) in message
    for key in accepted:
        assert key in message


def test_bad_choice_message_lists_accepted_values():
    with pytest.raises(ValueError) as info:
        build_attention("cbam", C, order="sideways")
    assert all(o in str(info.value) for o in ("channel_spatial", "spatial_channel", "parallel"))
    with pytest.raises(ValueError) as info:
        build_attention("se", C, gate="swish")
    assert all(g in str(info.value) for g in ("sigmoid", "tanh", "relu", "hard_sigmoid"))
