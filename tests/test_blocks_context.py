"""Context and self-attention blocks: GC, SNL, non-local, DANet (PAM, CAM, dual), BAM.

Properties, not just shapes: identity at initialisation, the SDPA path against an
explicit softmax(QK^T)V, memory that stays linear in H*W, GC's query-independent
context, the SE-like form of GC, parameter counts from the papers' formulas, BAM's
``x * (1 + sigmoid)`` form, and a ValueError naming the key for every bad argument.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from modules import build_attention
from modules.parts import softmax_attention
from modules.registry import block_positions

B, C, H, W = 2, 32, 8, 8
PAIRWISE = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")

CONFIGS = [
    ("gc", {}),
    ("gc", {"pooling": "avg"}),
    ("gc", {"fusion": "scale"}),
    ("gc", {"fusion": "add+scale"}),
    ("gc", {"fusion": "both"}),
    ("gc", {"fusion": ["scale", "add"], "pooling": "avg"}),
    ("gc", {"layer_norm": False}),
    ("gc", {"rd_ratio": 4}),
    ("gc", {"rd_divisor": 8}),
    ("gc", {"rd_channels": 3}),
    ("snl", {}),
    *[("non_local", {"pairwise": p, "subsample": s}) for p in PAIRWISE for s in (True, False)],
    *[("non_local", {"pairwise": p, "subsample_order": "after_conv"}) for p in PAIRWISE],
    ("non_local", {"scaled": True}),
    ("non_local", {"pairwise": "gaussian", "scaled": True}),
    ("non_local", {"inter_channels": 4}),
    ("non_local", {"rd_ratio": 1 / 4}),
    ("danet_position", {}),
    ("danet_position", {"rd_ratio": 1 / 4}),
    ("danet_channel", {}),
    ("danet_channel", {"energy": "plain"}),
    ("danet", {}),
    ("danet", {"energy": "plain", "rd_channels": 2}),
    ("danet", {"fusion": "conv"}),
    ("bam", {}),
    ("bam", {"mode": "channel"}),
    ("bam", {"mode": "spatial"}),
    ("bam", {"combine": "product"}),
    ("bam", {"output_bn": False}),
    ("bam", {"dilation": 2}),
    ("bam", {"num_dilated_convs": 0}),
    ("bam", {"num_dilated_convs": 3, "rd_ratio": 1 / 8}),
]

# blocks whose own skip connection makes them the identity at initialisation
IDENTITY_AT_INIT = [
    ("gc", {}),
    ("gc", {"pooling": "avg", "layer_norm": False}),
    ("snl", {}),
    *[("non_local", {"pairwise": p, "subsample": s}) for p in PAIRWISE for s in (True, False)],
    ("danet_position", {}),
    ("danet_channel", {}),
    ("danet_channel", {"energy": "plain"}),
    ("danet", {}),
]

# parameters that start at zero by design, and must get a gradient at the first step
ZERO_INIT = {
    "gc": ["add.3.weight", "add.3.bias"],
    "snl": ["value.weight", "value.bias"],
    "non_local": ["out.1.weight"],
    "danet_position": ["gamma"],
    "danet_channel": ["gamma"],
    "danet": ["position.gamma", "channel.gamma"],
}


def config_id(config):
    name, kwargs = config
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def perturb_zeros(block):
    """Give parameters that start at zero random values, so every path carries signal."""
    with torch.no_grad():
        for param in block.parameters():
            if not param.any():
                param.normal_(0, 0.5)


def param_count(block):
    return sum(p.numel() for p in block.parameters())


def max_allocation(fn):
    """Largest single CPU allocation (bytes) made while running ``fn``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


