"""The params/MACs profiler: formulas, stage and attention bookkeeping, matrix products."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.profile import build_model, format_table, main, profile
from modules import build_attention, inject


class Tiny(nn.Module):
    """A ResNet-shaped toy: stem, two stages (one with an SE block), a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 1), build_attention("se", 16, rd_ratio=1 / 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.conv1(x)))
        return self.fc(self.pool(x).flatten(1))


class Attend(nn.Module):
    """Self-attention over the positions of a (B, C, H, W) map, by one of four routes."""

    def __init__(self, route):
        super().__init__()
        self.route = route

    def forward(self, x):
        q = x.flatten(2).transpose(1, 2)  # (B, N, C)
        if self.route == "sdpa_fused":  # contiguous: the CPU flash kernel
            q = q.contiguous()[:, None]
            return F.scaled_dot_product_attention(q, q, q)
        if self.route == "sdpa_math":  # strided: decomposed into bmm / softmax / bmm
            return F.scaled_dot_product_attention(q[:, None], q[:, None], q[:, None])
        if self.route == "bmm":
            return torch.bmm(torch.bmm(q, q.transpose(1, 2)).softmax(-1), q)
        return torch.einsum("bnm,bmc->bnc", torch.einsum("bnc,bmc->bnm", q, q).softmax(-1), q)


def test_conv_and_linear_macs_equal_their_formulas():
    costs = profile(Tiny(), input_size=(3, 16, 16), batch_size=2)
    stem = 8 * 16 * 16 * (3 * 3 * 3)  # out channels * positions * (in * k * k)
    layer1 = 16 * 8 * 8 * (8 * 3 * 3)
    layer2_conv = 16 * 8 * 8 * 16
    se = 16 * 4 + 4 * 16  # two 1x1 convs on the pooled vector
    head = 16 * 5
    assert costs["per_stage"]["stem"]["gmacs"] * 1e9 == pytest.approx(stem)
    assert costs["per_stage"]["layer1"]["gmacs"] * 1e9 == pytest.approx(layer1)
    assert costs["per_stage"]["layer2"]["gmacs"] * 1e9 == pytest.approx(layer2_conv + se)
    assert costs["per_stage"]["head"]["gmacs"] * 1e9 == pytest.approx(head)
    assert costs["attention"]["gmacs"] * 1e9 == pytest.approx(se)
    assert costs["gmacs"] * 1e9 == pytest.approx(stem + layer1 + layer2_conv + se + head)


