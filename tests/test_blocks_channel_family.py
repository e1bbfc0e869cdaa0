"""GSoP, bilinear, SRM, GCT, FcaNet, EncNet and ParseNet blocks: shapes, gradients, and the
properties each paper's formulation promises."""

import math

import pytest
import torch
import torch.nn.functional as F

from modules import available, build_attention
from modules.context_encoding import Encoding
from modules.frequency_channel import (
    FREQ_SELECTIONS,
    FREQ_TABLES,
    dct_filters,
    frequency_indices,
)
from modules.second_order import covariance_pool, gram_pool

# Every block with each of its options, built at 32 channels.
CASES = [
    ("gsop", {}),
    ("gsop", {"reduced_channels": 8}),
    ("gsop", {"rd_ratio": 1 / 4, "row_multiplier": 2}),
    ("gsop", {"input_relu": False, "reduce_stride": 2}),
    ("bilinear", {}),
    ("bilinear", {"reduced_channels": 8, "signed_sqrt": False}),
    ("bilinear", {"rd_ratio": 1 / 8}),
    ("srm", {}),
    ("srm", {"style": ("mean",)}),
    ("srm", {"style": "std"}),
    ("srm", {"unbiased_std": False}),
    ("gct", {}),
    ("gct", {"mode": "l1"}),
    ("fca", {}),
    ("fca", {"freq_sel": "low4", "rd_ratio": 1 / 8}),
    ("fca", {"freq_sel": "bot32", "rd_channels": 4}),
    ("fca", {"freq_sel": "top1", "rd_divisor": 8, "bias": True}),
    ("enc", {}),
    ("enc", {"num_codes": 8, "rd_ratio": 1 / 4}),
    ("enc", {"aggregate": "concat", "num_codes": 16, "rd_ratio": 1 / 4}),
    ("enc", {"projection": False, "num_codes": 4}),
    ("parsenet", {}),
    ("parsenet", {"fusion": "add", "scale_init": 20.0}),
]
CASE_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CASES
]
NAMES = ("gsop", "bilinear", "srm", "gct", "fca", "enc", "parsenet")