# --- every option: shape and gradients ----------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_shape_and_every_parameter_gets_a_gradient(config):
    name, kwargs = config
    block = build_attention(name, C, **kwargs)
    perturb_zeros(block)
    size = (7, 7) if kwargs.get("subsample") else (H, W)  # odd map: ceil-mode pooling
    # batch 8: BN over a batch of 2 maps everything to +-1, and BAM's output BN would then
    # cancel any shift its hidden BN makes unless a ReLU happens to clip one sample
    x = torch.randn(8, C, *size, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    # random weights: a plain sum is blind to BN's gamma and softmax logit shifts
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, param in block.named_parameters():
        assert param.grad is not None, pname
        # not merely > 0: a bias cancelled by a following norm gets rounding noise
        assert param.grad.abs().max() > 1e-5, f"{pname} got no gradient"


@pytest.mark.parametrize("config", IDENTITY_AT_INIT, ids=config_id)
def test_identity_at_initialisation(config):
    name, kwargs = config
    block = build_attention(name, C, **kwargs)
    x = torch.randn(B, C, H, W)
    assert torch.equal(block(x), x)
    block.eval()
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("name", sorted(ZERO_INIT))
def test_zero_initialised_parameters_get_gradients_at_init(name):
    block = build_attention(name, C)
    params = dict(block.named_parameters())
    for pname in ZERO_INIT[name]:
        assert not params[pname].any(), f"{pname} should start at zero"
    x = torch.randn(B, C, H, W)
    out = block(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname in ZERO_INIT[name]:
        assert params[pname].grad.abs().max() > 1e-5, f"{pname} cannot leave zero"


# --- SDPA path against an explicit softmax(QK^T) V ---------------------------------------


def explicit_attention(q, k, v, scale=1.0):
    """Reference: the full (B, N, M) attention matrix, then its product with v."""
    return torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v


def tokens(t):
    return t.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)


@pytest.mark.parametrize("widths", [(3, 3), (2, 7), (7, 2)])
def test_softmax_attention_pads_to_one_width_without_changing_the_result(widths):
    qk_width, v_width = widths
    q, k = torch.randn(B, 20, qk_width), torch.randn(B, 12, qk_width)
    v = torch.randn(B, 12, v_width)
    torch.testing.assert_close(softmax_attention(q, k, v, 1.0), explicit_attention(q, k, v))
    # default scale: 1/sqrt of the unpadded width
    expected = explicit_attention(q, k, v, scale=qk_width**-0.5)
    torch.testing.assert_close(softmax_attention(q, k, v), expected)


def test_position_attention_equals_explicit_softmax():
    block = build_attention("danet_position", C)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(B, C, H, W)
    q, k, v = tokens(block.query(x)), tokens(block.key(x)), tokens(block.value(x))
    attended = explicit_attention(q, k, v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), x + 0.7 * attended)


@pytest.mark.parametrize("order", ["before_conv", "after_conv"])
@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_non_local_equals_explicit_pairwise_sum(pairwise, subsample, order):
    block = build_attention(
        "non_local", C, pairwise=pairwise, subsample=subsample, subsample_order=order
    )
    perturb_zeros(block)
    x = torch.randn(B, C, 7, 7)
    pool = (lambda t: F.max_pool2d(t, 2, ceil_mode=True)) if subsample else (lambda t: t)
    phi = (lambda t: t) if pairwise == "gaussian" else block.phi
    if order == "before_conv":
        v, k = tokens(block.g(pool(x))), tokens(phi(pool(x)))
    else:
        v, k = tokens(pool(block.g(x))), tokens(pool(phi(x)))
    q = tokens(x) if pairwise == "gaussian" else tokens(block.theta(x))
    num_keys = 16 if subsample else 49
    if pairwise in ("gaussian", "embedded_gaussian"):
        y = explicit_attention(q, k, v)
    elif pairwise == "dot_product":
        y = (q @ k.transpose(1, 2) / num_keys) @ v
    else:
        # materialise [theta_i, phi_j] for every pair, as the paper writes it
        n, m = q.shape[1], k.shape[1]
        pairs = torch.cat(
            [q[:, :, None].expand(-1, -1, m, -1), k[:, None].expand(-1, n, -1, -1)], dim=-1
        )
        y = (F.relu(block.concat(pairs)[..., 0]) / num_keys) @ v
    expected = x + block.out(y.transpose(1, 2).reshape(B, -1, 7, 7))
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.attention_map(x).shape, torch.Size([B, 49, num_keys]))