class Gates(nn.Module):
    """One of each element-wise op the profiler charges, on a (4, 8, 8) map."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x).relu()  # 2 ops per element
        gate = y.mean((2, 3), keepdim=True).sigmoid()  # pool: per element; sigmoid: per channel
        y = y * gate + x  # 2 ops per element
        y = y.flatten(1).softmax(-1).view_as(x)  # 1 op per element; views are free
        return torch.cat([F.max_pool2d(y, 2), F.max_pool2d(y, 2)], 1)  # 2 pools; cat is free


def test_elementwise_count_follows_its_unit():
    costs = profile(Gates(), input_size=(4, 8, 8), batch_size=2)
    elements = 4 * 8 * 8
    assert costs["gmacs"] == 0
    assert costs["gmacs_elementwise"] * 1e9 == pytest.approx(8 * elements + 4)
    tiny = profile(Tiny(), input_size=(3, 16, 16))["per_stage"]
    extra = {k: (v["gmacs_elementwise"] - v["gmacs"]) * 1e9 for k, v in tiny.items()}
    assert extra["stem"] == 0  # a bias-free conv only
    # the ReLU; the conv's bias add is folded into the conv and counted in neither column
    assert extra["layer1"] == pytest.approx(16 * 8 * 8)
    assert extra["head"] == pytest.approx(16 * 8 * 8)  # the average pool; flatten is free


@pytest.fixture(scope="module")
def resnet18_se():
    model = build_model("resnet18", "se", cifar_stem=True, num_classes=10)
    return model, profile(model, input_size=(3, 32, 32))


def test_per_stage_sums_to_the_total(resnet18_se):
    model, costs = resnet18_se
    stages = costs["per_stage"]
    assert list(stages) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert sum(s["params"] for s in stages.values()) == costs["params"]
    assert costs["params"] == sum(p.numel() for p in model.parameters())
    for key in ("gmacs", "gmacs_elementwise"):
        assert sum(s[key] for s in stages.values()) == pytest.approx(costs[key], rel=1e-12)
        assert all(s[key] > 0 for s in stages.values())
    assert costs["gmacs_elementwise"] > costs["gmacs"]
    for part in [*stages.values(), costs["attention"]]:
        assert part["gmacs_elementwise"] >= part["gmacs"]


def test_attention_share_is_exactly_what_injection_added(resnet18_se):
    _, costs = resnet18_se
    plain = profile(build_model("resnet18", cifar_stem=True, num_classes=10), (3, 32, 32))
    attention = costs["attention"]
    assert attention["blocks"] == 8
    assert attention["params"] == costs["params"] - plain["params"] > 0
    for key in ("gmacs", "gmacs_elementwise"):
        assert attention[key] == pytest.approx(costs[key] - plain[key], rel=1e-9)
    assert plain["attention"] == {"blocks": 0, "params": 0, "gmacs": 0, "gmacs_elementwise": 0}


def test_nested_attention_blocks_count_once():
    # DANet's dual block holds two registered blocks (position and channel attention).
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 16, 3, padding=1))
    model.add_module("layer1", build_attention("danet", 16))
    costs = profile(model, input_size=(3, 8, 8))
    danet = model.layer1
    assert costs["attention"]["blocks"] == 1
    assert costs["attention"]["params"] == sum(p.numel() for p in danet.parameters())
    for key in ("gmacs", "gmacs_elementwise"):
        assert costs["attention"][key] == pytest.approx(costs["per_stage"]["layer1"][key])


@pytest.mark.parametrize("route", ["sdpa_fused", "sdpa_math", "bmm", "einsum"])
def test_attention_products_are_counted_and_quadratic_in_positions(route):
    channels = 6

    def macs(side):
        return profile(Attend(route), (channels, side, side), batch_size=2)["gmacs"] * 1e9

    for side in (4, 8):
        positions = side * side
        assert macs(side) == pytest.approx(2 * positions * positions * channels)
    assert macs(8) == pytest.approx(16 * macs(4))


def test_fused_and_math_attention_agree_on_elementwise_work():
    fused, math_path = (profile(Attend(r), (6, 8, 8)) for r in ("sdpa_fused", "sdpa_math"))
    scores = 64 * 64
    # the math path also scales q and k (2 * 64 * 6 elements); otherwise both charge softmax
    assert (fused["gmacs_elementwise"] - fused["gmacs"]) * 1e9 == pytest.approx(scores)
    extra = (math_path["gmacs_elementwise"] - math_path["gmacs"]) * 1e9
    assert extra == pytest.approx(scores + 2 * 64 * 6)


def test_timm_resnet50_matches_the_known_count():
    model = timm.models.resnet.resnet50()
    costs = profile(model)
    assert costs["params"] == 25_557_032
    assert costs["gmacs"] == pytest.approx(4.09, abs=0.01)
    assert round(costs["gmacs"], 1) == 4.1  # as timm's model card prints it


def test_agrees_with_flop_counter_mode_and_the_meta_device():
    model = timm.models.resnet.resnet18()
    costs = profile(model, input_size=(3, 64, 64), batch_size=2)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(2, 3, 64, 64))
    assert costs["gmacs"] == pytest.approx(counter.get_total_flops() / 2 / 2 / 1e9, rel=1e-12)
    with torch.device("meta"):
        meta = timm.models.resnet.resnet18()
    meta_costs = profile(meta, input_size=(3, 64, 64), batch_size=2)
    assert meta_costs == costs


def test_per_image_numbers_do_not_depend_on_batch_and_mode_is_restored():
    model = Tiny().train()
    one, three = (profile(model, (3, 16, 16), batch_size=b) for b in (1, 3))
    assert model.training
    for key in ("gmacs", "gmacs_elementwise"):
        assert one[key] == pytest.approx(three[key])
    assert model.eval() is model and profile(model, (3, 16, 16)) == one and not model.training


def test_throughput_is_optional_and_positive():
    assert "throughput" not in profile(Tiny(), (3, 16, 16))
    assert profile(Tiny(), (3, 16, 16), throughput=True)["throughput"] > 0


def test_format_table_aligns_columns():
    text = format_table(
        [{"model": "resnet18", "GMACs": "1.8141"}, {"model": "r50", "GMACs": "13.8580"}], "T"
    )
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1] == "model       GMACs"
    assert lines[3] == "resnet18   1.8141"  # numbers right-aligned, text left-aligned
    assert lines[4] == "r50       13.8580"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backbone", "resnet5"], "unknown backbone 'resnet5'"),
        (["--backbone", "resnet18", "--attention", "sse"], "Did you mean 'se'?"),
        (["--backbone", "resnet18", "--attention", "se", "--block-args", "{"], "not valid JSON"),
        (["--attention", "se"], "need --backbone"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_json_for_one_model(capsys):
    assert main(["--backbone", "resnet20_cifar", "--attention", "eca", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["input"] == 32 and out["model"]["position"] == "residual"
    assert out["attention"]["blocks"] == 9 and out["params"] > 0
    assert list(out["per_stage"]) == ["stem", "layer1", "layer2", "layer3", "head"]


@pytest.mark.parametrize("name", ["danet_position", "non_local"])
def test_position_attention_blocks_grow_with_the_square_of_positions(name):
    # MACs = a * HW (1x1 convs) + b * (HW)^2 (the attention); two sizes fix a and b, the
    # third must follow, and b must carry the growth.
    block = build_attention(name, 16)
    macs = {s: profile(block, (16, s, s))["attention"]["gmacs"] * 1e9 for s in (8, 16, 32)}
    n8, n16 = 64, 256
    b = (macs[16] - macs[8] * n16 / n8) / (n16**2 - n16 * n8)
    a = (macs[8] - b * n8**2) / n8
    assert b > 0
    assert macs[32] == pytest.approx(a * 1024 + b * 1024**2, rel=1e-9)
    assert b * 1024**2 > a * 1024  # at 32x32 the quadratic term dominates


def test_position_attention_is_counted_at_its_own_widths_not_the_padded_ones():
    # DANet's position attention: q, k are C/8 wide, v is C wide; the fused kernel pads q and
    # k to C, but the paper's products are N*N*C/8 (q k^T) + N*N*C (attention times v).
    channels, side = 64, 8
    positions = side * side
    block = build_attention("danet_position", channels)
    convs = positions * (2 * channels * channels // 8 + channels * channels)  # q, k, v
    products = positions * positions * (channels // 8 + channels)
    costs = profile(block, (channels, side, side))
    assert costs["gmacs"] * 1e9 == pytest.approx(convs + products)


# --- blocks where their papers put them (issue #11) ---------------------------------------


def gct_sites_of_official_resnet50(side=224):
    """(channels, H, W) of every GCT in z-x-yang/GCT PyTorch/resnet.py's ResNet-50 (stride
    in the 1x1 conv, STRIDE_IN_1X1=True): GCT(3) before the stem conv; in each Bottleneck
    GCT(in) before conv1, GCT(width) before conv2 and conv3, and where in != out a separate
    GCT(in) before the downsample's 1x1 conv."""
    sites = [(3, side, side)]
    inplanes, size = 64, side // 4  # after the 7x7/2 stem conv and the 3x3/2 max-pool
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        out = 4 * width
        for i in range(blocks):
            in_size, out_size = size, size // (stride if i == 0 else 1)
            sites += [(inplanes, in_size, in_size)] + [(width, out_size, out_size)] * 2
            if inplanes != out:
                sites.append((inplanes, in_size, in_size))
            inplanes, size = out, out_size
    return sites