# Parameters whose gradient is exactly zero at initialisation by design (checked after one
# step in test_zero_initialised_parameters_learn_after_one_step): GCT's alpha only matters
# once gamma leaves 0; SRM's zero CFC makes the BN input 0, so the BN weight multiplies 0.
ZERO_GRADIENT_AT_INIT = {"gct": {"alpha"}, "srm": {"bn.weight"}}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_all_registered():
    assert set(NAMES) <= set(available())


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("size", [(7, 7), (16, 16), (5, 9)])
def test_shape_preserved_train_and_eval(name, kwargs, size):
    block = build_attention(name, 32, **kwargs)
    x = torch.randn(2, 32, *size)
    assert block(x).shape == x.shape
    block.eval()
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_gradients_reach_every_parameter(name, kwargs):
    block = build_attention(name, 32, **kwargs)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    (block(x) * torch.randn(2, 32, 8, 8)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    exempt = ZERO_GRADIENT_AT_INIT.get(name, set())
    for pname, p in block.named_parameters():
        if pname in exempt:
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_no_weight_decay_names_are_parameters(name, kwargs):
    block = build_attention(name, 32, **kwargs)
    names = dict(block.named_parameters())
    assert set(getattr(block, "no_weight_decay", set)()) <= set(names)


# --- GSoP and bilinear -------------------------------------------------------------------


def test_covariance_pool_is_the_biased_covariance():
    z = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    cov = covariance_pool(z)
    assert torch.allclose(cov, cov.transpose(1, 2))
    for b in range(3):
        assert torch.allclose(cov[b], torch.cov(z[b].flatten(1), correction=0))
    # Positive semi-definite, and blind to a per-channel offset (it is centred).
    assert torch.linalg.eigvalsh(cov).min() > -1e-10
    assert torch.allclose(covariance_pool(z + torch.randn(3, 5, 1, 1, dtype=z.dtype)), cov)


def test_gram_pool_is_uncentred():
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    gram = gram_pool(z)
    assert torch.allclose(gram, gram.transpose(1, 2))
    flat = z.flatten(2)
    assert torch.allclose(gram[1], flat[1] @ flat[1].t() / 9)
    assert not torch.allclose(gram_pool(z + 1), gram)


@pytest.mark.parametrize(
    ("channels", "kwargs", "width"),
    [
        (32, {}, 32),  # c' = 128 is capped at C
        (256, {}, 128),
        (64, {"reduced_channels": 16}, 16),
        (64, {"rd_ratio": 1 / 8}, 8),
    ],
)
def test_gsop_parameter_count(channels, kwargs, width):
    block = build_attention("gsop", channels, **kwargs)
    m = 4
    expected = (
        channels * width
        + width  # 1x1 reduction with bias
        + 2 * width  # BN after the reduction
        + 2 * width  # BN over the covariance rows
        + m * width * width
        + m * width  # row-wise (grouped) conv
        + m * width * channels
        + channels  # 1x1 conv to C
    )
    assert block.reduced_channels == width
    assert n_params(block) == expected


def test_gsop_row_conv_sees_each_row_alone():
    # Changing one covariance row may only change that row's row_multiplier outputs.
    block = build_attention("gsop", 16, reduced_channels=4).eval()
    rows = torch.randn(1, 4, 4, 1)
    base = block.row_conv(rows)
    rows[0, 2] += 1.0
    changed = (block.row_conv(rows) - base).flatten().abs() > 0
    assert changed.tolist() == [i // 4 == 2 for i in range(16)]


@pytest.mark.parametrize(("channels", "width"), [(32, 16), (8, 8)])
def test_bilinear_parameter_count(channels, width):
    block = build_attention("bilinear", channels)
    features = width * (width + 1) // 2
    expected = channels * width + 2 * width + features * channels + channels
    assert n_params(block) == expected


def test_bilinear_feature_is_unit_norm_signed_sqrt_of_gram():
    block = build_attention("bilinear", 8, reduced_channels=3).eval()
    x = torch.randn(2, 8, 5, 5)
    captured = {}

    def keep_input(module, args, out):
        captured["v"] = args[0]

    block.fc.register_forward_hook(keep_input)
    block(x)
    gram = gram_pool(block.reduce(x))
    rows, cols = torch.triu_indices(3, 3)
    v = gram[:, rows, cols]
    expected = F.normalize(torch.sign(v) * torch.sqrt(v.abs() + 1e-5), dim=1)
    assert torch.allclose(captured["v"], expected, atol=1e-6)
    assert torch.allclose(captured["v"].norm(dim=1), torch.ones(2))


# --- SRM ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "per_channel"), [(("mean", "std"), 4), (("mean",), 3), ("std", 3)]
)
def test_srm_parameter_count(style, per_channel):
    # CFC: one weight per channel and statistic; BN: 2 per channel.
    assert n_params(build_attention("srm", 24, style=style)) == per_channel * 24


@pytest.mark.parametrize("unbiased", [True, False])
def test_srm_gate_formula(unbiased):
    block = build_attention("srm", 6, unbiased_std=unbiased).eval()
    with torch.no_grad():
        block.cfc.copy_(torch.randn(6, 2))
    x = torch.randn(2, 6, 7, 7)
    mean = x.mean(dim=(2, 3))
    # the paper's Eq. 1 divides by HW; the official code's torch.std by HW - 1
    std = (x - mean[..., None, None]).pow(2).sum(dim=(2, 3)).div(49 - unbiased).sqrt()
    z = block.cfc[:, 0] * mean + block.cfc[:, 1] * std
    gate = torch.sigmoid(z / math.sqrt(1 + block.bn.eps))  # BN at its initial running stats
    assert torch.allclose(block(x), x * gate[..., None, None], atol=1e-6)


def official_srm(x, block):
    """SRMLayer of hyunjaelee410/style-based-recalibration-module
    (models/recalibration_modules.py) from our weights: mean and torch.std (unbiased) over
    positions, channel-wise weighted sum by the (C, 2) CFC, BatchNorm, sigmoid, x * g."""
    n, c = x.shape[:2]
    flat = x.view(n, c, -1)
    t = torch.cat((flat.mean(dim=2).view(n, c, -1), flat.std(dim=2).view(n, c, -1)), dim=2)
    z = (t * block.cfc[None, :, :]).sum(dim=2)[:, :, None, None]
    bn = block.bn
    z_hat = F.batch_norm(
        z,
        bn.running_mean.clone(),
        bn.running_var.clone(),
        bn.weight,
        bn.bias,
        training=block.training,
        eps=bn.eps,
    )
    return x * torch.sigmoid(z_hat)


def test_srm_follows_the_official_unbiased_style_pooling():
    block = build_attention("srm", 6)
    with torch.no_grad():
        block.cfc.copy_(torch.randn(6, 2))
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 6, 5, 5)
    for mode in ("train", "eval"):
        getattr(block, mode)()
        torch.testing.assert_close(block(x), official_srm(x, block))
    paper = build_attention("srm", 6, unbiased_std=False)
    paper.load_state_dict(block.state_dict())
    assert not torch.allclose(paper.eval()(x), block(x))
    # one position: the official torch.std gives NaN; the deviation is 0 here
    one = torch.randn(4, 6, 1, 1)
    assert torch.isfinite(block(one)).all()