def official_non_local(x, block):
    """facebookresearch/video-nonlocal-net lib/models/nonlocal_helper.py (2D, USE_SOFTMAX,
    USE_MAXPOOL, USE_BN) from our weights: theta on x; one 2x2 stride-2 max-pool of x feeds
    phi and g; softmax over keys of theta^T phi; t = g p^T; 1x1 out conv; BN; + x. Our phi
    and g have no bias (the softmax cancels phi's; g's is left out), hence zeros here."""
    b, c, h, w = x.shape
    pooled = F.max_pool2d(x, kernel_size=2, stride=2)
    theta = block.theta(x).view(b, -1, h * w)  # (B, inner, N)
    phi = F.conv2d(pooled, block.phi.weight).view(b, theta.shape[1], -1)  # (B, inner, M)
    g = F.conv2d(pooled, block.g.weight).view(b, theta.shape[1], -1)  # (B, inner, M)
    p = torch.softmax(theta.transpose(1, 2) @ phi, dim=2)  # (B, N, M)
    t = (g @ p.transpose(1, 2)).view(b, -1, h, w)  # (B, inner, H, W)
    return x + block.out(t)


def test_non_local_pools_before_phi_and_g_like_the_official_code():
    block = build_attention("non_local", C)  # subsample=True, before_conv by default
    assert block.subsample_order == "before_conv"
    perturb_zeros(block)
    x = torch.randn(B, C, 8, 8)
    torch.testing.assert_close(block(x), official_non_local(x, block), rtol=1e-4, atol=1e-5)
    # the other order is a different function of the same weights
    after = build_attention("non_local", C, subsample_order="after_conv")
    after.load_state_dict(block.state_dict())
    assert not torch.allclose(after(x), block(x), atol=1e-3)


def test_non_local_scaled_is_the_official_one_over_sqrt_d():
    block = build_attention("non_local", C, scaled=True, subsample=False, inter_channels=8)
    perturb_zeros(block)
    x = torch.randn(B, C, H, W)
    q, k, v = tokens(block.theta(x)), tokens(block.phi(x)), tokens(block.g(x))
    y = explicit_attention(q, k, v, scale=8**-0.5)
    expected = x + block.out(y.transpose(1, 2).reshape(B, 8, H, W))
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_channel_attention_max_minus_energy_is_softmax_of_negative_energy():
    x = torch.randn(B, C, H, W)
    flat = x.flatten(2)
    energy = flat @ flat.transpose(1, 2)
    for kind, logits in (("max_minus", -energy), ("plain", energy)):
        block = build_attention("danet_channel", C, energy=kind)
        with torch.no_grad():
            block.gamma.fill_(0.3)
        expected = x + 0.3 * (torch.softmax(logits, dim=-1) @ flat).reshape(x.shape)
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_danet_sum_fuses_both_modules_counting_the_input_once():
    block = build_attention("danet", C)
    perturb_zeros(block)
    x = torch.randn(B, C, H, W)
    torch.testing.assert_close(block(x), block.position(x) + block.channel(x) - x)


# --- memory: linear in H*W ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [("danet_position", {}), ("non_local", {"subsample": False}), ("danet", {})],
)
def test_attention_memory_stays_linear_at_56x56(name, kwargs):
    channels, size = 16, 56
    n = size * size
    quadratic = B * n * n * 4  # bytes of one float32 (B, N, N) matrix: 75 MiB here
    block = build_attention(name, channels, **kwargs)
    perturb_zeros(block)
    x = torch.randn(B, channels, size, size, requires_grad=True)

    def train_step():
        block(x).square().mean().backward()

    def explicit():
        q = tokens(torch.randn(B, 2, size, size))
        explicit_attention(q, q, tokens(x)).sum()

    assert max_allocation(explicit) >= quadratic  # the reference does build N x N
    assert max_allocation(train_step) < quadratic / 50


# --- GC and SNL: one context per image ----------------------------------------------------


@pytest.mark.parametrize("name", ["gc", "snl"])
def test_global_context_is_the_same_for_every_query_position(name):
    block = build_attention(name, C)
    perturb_zeros(block)
    x = torch.randn(B, C, H, W)
    weights = block.pool.weights(x)
    assert weights.shape == (B, H * W)  # one weight map per image, not per query
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(B))
    added = block(x) - x
    assert added.abs().amax() > 1e-3
    torch.testing.assert_close(added, added[..., :1, :1].expand_as(added))


