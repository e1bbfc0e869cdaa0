import copy
import inspect
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import modules
from modules import POSITIONS, attention_modules, block_class, inject, registry, validate_placements
from modules import inject as inject_module
from modules.backbones import build_resnet, residual_units
from modules.inject import WithAttention
from modules.registry import block_positions


class Gate(nn.Module):
    """Test block: a learnable per-channel scale, ``init`` everywhere at first."""

    def __init__(self, channels, *, init=1.0):
        super().__init__()
        if isinstance(init, bool) or not isinstance(init, (int, float)) or init < 0:
            raise ValueError(f"init must be a number >= 0, got {init!r}")
        self.weight = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class Shift(nn.Module):
    """Test block: adds a learnable per-channel offset (order matters against Gate)."""

    def __init__(self, channels, *, init=0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return x + self.bias.view(1, -1, 1, 1)


class PostOnly(Gate):
    positions = ("post", "stage_end")


class RandomMix(nn.Module):
    """Test block with a randomly initialised 1x1 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.mix(x)


TEST_BLOCKS = {
    "_test_gate": Gate,
    "_test_shift": Shift,
    "_test_post_only": PostOnly,
    "_test_random": RandomMix,
}


@pytest.fixture(autouse=True, scope="module")
def test_blocks():
    # Registered only while this file runs, so other tests never see them in available().
    for name, cls in TEST_BLOCKS.items():
        registry.register(name)(cls)
    yield
    for name in TEST_BLOCKS:
        registry._REGISTRY.pop(name)


def tiny(kind: str) -> nn.Module:
    """3 stages of 2/1/1 units; stage 1 unit 0 has no projection in the BasicBlock net and
    one (16 -> 64) in the Bottleneck net; stage 2 unit 0 downsamples in both."""
    widths = (16, 32, 64)
    return build_resnet(
        kind,
        (2, 1, 1),
        widths,
        stem_width=16,
        cifar_stem=True,
        num_classes=10,
        zero_init_last=False,
    )


def structure(model: nn.Module) -> tuple[list[str], list[str]]:
    return list(model.state_dict()), [name for name, _ in model.named_modules()]


# --- every registered block in every position, on both block types ------------------------

MATRIX_BLOCKS = sorted(set(modules.available()) | {"_test_gate"})

# Blocks one placement with stages: all puts in tiny(kind): 4 units; 3 stages; one stem;
# before_convs: 2 (basic) or 3 (bottleneck) convs per unit plus the projections (stages
# 2 and 3 of the basic net, 1-3 of the bottleneck net).
EXPECTED_SITES = {
    "stage_end": {"basic": 3, "bottleneck": 3},
    "stem": {"basic": 1, "bottleneck": 1},
    "before_convs": {"basic": 4 * 2 + 2, "bottleneck": 4 * 3 + 3},
}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("name", MATRIX_BLOCKS)
def test_every_block_in_every_position(name, kind, position):
    model = tiny(kind)
    placement = [{"block": name, "position": position}]
    if position != "stem":
        placement[0]["stages"] = "all"
    if position not in block_positions(name) or (position == "after_conv2" and kind == "basic"):
        before = structure(model)
        with pytest.raises(ValueError, match=position) as err:
            inject(model, placement)
        assert name in str(err.value) and "position" in str(err.value)
        assert structure(model) == before
        return
    if position == "stem" and name == "fca":
        # FcaNet's default 16 frequency groups need at least 16 channels, not the image's 3
        with pytest.raises(ValueError, match=r"fca, stem\): freq_sel='top16'.*3 channels"):
            inject(model, placement)
        placement[0]["args"] = {"freq_sel": "top1", "rd_ratio": 1.0}
    summary = inject(model, placement)
    assert len(summary) == EXPECTED_SITES.get(position, {}).get(kind, 4)
    assert {row.path for row in summary} == {path for path, _ in attention_modules(model)}
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    grads = []
    for row in summary:
        block = model.get_submodule(row.path)
        assert type(block) is block_class(name)
        assert row.path.startswith("conv1." if row.stage == 0 else f"layer{row.stage}.")
        params = list(block.parameters())
        assert row.params == sum(p.numel() for p in params)
        assert all(p.grad is not None for p in params), row.path
        grads += [p.grad for p in params]
    # Some sites may legitimately pass no gradient at first (a width-1 bottleneck whose ReLU
    # is off for the batch), but not every site of a placement.
    assert not grads or any(g.abs().sum() > 0 for g in grads)


# --- what each position computes ---------------------------------------------------------


def randomise_norms(model: nn.Module) -> nn.Module:
    """Eval-mode norms that are not near-identities, so where a gate sits matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def reference(unit: nn.Module, x: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unit's output with per-channel gates at the positions, written out by hand."""

    def g(position):
        return gates.get(position, 1.0)

    x = x * g("unit_input")
    shortcut = x if unit.downsample is None else unit.downsample(x)
    h = unit.act1(unit.bn1(unit.conv1(x * g("pre")))) * g("after_conv1")
    if hasattr(unit, "conv3"):
        h = unit.act2(unit.bn2(unit.conv2(h))) * g("after_conv2")
        h = unit.bn3(unit.conv3(h))
    else:
        h = unit.bn2(unit.conv2(h))
    return torch.relu(h * g("residual") + shortcut * g("identity")) * g("post")


# positions with one block per unit
UNIT_POSITIONS = [p for p in POSITIONS if p not in ("stage_end", "before_convs", "stem")]


@pytest.mark.parametrize("position", UNIT_POSITIONS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("stage, index", [(1, 0), (1, 1), (2, 0)])
def test_position_semantics(position, kind, stage, index):
    if position == "after_conv2" and kind == "basic":
        return
    model = randomise_norms(tiny(kind))
    unit = residual_units(getattr(model, f"layer{stage}"))[index]
    original = copy.deepcopy(unit)
    placement = {"block": "_test_gate", "stages": [stage], "blocks": [index], "position": position}
    (row,) = inject(model, [placement])
    gate = model.get_submodule(row.path).weight
    gate.data.uniform_(0.2, 2.0)
    x = torch.randn(2, original.conv1.in_channels, 8, 8)
    # what the stage runs for this unit: the unit, or the wrapper around it (unit_input)
    site = getattr(model, f"layer{stage}")[index]
    assert (site is unit) == (position != "unit_input")
    with torch.no_grad():
        expected = reference(original, x, {position: gate.view(1, -1, 1, 1)})
        assert torch.allclose(site(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_pre_leaves_the_shortcut_unmodified(kind):
    # A zero gate on the residual branch's input: only the (projected) shortcut remains.
    model = tiny(kind).eval()  # norms map 0 to 0 here
    inject(model, [{"block": "_test_gate", "position": "pre", "args": {"init": 0.0}}])
    for stage in ("layer1", "layer2"):
        unit = residual_units(getattr(model, stage))[0]
        x = torch.randn(2, unit.conv1.layer.in_channels, 8, 8)
        shortcut = x if unit.downsample is None else unit.downsample(x)
        with torch.no_grad():
            assert torch.allclose(unit(x), torch.relu(shortcut), atol=1e-6)


def test_identity_acts_on_the_shortcut_after_the_projection():
    model = tiny("basic").eval()
    inject(model, [{"block": "_test_gate", "position": "identity", "args": {"init": 0.0}}])
    unit = residual_units(model.layer2)[0]
    assert isinstance(unit.downsample.layer, nn.Sequential)  # the projection, kept whole
    x = torch.randn(2, 16, 8, 8)
    branch = unit.bn2(unit.conv2(unit.act1(unit.bn1(unit.conv1(x)))))
    with torch.no_grad():
        assert torch.allclose(unit(x), torch.relu(branch), atol=1e-6)
    summary_channels = {
        row.stage: row.channels
        for row in inject(tiny("basic"), [{"block": "_test_gate", "position": "identity"}])
    }
    assert summary_channels == {1: 16, 2: 32, 3: 64}


def test_stage_end_runs_once_after_the_stage():
    model = tiny("bottleneck").eval()
    stage = copy.deepcopy(model.layer2)
    summary = inject(
        model,
        [{"block": "_test_gate", "position": "stage_end", "stages": [2], "args": {"init": 0.5}}],
    )
    assert [(r.block_index, r.path, r.channels) for r in summary] == [
        (None, "layer2.attention.0", 128)
    ]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.layer2(x), 0.5 * stage(x), atol=1e-6)
    assert len(residual_units(model.layer2)) == 1
    assert modules.describe_backbone(model) == modules.describe_backbone(tiny("bottleneck"))


def test_placements_at_one_spot_compose_in_list_order():
    model = tiny("basic").eval()
    unit = residual_units(model.layer1)[0]
    original = copy.deepcopy(unit)
    spot = {"stages": [1], "blocks": "first", "position": "residual"}
    summary = inject(
        model,
        [
            {"block": "_test_gate", **spot, "args": {"init": 0.5}},
            {"block": "_test_shift", **spot, "args": {"init": 1.0}},
        ],
    )
    assert [r.path for r in summary] == ["layer1.0.se.attention.0", "layer1.0.se.attention.1"]
    # a second call appends to the same spot
    inject(model, [{"block": "_test_gate", **spot, "args": {"init": 2.0}}])
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        branch = original.bn2(original.conv2(original.act1(original.bn1(original.conv1(x)))))
        assert torch.allclose(unit(x), torch.relu((branch * 0.5 + 1.0) * 2.0 + x), atol=1e-5)


def test_channels_follow_the_position():
    rows = inject(
        tiny("bottleneck"),
        [{"block": "_test_gate", "position": p, "stages": [2]} for p in UNIT_POSITIONS],
    )
    assert {r.position: r.channels for r in rows} == {
        "residual": 128,
        "pre": 64,
        "post": 128,
        "identity": 128,
        "after_conv1": 32,
        "after_conv2": 32,
        "unit_input": 64,
    }
    pre = inject(tiny("basic"), [{"block": "_test_gate", "position": "pre", "stages": [1, 2]}])
    assert [(r.stage, r.block_index, r.channels) for r in pre] == [
        (1, 0, 16),
        (1, 1, 16),
        (2, 0, 16),
    ]


def test_stage_args_override_per_stage():
    model = tiny("basic")
    # ECA-style: the same block everywhere, another argument value in one stage
    summary = inject(
        model, [{"block": "_test_gate", "args": {"init": 0.5}, "stage_args": {3: {"init": 2.0}}}]
    )
    values = {r.path: model.get_submodule(r.path).weight.unique().tolist() for r in summary}
    assert values == {
        "layer1.0.se.attention.0": [0.5],
        "layer1.1.se.attention.0": [0.5],
        "layer2.0.se.attention.0": [0.5],
        "layer3.0.se.attention.0": [2.0],
    }


def test_block_selection():
    model = build_resnet("basic", (4, 1), (8, 16), stem_width=8, cifar_stem=True)

    def indices(blocks):
        placement = {"block": "_test_gate", "stages": [1], "blocks": blocks}
        return [row.block_index for row in inject(copy.deepcopy(model), [placement])]

    assert indices("all") == [0, 1, 2, 3]
    assert indices("first") == [0]
    assert indices("last") == [3]
    assert indices([0, -1]) == [0, 3]
    assert indices(2) == [2]
    assert indices((1, 2)) == [1, 2]


def test_omegaconf_placements_match_plain_dicts():
    plain = [
        {
            "block": "_test_gate",
            "stages": [1, 3],
            "blocks": "last",
            "position": "post",
            "args": {"init": 0.5},
            "stage_args": {3: {"init": 2.0}},
        }
    ]
    parsed = OmegaConf.create(plain)
    a, b = tiny("basic"), tiny("basic")
    assert inject(a, parsed) == inject(b, plain)
    assert torch.equal(a.layer3[0].act2.attention[0].weight, torch.full((64,), 2.0))
    assert validate_placements(parsed, "resnet18") == validate_placements(plain, "resnet18")
    # CLI overrides give string stage numbers
    assert validate_placements(
        [{"block": "_test_gate", "stages": [2], "stage_args": {"2": {"init": 3.0}}}],
        "resnet18",
    )[0]["stage_args"] == {2: {"init": 3.0}}
    assert "omegaconf" not in inspect.getsource(inject_module)


def test_validate_normalises_and_round_trips():
    normalised = validate_placements([{"block": "_test_gate"}], "resnet50")
    assert normalised == [
        {
            "block": "_test_gate",
            "stages": [1, 2, 3, 4],
            "blocks": "all",
            "position": "residual",
            "args": {},
            "stage_args": {},
        }
    ]
    assert validate_placements(normalised, "resnet50") == normalised
    assert validate_placements(None, "resnet50") == []
    assert validate_placements(
        [{"block": "_test_gate", "stages": 2, "blocks": -1}], "resnet18"
    ) == [
        {
            "block": "_test_gate",
            "stages": [2],
            "blocks": [-1],
            "position": "residual",
            "args": {},
            "stage_args": {},
        }
    ]
    # the name is read from the spec; a built model gives the same answer
    model = tiny("bottleneck")
    before = structure(model)
    placement = [{"block": "_test_gate", "position": "after_conv2"}]
    assert validate_placements(placement, model)[0]["stages"] == [1, 2, 3]
    assert structure(model) == before
    assert validate_placements(placement, "resnet50")[0]["position"] == "after_conv2"
    with pytest.raises(ValueError, match="use position 'residual'"):
        validate_placements(placement, "resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        validate_placements(placement, "resnet51")


def test_summary():
    model = tiny("bottleneck")
    baseline = sum(p.numel() for p in model.parameters())
    summary = inject(
        model,
        [{"block": "_test_gate"}, {"block": "_test_shift", "position": "stage_end", "stages": [3]}],
    )
    assert sum(p.numel() for p in model.parameters()) - baseline == summary.total_params()
    assert summary.total_params() == 64 * 2 + 128 + 256 + 256
    assert summary.params_by_stage() == {"layer1": 128, "layer2": 128, "layer3": 512}
    records = summary.to_dicts()
    assert json.loads(json.dumps(records)) == records
    assert records[-1] == {
        "placement": 1,
        "block": "_test_shift",
        "stage": 3,
        "block_index": None,
        "position": "stage_end",
        "channels": 256,
        "params": 256,
        "path": "layer3.attention.0",
    }
    table = summary.table().splitlines()
    assert " ".join(table[0].split()) == "# block stage units position channels params n total"
    assert " ".join(table[1].split()) == "0 _test_gate layer1 0-1 residual 64 64 2 128"
    assert table[-2].split()[2:4] == ["layer3", "end"]
    assert table[-1] == "attention parameters: 768 in 5 blocks"


def test_injected_blocks_follow_the_models_mode_and_dtype():
    model = tiny("basic").eval().double()
    summary = inject(model, [{"block": "_test_gate"}])
    block = model.get_submodule(summary[0].path)
    assert not block.training and block.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64


def test_wrapped_modules_keep_the_original():
    model = tiny("basic")
    conv = model.layer1[0].conv1
    inject(model, [{"block": "_test_gate", "position": "pre", "stages": [1], "blocks": [0]}])
    wrapper = model.layer1[0].conv1
    assert isinstance(wrapper, WithAttention) and wrapper.layer is conv and wrapper.before
    assert "layer1.0.conv1.layer.weight" in model.state_dict()


# --- unit_input, before_convs, stem (issue #11: blocks where their papers put them) -------


def set_gates(model, summary, low=0.2, high=2.0):
    """Random per-channel values for every injected _test_gate; {path: (1, C, 1, 1)}."""
    gates = {}
    for row in summary:
        weight = model.get_submodule(row.path).weight
        weight.data.uniform_(low, high)
        gates[row.path] = weight.view(1, -1, 1, 1)
    return gates


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_unit_input_feeds_the_shortcut_unlike_pre(kind):
    # A zero gate: at pre only the shortcut of x remains; at unit_input the unit sees 0.
    for position in ("pre", "unit_input"):
        model = randomise_norms(tiny(kind))
        original = copy.deepcopy(residual_units(model.layer2)[0])
        placement = {"block": "_test_gate", "position": position, "args": {"init": 0.0}}
        (row,) = inject(model, [{**placement, "stages": [2], "blocks": "first"}])
        x = torch.randn(2, 16 if kind == "basic" else 64, 8, 8)
        with torch.no_grad():
            out = model.layer2(x)
            zero = torch.zeros_like(x)
            if position == "pre":
                branch = original(zero) - torch.relu(original.downsample(zero))
                assert (
                    not torch.allclose(out, original(zero), atol=1e-3) and branch.abs().amax() > 0
                )
            else:
                assert row.path == "layer2.0.attention.0"
                torch.testing.assert_close(out, original(zero))


def test_unit_input_wraps_the_unit_and_later_placements_still_find_it():
    model = tiny("bottleneck")
    unit = model.layer1[1]
    spec = modules.describe_backbone(model)
    here = {"block": "_test_gate", "stages": [1], "blocks": [1]}
    first = inject(model, [{**here, "position": "unit_input"}])
    wrapper = model.layer1[1]
    assert isinstance(wrapper, WithAttention) and wrapper.layer is unit and wrapper.before
    assert residual_units(model.layer1)[1] is unit
    assert modules.describe_backbone(model) == spec
    assert "layer1.1.layer.conv1.weight" in model.state_dict()
    # a block inside the wrapped unit, and a second block at its input, in list order
    rows = inject(
        model,
        [
            {**here, "position": "residual"},
            {**here, "block": "_test_shift", "position": "unit_input"},
        ],
    )
    paths = [r.path for r in [*first, *rows]]
    assert paths == [
        "layer1.1.attention.0",
        "layer1.1.layer.se.attention.0",
        "layer1.1.attention.1",
    ]
    assert {path for path, _ in attention_modules(model)} == set(paths)
    # and the stage still runs: x -> gate -> shift -> unit (with its residual gate)
    x = torch.randn(2, 16, 8, 8)
    assert model.layer1(x).shape == (2, 64, 8, 8)


@pytest.mark.parametrize("name", ["non_local", "danet", "danet_position", "danet_channel"])
def test_blocks_between_units_refuse_pre_and_take_unit_input(name):
    model = tiny("bottleneck")
    with pytest.raises(ValueError) as err:
        inject(model, [{"block": name, "stages": [3], "position": "pre"}])
    message = str(err.value)
    assert f"block {name!r} cannot be placed at position 'pre'" in message
    assert "it allows unit_input, post, stage_end" in message
    assert "the shortcut skips the block" in message and "\n" not in message
    assert not attention_modules(model)
    placement = {"block": name, "stages": [3], "blocks": "last", "position": "unit_input"}
    (row,) = inject(model, [placement])
    assert (row.path, row.channels) == ("layer3.0.attention.0", 128)


def test_non_local_before_the_last_unit_of_res4():
    # The paper's default 2D model: one non-local block right before the last residual
    # unit of res4 (official res_stage_nonlocal adds it after unit idx, i.e. before idx + 1).
    model = modules.build_backbone("resnet50", num_classes=10).eval()
    stage = copy.deepcopy(model.layer3)
    placement = {"block": "non_local", "stages": [3], "blocks": "last", "position": "unit_input"}
    (row,) = inject(model, [placement])
    assert (row.stage, row.block_index, row.channels) == (3, 5, 1024)
    assert row.path == "layer3.5.attention.0"
    block = model.get_submodule(row.path)
    with torch.no_grad():
        block.out[1].weight.normal_()  # leave the identity
    x = torch.randn(1, 512, 8, 8)
    with torch.no_grad():
        expected = stage[5](block(stage[:5](x)))
        torch.testing.assert_close(model.layer3(x), expected)
    c, inner = 1024, 512
    # theta (with bias), phi and g (biases cancelled by the softmax), W_z, BN
    assert row.params == 3 * c * inner + inner + inner * c + 2 * c


def gated_unit(unit, x, gates):
    """A timm unit with a per-channel gate before each named convolution, by hand."""

    def g(conv):
        return gates.get(conv, 1.0)

    shortcut = x
    if unit.downsample is not None:
        conv, norm = unit.downsample
        shortcut = norm(conv(x * g("downsample")))
    h = unit.act1(unit.bn1(unit.conv1(x * g("conv1"))))
    if hasattr(unit, "conv3"):
        h = unit.act2(unit.bn2(unit.conv2(h * g("conv2"))))
        h = unit.bn3(unit.conv3(h * g("conv3")))
    else:
        h = unit.bn2(unit.conv2(h * g("conv2")))
    return torch.relu(h + shortcut)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_before_convs_puts_one_block_before_every_convolution(kind):
    # GCT's official placement: GCT(c) before conv1, conv2, conv3 and, a separate one,
    # before the projection conv of the downsample (z-x-yang/GCT, PyTorch/resnet.py).
    model = randomise_norms(tiny(kind))
    original = copy.deepcopy(residual_units(model.layer2)[0])
    rows = inject(model, [{"block": "_test_gate", "stages": [2], "position": "before_convs"}])
    convs = ["conv1", "conv2", "conv3"][: 3 if kind == "bottleneck" else 2]
    assert [r.path for r in rows] == [
        *(f"layer2.0.{c}.attention.0" for c in convs),
        "layer2.0.downsample.0.attention.0",
    ]
    in_channels = 16 if kind == "basic" else 64
    assert [r.channels for r in rows] == [in_channels, *[32] * (len(convs) - 1), in_channels]
    gates = set_gates(model, rows)
    by_conv = {path.split(".")[2]: gate for path, gate in gates.items()}
    x = torch.randn(2, in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.layer2(x), gated_unit(original, x, by_conv))


@pytest.mark.parametrize("first", ["identity", "before_convs"])
def test_before_convs_and_identity_compose_on_the_projection(first):
    # Either order: identity wraps the whole downsample, the projection's block sits inside
    # it, and the summary's paths are the final ones even when identity comes second.
    model = randomise_norms(tiny("basic"))
    original = copy.deepcopy(residual_units(model.layer2)[0])
    order = [first, "before_convs" if first == "identity" else "identity"]
    rows = inject(model, [{"block": "_test_gate", "stages": [2], "position": p} for p in order])
    assert {r.path for r in rows} == {
        "layer2.0.conv1.attention.0",
        "layer2.0.conv2.attention.0",
        "layer2.0.downsample.layer.0.attention.0",
        "layer2.0.downsample.attention.0",
    }
    gates = set_gates(model, rows)
    by_conv = {c: gates[f"layer2.0.{c}.attention.0"] for c in ("conv1", "conv2")}
    projection = gates["layer2.0.downsample.layer.0.attention.0"]
    identity = gates["layer2.0.downsample.attention.0"]
    x = torch.randn(2, 16, 8, 8)
    conv, norm = original.downsample
    with torch.no_grad():
        h = original.act1(original.bn1(original.conv1(x * by_conv["conv1"])))
        h = original.bn2(original.conv2(h * by_conv["conv2"]))
        expected = torch.relu(h + norm(conv(x * projection)) * identity)
        torch.testing.assert_close(model.layer2(x), expected)


def test_stem_block_runs_before_the_first_convolution():
    model = tiny("bottleneck").eval()
    conv = model.conv1
    spec = modules.describe_backbone(model)
    summary = inject(model, [{"block": "_test_gate", "position": "stem"}])
    (row,) = summary
    assert (row.stage, row.block_index, row.channels) == (0, None, 3)
    assert row.path == "conv1.attention.0"
    assert isinstance(model.conv1, WithAttention) and model.conv1.layer is conv
    assert modules.describe_backbone(model) == spec
    gate = set_gates(model, summary)[row.path]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.conv1(x), conv(x * gate))
    assert summary.params_by_stage() == {"stem": 3}
    assert summary.table().splitlines()[1].split()[1:5] == ["_test_gate", "stem", "-", "stem"]
    # the normalised form (stages: []) round-trips
    normalised = validate_placements([{"block": "_test_gate", "position": "stem"}], "resnet50")
    assert normalised[0]["stages"] == [] and normalised[0]["stage_args"] == {}
    assert validate_placements(normalised, "resnet50") == normalised


def test_gct_official_placement_summary_names_each_convolution():
    model = tiny("bottleneck")
    summary = inject(
        model,
        [
            {"block": "gct", "position": "stem"},
            {"block": "gct", "stages": "all", "position": "before_convs"},
        ],
    )
    lines = [" ".join(line.split()) for line in summary.table().splitlines()]
    assert lines[1] == "0 gct stem - stem 3 9 1 9"
    assert "1 gct layer1 0-1 before_convs:conv2 16 48 2 96" in lines
    assert "1 gct layer1 0 before_convs:downsample 16 48 1 48" in lines
    assert "1 gct layer3 0 before_convs:conv3 64 192 1 192" in lines
    assert summary.params_by_stage()["stem"] == 9


# --- bad configurations: a ValueError naming the problem, and the model untouched --------

GOOD = {"block": "_test_gate", "stages": [1, 2]}

# Each bad placement goes second, after a valid one: neither may be applied.
BAD = [
    (
        {"block": "_test_gate", "stage": [1]},
        (
            r"attention\[1\]: unknown key 'stage' \(did you mean 'stages'\?\); "
            r"accepted: block, stages"
        ),
    ),
    ({"stages": [1]}, r"attention\[1\]: 'block' is required"),
    ({"block": "_test_gat"}, r"unknown attention block '_test_gat'.*Did you mean '_test_gate'"),
    ({"block": ["se"]}, r"block must be a name"),
    ({**GOOD, "args": {"int": 1}}, r"unknown argument\(s\) \['int'\]; accepted: init"),
    ({**GOOD, "stage_args": {2: {"size": 1}}}, r"unknown argument\(s\) \['size'\]"),
    (
        {**GOOD, "stages": [4]},
        (
            r"stage 4 is out of range; use 'all', 'all_but_last', or stage numbers 1..3 "
            r"\(negatives count from the end: -1 is the last; ResNetBackbone has 3 stages\)"
        ),
    ),
    ({**GOOD, "stages": [0]}, r"stage 0 is out of range"),
    ({**GOOD, "stages": [-4]}, r"stage -4 is out of range"),
    ({**GOOD, "stages": [3, -1]}, r"names a stage twice"),
    ({**GOOD, "stages": ["two"]}, r"stage 'two' is out of range"),
    ({**GOOD, "stages": []}, r"stages=\[\] is not accepted"),
    ({**GOOD, "stages": "some"}, r"stages='some' is not accepted"),
    ({**GOOD, "stages": [1, 1]}, r"names a stage twice"),
    (
        {**GOOD, "blocks": [1]},
        (
            r"attention\[1\] \(_test_gate, stage 2\): "
            r"block index 1 is out of range for stage 2, which has 1 blocks"
        ),
    ),
    ({**GOOD, "stages": [1], "blocks": [-3]}, r"block index -3 is out of range"),
    ({**GOOD, "stages": [1], "blocks": [0, -2]}, r"names a block of stage 1 twice"),
    ({**GOOD, "blocks": "middle"}, r"blocks='middle' is not accepted; use 'all', 'first', 'last'"),
    ({**GOOD, "blocks": [0.5]}, r"blocks=\[0.5\] is not accepted"),
    (
        {**GOOD, "position": "pree"},
        (
            r"position='pree' is not accepted \(did you mean 'pre'\?\); "
            r"choose one of residual, pre, post"
        ),
    ),
    (
        {**GOOD, "position": "after_conv2"},
        (
            r"stage 1\): position 'after_conv2' needs a Bottleneck.*"
            r"use position 'residual'"
        ),
    ),
    ({**GOOD, "position": "stage_end", "blocks": "first"}, r"blocks must be 'all', got 'first'"),
    (
        {**GOOD, "stage_args": {3: {"init": 1.0}}},
        (
            r"stage_args has stage 3, which is not among its stages "
            r"\[1, 2\]"
        ),
    ),
    ({**GOOD, "stage_args": {2: 1.0}}, r"stage_args\[2\] must be a mapping"),
    ({**GOOD, "args": [1]}, r"args must be a mapping"),
    (
        {"block": "_test_post_only"},
        (
            r"block '_test_post_only' cannot be placed at position 'residual'; "
            r"it allows post, stage_end"
        ),
    ),
    (
        {**GOOD, "args": {"init": -1}},
        (
            r"^attention\[1\] \(_test_gate, stage 1\): "
            r"init must be a number >= 0, got -1$"
        ),
    ),
    (
        {**GOOD, "stage_args": {2: {"init": "big"}}},
        (
            r"^attention\[1\] \(_test_gate, stage 2\): "
            r"init must be a number >= 0, got 'big'$"
        ),
    ),
    ("se", r"attention\[1\]: a placement must be a mapping"),
    (
        {"block": "_test_gate", "position": "stem", "stages": [1]},
        (
            r"attention\[1\] \(_test_gate\): position 'stem' places one block before the "
            r"stem's first convolution, outside the stages; leave out 'stages' "
            r"\(got stages=\[1\]\)$"
        ),
    ),
    ({"block": "_test_gate", "position": "stem", "blocks": "first"}, r"leave out 'blocks'"),
    (
        {"block": "_test_gate", "position": "stem", "stage_args": {1: {"init": 2.0}}},
        r"leave out 'stage_args'",
    ),
    (
        {"block": "_test_gate", "position": "stem", "args": {"init": -1}},
        r"^attention\[1\] \(_test_gate, stem\): init must be a number >= 0, got -1$",
    ),
    ({"block": "_test_gate", "position": "stem", "args": {"nit": 1}}, r"unknown argument"),
]


@pytest.mark.parametrize("placement, match", BAD)
def test_bad_placements_are_refused_before_the_model_changes(placement, match):
    model = tiny("basic")
    before = structure(model)
    with pytest.raises(ValueError, match=match):
        inject(model, [GOOD, placement])
    assert structure(model) == before
    assert not attention_modules(model)


def test_placements_must_be_a_list():
    with pytest.raises(ValueError, match="attention must be a list of placements"):
        inject(tiny("basic"), "se")
    with pytest.raises(ValueError, match="backbone must be a backbone name"):
        validate_placements([GOOD], 50)


def test_validation_does_not_shift_the_random_stream():
    model = tiny("basic")
    torch.manual_seed(3)
    rows = inject(model, [{"block": "_test_random", "stages": [1, 2], "blocks": "first"}])
    torch.manual_seed(3)
    expected = [RandomMix(16), RandomMix(32)]
    for row, block in zip(rows, expected, strict=True):
        assert torch.equal(model.get_submodule(row.path).mix.weight, block.mix.weight)


def test_stages_count_from_the_end_and_all_but_last():
    # One placement reads the same on a 4-stage ImageNet and a 3-stage CIFAR ResNet.
    last_three = {"block": "se", "stages": [-3, -2, -1]}
    assert validate_placements([last_three], "resnet50")[0]["stages"] == [2, 3, 4]
    assert validate_placements([last_three], "resnet20_cifar")[0]["stages"] == [1, 2, 3]
    but_last = {"block": "se", "stages": "all_but_last", "position": "stage_end"}
    assert validate_placements([but_last], "resnet50")[0]["stages"] == [1, 2, 3]
    assert validate_placements([but_last], "resnet20_cifar")[0]["stages"] == [1, 2]