def test_srm_starts_at_half_gate_and_excludes_its_parameters_from_decay():
    block = build_attention("srm", 8)
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(block(x), 0.5 * x)
    assert block.no_weight_decay() == {"cfc", "bn.weight", "bn.bias"}


# --- GCT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["l2", "l1"])
def test_gct_is_identity_at_init(mode):
    block = build_attention("gct", 16, mode=mode)
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(block(x), x)
    assert block.no_weight_decay() == {"beta"}
    assert {"beta"} <= dict(block.named_parameters()).keys()


@pytest.mark.parametrize(("mode", "norm", "target"), [("l2", 2, math.sqrt(16)), ("l1", 1, 16.0)])
def test_gct_channel_normalisation(mode, norm, target):
    # With gamma = 1 and beta = 0 the gate is 1 + tanh(s_hat): recover s_hat and check
    # ||s_hat||_2 = sqrt(C) (l2) or ||s_hat||_1 = C (l1).
    block = build_attention("gct", 16, mode=mode, eps=1e-12).double()
    with torch.no_grad():
        block.gamma.fill_(1.0)
        block.alpha.copy_(torch.rand(1, 16, 1, 1) + 0.5)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    s_hat = torch.atanh(block(x) / x - 1)[:, :, 0, 0]
    assert torch.allclose(s_hat.norm(p=norm, dim=1), torch.full((2,), target, dtype=x.dtype))


@pytest.mark.parametrize("name", sorted(ZERO_GRADIENT_AT_INIT))
def test_zero_initialised_parameters_learn_after_one_step(name):
    block = build_attention(name, 16)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    x = torch.randn(2, 16, 8, 8)
    target = torch.randn(2, 16, 8, 8)
    for _ in range(2):
        opt.zero_grad()
        (block(x) * target).sum().backward()
        opt.step()
    grads = dict(block.named_parameters())
    for pname in ZERO_GRADIENT_AT_INIT[name]:
        assert grads[pname].grad.abs().sum() > 0, pname


# --- FcaNet ------------------------------------------------------------------------------


def test_fca_frequency_tables():
    assert len(FREQ_SELECTIONS) == 18
    for kind, (first, second) in FREQ_TABLES.items():
        assert len(first) == len(second) == 32, kind
        pairs = list(zip(first, second, strict=True))
        assert len(set(pairs)) == 32, kind  # no frequency twice
        assert all(0 <= u < 7 and 0 <= v < 7 for u, v in pairs), kind
    for sel in FREQ_SELECTIONS:
        assert len(frequency_indices(sel)) == int(sel[3:])
    assert frequency_indices("top1") == frequency_indices("low1") == [(0, 0)]
    assert frequency_indices("bot1") == [(6, 6)]
    assert frequency_indices("low4") == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (14, 14), (5, 9)])