def test_non_local_attention_differs_per_query_unlike_gc():
    # the contrast that makes the GC test meaningful: non-local rows are not all equal
    block = build_attention("non_local", C, subsample=False)
    weights = block.attention_map(torch.randn(B, C, H, W))  # (B, N, N)
    assert (weights - weights[:, :1]).abs().amax() > 1e-2


def test_gc_avg_pool_scale_fusion_is_an_se_gate():
    block = build_attention("gc", C, pooling="avg", fusion="scale")
    perturb_zeros(block)
    x = torch.randn(B, C, H, W)
    conv1, norm, _, conv2 = block.scale
    s = x.mean(dim=(2, 3))  # (B, C)
    h = F.linear(s, conv1.weight[:, :, 0, 0], conv1.bias)
    h = F.relu(F.layer_norm(h, h.shape[1:], norm.weight.flatten(), norm.bias.flatten()))
    gate = torch.sigmoid(F.linear(h, conv2.weight[:, :, 0, 0], conv2.bias))
    torch.testing.assert_close(block(x), x * gate[:, :, None, None])


def test_gc_scale_fusion_starts_as_a_half_gate_like_the_official_code():
    block = build_attention("gc", C, fusion="scale")
    x = torch.randn(B, C, H, W)
    torch.testing.assert_close(block(x), 0.5 * x)


def test_gc_layer_norm_keeps_the_bottleneck_at_least_two_wide():
    assert build_attention("gc", 16).add[0].out_channels == 2
    assert build_attention("gc", 16, layer_norm=False).add[0].out_channels == 1
    assert build_attention("gc", 64).add[0].out_channels == 4


# --- parameter counts from the papers' formulas ------------------------------------------


def test_parameter_counts():
    c = 64
    r = c // 16
    transform = 2 * c * r + r + c  # two 1x1 convs with biases
    assert param_count(build_attention("gc", c)) == c + transform + 2 * r  # key conv has no bias
    assert param_count(build_attention("gc", c, layer_norm=False)) == c + transform
    assert param_count(build_attention("gc", c, pooling="avg")) == transform + 2 * r
    assert param_count(build_attention("gc", c, fusion="both")) == c + 2 * (transform + 2 * r)
    assert param_count(build_attention("snl", c)) == c + c * c + c

    i = c // 2
    out = i * c + 2 * c  # W_z without bias, BN gamma and beta
    expected = {
        "embedded_gaussian": (c * i + i) + c * i + c * i + out,  # phi, g: no bias
        "gaussian": c * i + out,
        "dot_product": 3 * (c * i + i) + out,
        "concatenation": 3 * (c * i + i) + 2 * i + out,
    }
    for pairwise, count in expected.items():
        assert param_count(build_attention("non_local", c, pairwise=pairwise)) == count

    w = c // 8
    position = (c * w + w) + c * w + (c * c + c) + 1  # query, key (no bias), value, gamma
    assert param_count(build_attention("danet_position", c)) == position
    assert param_count(build_attention("danet_channel", c)) == 1
    assert param_count(build_attention("danet", c)) == position + 1
    conv_fusion = 2 * (9 * c * c + 2 * c)
    assert param_count(build_attention("danet", c, fusion="conv")) == position + 1 + conv_fusion

    # no conv bias right before a BN
    channel = (c * r + 2 * r) + r * c + 2 * c  # fc-BN-ReLU-fc-BN
    spatial = (c * r + 2 * r) + 2 * (9 * r * r + 2 * r) + r + 2  # 1x1, 2 dilated 3x3, 1x1, BN
    assert param_count(build_attention("bam", c)) == channel + spatial
    official = channel + spatial - 2 * c - 2 + c + 1  # output BNs gone, final biases back
    assert param_count(build_attention("bam", c, output_bn=False)) == official
    assert param_count(build_attention("bam", c, mode="channel")) == channel