def test_gct_official_placement_is_counted_block_by_block():
    placements = [
        {"block": "gct", "position": "stem"},
        {"block": "gct", "stages": "all", "position": "before_convs"},
    ]
    plain = build_model("resnet50", stride_in_1x1=True, device="meta")
    model = build_model("resnet50", stride_in_1x1=True, device="meta")
    inject(model, placements)
    costs, base = profile(model), profile(plain)
    sites = gct_sites_of_official_resnet50()
    assert len(sites) == 1 + 16 * 3 + 4
    attention = costs["attention"]
    # parameters: alpha, gamma, beta per channel of every GCT of the official network
    assert attention["blocks"] == len(sites)
    assert attention["params"] == 3 * sum(c for c, _, _ in sites) == 67_593
    assert costs["params"] - base["params"] == attention["params"]
    # MACs: GCT has no matrix product (0 in the papers' unit); its element-wise work is
    # ~3 ops per input element (square, sum, gating product) plus a few per channel
    assert attention["gmacs"] == 0 and costs["gmacs"] == pytest.approx(base["gmacs"])
    each = {s: profile(build_attention("gct", s[0]), s)["gmacs_elementwise"] for s in set(sites)}
    for (c, h, w), macs in each.items():
        assert 3 * c * h * w <= macs * 1e9 <= 3 * c * h * w + 20 * c
    expected = sum(each[s] for s in sites)
    assert attention["gmacs_elementwise"] == pytest.approx(expected, rel=1e-9)
    added = costs["gmacs_elementwise"] - base["gmacs_elementwise"]
    assert added == pytest.approx(expected, rel=1e-9)
    # the stem's GCT is the stem's: 9 parameters and its work on the 3x224x224 image
    stem, base_stem = costs["per_stage"]["stem"], base["per_stage"]["stem"]
    assert stem["params"] - base_stem["params"] == 9
    stem_gct = each[(3, 224, 224)]
    assert stem["gmacs_elementwise"] - base_stem["gmacs_elementwise"] == pytest.approx(stem_gct)


