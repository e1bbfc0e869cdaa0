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


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("name", MATRIX_BLOCKS)
def test_every_block_in_every_position(name, kind, position):
    model = tiny(kind)
    placement = [{"block": name, "stages": "all", "position": position}]
    if position not in block_positions(name) or (position == "after_conv2" and kind == "basic"):
        before = structure(model)
        with pytest.raises(ValueError, match=position) as err:
            inject(model, placement)
        assert name in str(err.value) and "position" in str(err.value)
        assert structure(model) == before
        return
    summary = inject(model, placement)
    assert len(summary) == (3 if position == "stage_end" else 4)
    assert {row.path for row in summary} == {path for path, _ in attention_modules(model)}
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    grads = []
    for row in summary:
        block = model.get_submodule(row.path)
        assert type(block) is block_class(name)
        assert row.path.startswith(f"layer{row.stage}.")
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

    shortcut = x if unit.downsample is None else unit.downsample(x)
    h = unit.act1(unit.bn1(unit.conv1(x * g("pre")))) * g("after_conv1")
    if hasattr(unit, "conv3"):
        h = unit.act2(unit.bn2(unit.conv2(h))) * g("after_conv2")
        h = unit.bn3(unit.conv3(h))
    else:
        h = unit.bn2(unit.conv2(h))
    return torch.relu(h * g("residual") + shortcut * g("identity")) * g("post")


UNIT_POSITIONS = [p for p in POSITIONS if p != "stage_end"]


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
    with torch.no_grad():
        expected = reference(original, x, {position: gate.view(1, -1, 1, 1)})
        assert torch.allclose(unit(x), expected, atol=1e-5)


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
            r"stage 4 is out of range; use 'all', or 1-based stage numbers 1..3 "
            r"\(ResNetBackbone has 3 stages\)"
        ),
    ),
    ({**GOOD, "stages": [0]}, r"stage 0 is out of range"),
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