# --- BAM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["both", "channel", "spatial"])
def test_bam_is_x_times_one_plus_sigmoid(mode):
    block = build_attention("bam", C, mode=mode)
    x = torch.randn(B, C, H, W).abs()
    out = block(x)
    assert (out >= x).all() and (out <= 2 * x).all()
    attention = block.attention(x)
    expected_shape = {"both": (B, C, H, W), "channel": (B, C, 1, 1), "spatial": (B, 1, H, W)}
    assert attention.shape == expected_shape[mode]
    torch.testing.assert_close(out, x * (1 + attention))


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_combines_branches_as_asked(combine):
    block = build_attention("bam", C, combine=combine)
    x = torch.randn(B, C, H, W)
    mc, ms = block.channel_branch(x), block.spatial_branch(x)
    logits = mc + ms if combine == "sum" else mc * ms
    torch.testing.assert_close(block.attention(x), torch.sigmoid(logits))


def test_bam_spatial_branch_uses_dilated_convs():
    block = build_attention("bam", C, dilation=3, num_dilated_convs=2)
    dilated = [m for m in block.spatial_branch if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in dilated] == [(1, 1), (3, 3), (3, 3), (1, 1)]
    assert [m.dilation[0] for m in dilated[1:3]] == [3, 3]


# --- placement and weight decay -----------------------------------------------------------


def test_positions():
    # between residual units only: "pre" would let the shortcut skip the block
    for name in ("non_local", "danet_position", "danet_channel", "danet"):
        assert set(block_positions(name)) == {"unit_input", "post", "stage_end"}
    assert set(block_positions("bam")) == {"stage_end", "post", "unit_input"}
    assert "residual" in block_positions("gc")


@pytest.mark.parametrize("name", ["danet_position", "danet_channel", "danet"])
def test_no_weight_decay_names_real_parameters(name):
    block = build_attention(name, C)
    names = block.no_weight_decay()
    assert names and names <= dict(block.named_parameters()).keys()


# --- bad arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("gc", {"pooling": "max"}, "pooling"),
        ("gc", {"fusion": "mul"}, "fusion"),
        ("gc", {"fusion": []}, "fusion"),
        ("gc", {"fusion": "add+add"}, "fusion"),
        ("gc", {"layer_norm": "yes"}, "layer_norm"),
        ("gc", {"rd_ratio": 0}, "rd_ratio"),
        ("gc", {"rd_divisor": 0}, "rd_divisor"),
        ("snl", {"rd_ratio": 1 / 16}, "rd_ratio"),
        ("non_local", {"pairwise": "cosine"}, "pairwise"),
        ("non_local", {"subsample": "yes"}, "subsample"),
        ("non_local", {"subsample_order": "before"}, "subsample_order"),
        ("non_local", {"inter_channels": 0}, "inter_channels"),
        ("non_local", {"rd_ratio": -1}, "rd_ratio"),
        ("non_local", {"scaled": True, "pairwise": "dot_product"}, "scaled"),
        ("danet_position", {"rd_ratio": 0}, "rd_ratio"),
        ("danet_channel", {"energy": "min"}, "energy"),
        ("danet", {"fusion": "concat"}, "fusion"),
        ("danet", {"energy": "max"}, "energy"),
        ("bam", {"mode": "3d"}, "mode"),
        ("bam", {"combine": "max"}, "combine"),
        ("bam", {"combine": "product", "mode": "channel"}, "combine"),
        ("bam", {"dilation": 0}, "dilation"),
        ("bam", {"num_dilated_convs": -1}, "num_dilated_convs"),
        ("bam", {"num_dilated_convs": 1.5}, "num_dilated_convs"),
        ("bam", {"output_bn": None}, "output_bn"),
        ("bam", {"rd_channels": 0}, "rd_channels"),
    ],
)
def test_bad_argument_raises_value_error_naming_the_key(name, kwargs, key):
    with pytest.raises(ValueError, match=key):
        build_attention(name, C, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, accepted",
    [
        ("gc", {"pooling": "max"}, "attention"),
        ("gc", {"fusion": "mul"}, r"add\+scale"),
        ("non_local", {"pairwise": "cosine"}, "embedded_gaussian"),
        ("non_local", {"subsample_order": "first"}, "before_conv"),
        ("danet_channel", {"energy": "min"}, "max_minus"),
        ("danet", {"fusion": "concat"}, "sum"),
        ("bam", {"mode": "3d"}, "spatial"),
    ],
)
def test_bad_choice_lists_the_accepted_values(name, kwargs, accepted):
    with pytest.raises(ValueError, match=accepted):
        build_attention(name, C, **kwargs)