@pytest.mark.parametrize("sel", ["low1", "top1"])
def test_fca_lowest_frequency_is_average_pooling(size, sel):
    block = build_attention("fca", 16, freq_sel=sel)
    x = torch.randn(2, 16, *size)
    avg = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(block.pool(x), avg * math.sqrt(size[0] * size[1]), atol=1e-5)


@pytest.mark.parametrize("size", [7, 8, 14])
def test_fca_filters_are_orthonormal(size):
    filters = dct_filters(size, size, frequency_indices("top16")).flatten(1)
    assert torch.allclose(filters @ filters.t(), torch.eye(16, dtype=filters.dtype), atol=1e-12)


def test_fca_filters_scale_like_the_official_grid():
    # On a 14x14 map, 7x7-grid frequency (u, v) is (2u, 2v), as in the official code.
    def official(pos, freq, size):
        value = math.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
        return value if freq == 0 else value * math.sqrt(2)

    freqs = frequency_indices("top4")
    filters = dct_filters(14, 14, freqs)
    for i, (u, v) in enumerate(freqs):
        for h, w in [(0, 0), (3, 11), (13, 6)]:
            expected = official(h, 2 * u, 14) * official(w, 2 * v, 14)
            assert filters[i, h, w].item() == pytest.approx(expected, abs=1e-12)