def test_unit_input_block_is_attributed_to_its_stage():
    placement = {"block": "non_local", "stages": [3], "blocks": "last", "position": "unit_input"}
    plain = build_model("resnet50", stride_in_1x1=True, device="meta")
    model = build_model("resnet50", stride_in_1x1=True, device="meta")
    (row,) = inject(model, [placement])
    costs, base = profile(model), profile(plain)
    assert costs["attention"]["blocks"] == 1 and costs["attention"]["params"] == row.params
    for stage, part in costs["per_stage"].items():
        before = base["per_stage"][stage]
        if stage != "layer3":
            assert part == before
            continue
        assert part["params"] - before["params"] == row.params
        for key in ("gmacs", "gmacs_elementwise"):
            assert part[key] - before[key] == pytest.approx(costs["attention"][key], rel=1e-9)


def test_non_local_pooling_before_phi_and_g_runs_them_on_a_quarter_of_the_positions():
    channels, side = 64, 14
    inner, positions, keys = channels // 2, side * side, (side // 2) ** 2
    macs = {
        order: profile(
            build_attention("non_local", channels, subsample_order=order), (channels, side, side)
        )
        for order in ("before_conv", "after_conv")
    }
    # phi and g: channels x inner 1x1 convs, over 196 positions after the conv or 49 before
    saved = 2 * channels * inner * (positions - keys)
    assert (macs["after_conv"]["gmacs"] - macs["before_conv"]["gmacs"]) * 1e9 == pytest.approx(
        saved
    )
    # theta, W_z at full size; the pairwise products over 49 keys; the same in both orders
    shared = 2 * positions * channels * inner + 2 * positions * keys * inner
    assert macs["before_conv"]["gmacs"] * 1e9 == pytest.approx(shared + 2 * keys * channels * inner)