def test_fca_groups_channels_near_equally_and_caches_filters():
    block = build_attention("fca", 24, freq_sel="top16")
    counts = torch.bincount(block.channel_group, minlength=16)
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    assert torch.equal(block.channel_group, block.channel_group.sort().values)  # contiguous
    divisible = build_attention("fca", 32, freq_sel="top16")
    assert torch.equal(divisible.channel_group, torch.arange(32) // 2)
    block(torch.randn(2, 24, 8, 8))
    block(torch.randn(2, 24, 8, 8))
    block(torch.randn(2, 24, 5, 9))
    assert len(block._filters) == 2


def test_fca_parameter_count():
    # SE's MLP without biases: 2 * C * C // 16.
    assert n_params(build_attention("fca", 64)) == 2 * 64 * 4
    assert n_params(build_attention("fca", 64, rd_ratio=1 / 4)) == 2 * 64 * 16
    assert n_params(build_attention("fca", 64, bias=True)) == 2 * 64 * 4 + 4 + 64


# --- EncNet ------------------------------------------------------------------------------


def test_encoding_matches_naive_residual_computation():
    layer = Encoding(dim=3, num_codes=4).double()
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    feats = x.flatten(2).transpose(1, 2)  # (B, N, D)
    residuals = feats[:, :, None, :] - layer.codewords[None, None]  # (B, N, K, D)
    assign = F.softmax(layer.scale * residuals.pow(2).sum(-1), dim=2)  # (B, N, K)
    expected = (assign[..., None] * residuals).sum(dim=1)  # (B, K, D)
    assert torch.allclose(layer(x), expected, atol=1e-12)


def test_encoding_initialisation_follows_official_code():
    layer = Encoding(dim=8, num_codes=32)
    bound = 1 / math.sqrt(32 * 8)
    assert layer.codewords.abs().max() <= bound
    assert (layer.scale < 0).all() and (layer.scale > -1).all()


@pytest.mark.parametrize(
    ("kwargs", "width", "aggregate"),
    [
        ({}, 32, "mean"),
        ({"rd_ratio": 1 / 4, "num_codes": 16}, 8, "mean"),
        ({"rd_ratio": 1 / 4, "num_codes": 16, "aggregate": "concat"}, 8, "concat"),
        ({"projection": False, "num_codes": 8}, 32, "mean"),
    ],
)
def test_enc_parameter_count(kwargs, width, aggregate):
    channels, k = 32, kwargs.get("num_codes", 32)
    block = build_attention("enc", channels, **kwargs)
    projection = channels * width + 2 * width if kwargs.get("projection", True) else 0
    encoding = k * width + k
    head = (
        2 * k + width * channels + channels
        if aggregate == "mean"
        else k * width * channels + channels
    )
    assert n_params(block) == projection + encoding + head


# --- ParseNet ----------------------------------------------------------------------------


def test_parsenet_concat_equals_conv_of_concatenation():
    block = build_attention("parsenet", 8).eval()
    x = torch.randn(2, 8, 6, 5)
    local = F.normalize(x, dim=1) * 10
    context = F.normalize(x.mean(dim=(2, 3), keepdim=True), dim=1) * 10
    cat = torch.cat([local, context.expand_as(local)], dim=1)
    assert torch.allclose(block(x), block.fuse(cat), atol=1e-5)
    assert n_params(block) == 2 * 8 + 2 * 8 * 8 + 8


def test_parsenet_add_normalises_local_features_per_position():
    block = build_attention("parsenet", 8, fusion="add")
    with torch.no_grad():
        block.context_scale.zero_()
    x = torch.randn(2, 8, 4, 4) * torch.rand(2, 1, 4, 4) * 100
    assert torch.allclose(block(x).norm(dim=1), torch.full((2, 4, 4), 10.0), atol=1e-4)
    # All-zero positions (after a ReLU, say) stay finite.
    assert torch.isfinite(block(torch.zeros(1, 8, 3, 3))).all()
    assert n_params(block) == 2 * 8


# --- bad arguments -----------------------------------------------------------------------

BAD = [
    ("gsop", 32, {"reduced_channels": 0}, "reduced_channels"),
    ("gsop", 32, {"rd_ratio": -1.0}, "rd_ratio"),
    ("gsop", 32, {"row_multiplier": 1.5}, "row_multiplier"),
    ("gsop", 32, {"input_relu": "yes"}, "input_relu"),
    ("gsop", 32, {"reduce_stride": 0}, "reduce_stride"),
    ("bilinear", 32, {"reduced_channels": -2}, "reduced_channels"),
    ("bilinear", 32, {"signed_sqrt": 1}, "signed_sqrt"),
    ("srm", 32, {"style": "var"}, "style"),
    ("srm", 32, {"style": ("mean", "mean")}, "style"),
    ("srm", 32, {"style": ()}, "style"),
    ("srm", 32, {"unbiased_std": 1}, "unbiased_std"),
    ("gct", 32, {"mode": "l3"}, "mode"),
    ("gct", 32, {"eps": 0}, "eps"),
    ("fca", 32, {"freq_sel": "top3"}, "freq_sel"),
    ("fca", 32, {"freq_sel": "mid4"}, "freq_sel"),
    ("fca", 16, {"freq_sel": "top32"}, "freq_sel"),
    ("fca", 32, {"rd_ratio": 0}, "rd_ratio"),
    ("fca", 32, {"rd_divisor": 0}, "rd_divisor"),
    ("fca", 32, {"bias": "yes"}, "bias"),
    ("enc", 32, {"num_codes": 0}, "num_codes"),
    ("enc", 32, {"aggregate": "sum"}, "aggregate"),
    ("enc", 32, {"projection": "no"}, "projection"),
    ("enc", 32, {"projection": False, "rd_ratio": 1 / 4}, "rd_ratio"),
    ("parsenet", 32, {"fusion": "mul"}, "fusion"),
    ("parsenet", 32, {"scale_init": -1.0}, "scale_init"),
    ("parsenet", 32, {"eps": 0.0}, "eps"),
]


@pytest.mark.parametrize(
    ("name", "channels", "kwargs", "key"), BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD]
)
def test_bad_arguments_raise_value_error_naming_the_key(name, channels, kwargs, key):
    with pytest.raises(ValueError, match=key):
        build_attention(name, channels, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keyword_is_rejected(name):
    with pytest.raises(ValueError, match="unknown argument"):
        build_attention(name, 32, not_an_option=1)
