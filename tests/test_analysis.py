"""bench.analysis: collectors, SENet's excitation analysis, GCNet's query independence,
ParseNet's receptive fields, Grad-CAM and the checkpoint loader, on constructed cases
whose answer is known."""

import json

import pytest
import torch
from torch import nn

from bench.analysis import (
    build_from_record,
    class_excitations,
    class_specificity,
    collect,
    default_target_layer,
    empirical_receptive_field,
    grad_cam,
    load_run,
    load_weights,
    query_independence,
    query_positions,
    select,
    theoretical_receptive_field,
)
from bench.analysis.query_independence import block_query_independence
from modules import build_attention, build_backbone, inject
from modules.non_local import NonLocal

STAGES = ((16, 32), (32, 16), (64, 8))  # (channels, map size) of resnet20_cifar at 32x32


def cifar_resnet(placements, **kwargs):
    model = build_backbone("resnet20_cifar", **{"num_classes": 10, **kwargs})
    inject(model, placements)
    return model


# --- collectors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "position", "kinds"),
    [
        ("se", "residual", ["channel"]),
        ("cbam", "residual", ["channel", "spatial"]),
        ("eca", "residual", ["channel"]),
        ("non_local", "post", ["attention"]),
        ("danet_position", "post", ["attention"]),
    ],
)
def test_collect_shapes_in_a_cifar_resnet(block, position, kinds):
    model = cifar_resnet([{"block": block, "stages": "all", "position": position}])
    model.train()
    outputs = collect(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert len(outputs) == 9 * len(kinds)  # 3 stages x 3 units, one output per kind
    assert [out.kind for out in outputs[: len(kinds)]] == kinds
    for out in outputs:
        channels, size = STAGES[out.stage - 1]
        assert out.block == block and out.path.startswith(f"layer{out.stage}.")
        if out.kind == "channel":
            assert out.tensor.shape == (2, channels)
        elif out.kind == "spatial":
            assert out.tensor.shape == (2, size, size)
        else:
            keys = size // 2 if block == "non_local" else size  # non-local subsamples keys
            assert out.tensor.shape == (2, 5, keys * keys)  # 5 default queries
            assert out.key_shape == (keys, keys) and out.query_shape == (size, size)
            assert out.maps().shape == (2, 5, keys, keys)
            torch.testing.assert_close(out.tensor.sum(-1), torch.ones(2, 5))  # softmax rows
        assert out.tensor.dtype == torch.float32 and not out.tensor.requires_grad
    if "attention" in kinds:
        everything = collect(model, torch.randn(1, 3, 32, 32), queries="all")
        size = STAGES[0][1]
        assert everything[0].tensor.shape[1] == size * size


def test_query_positions_are_fractions_of_the_map():
    assert query_positions([(0.5, 0.5)], 8, 8).tolist() == [4 * 8 + 4]
    assert query_positions([(0.0, 0.0), (1.0, 1.0)], 4, 6).tolist() == [0, 23]
    assert query_positions("all", 2, 3).tolist() == list(range(6))
    with pytest.raises(ValueError, match="fractions"):
        query_positions([(2, 0)], 4, 4)


def randomised(block: nn.Module) -> nn.Module:
    """A block whose gates are not at their initial constants (zero-initialised layers)."""
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    return block.eval()


GATES = [
    ("se", {}, "channel", 1),
    ("se", {"variant": "var2", "gate": "hard_sigmoid"}, "channel", 1),
    ("eca", {}, "channel", 1),
    ("eca", {"shared": False}, "channel", 1),
    ("gct", {}, "channel", 1),
    ("srm", {}, "channel", 1),
    ("fca", {"freq_sel": "top4", "rd_ratio": 4, "bias": True}, "channel", 1),
    ("gsop", {"reduced_channels": 8}, "channel", 1),
    ("bilinear", {"reduced_channels": 4}, "channel", 1),
    ("enc", {"num_codes": 4}, "channel", 1),
    ("gc", {"fusion": "scale"}, "channel", 1),
    ("cbam", {"mode": "channel"}, "channel", 1),
    ("cbam", {"mode": "spatial"}, "spatial", 1),
    ("bam", {"mode": "channel", "rd_ratio": 4}, "channel", 2),
    ("bam", {"mode": "spatial", "rd_ratio": 4}, "spatial", 2),
]


@pytest.mark.parametrize(("name", "kwargs", "kind", "offset"), GATES, ids=str)
def test_collected_gate_is_what_multiplies_the_feature_map(name, kwargs, kind, offset):
    # offset 2: BAM returns x * (1 + gate)
    block = randomised(build_attention(name, 16, **kwargs))
    x = torch.rand(3, 16, 7, 7) + 0.5
    (out,) = collect(nn.Sequential(block), x, kinds=(kind,))
    assert out.block == name and out.stage is None and out.kind == kind
    gate = out.tensor[:, :, None, None] if kind == "channel" else out.tensor[:, None]
    factor = gate + 1 if offset == 2 else gate
    with torch.no_grad():
        torch.testing.assert_close(block(x), x * factor)
    assert gate.std() > 1e-4  # not a constant: the test would be vacuous


def test_cbam_both_and_gc_pooling_weights():
    model = cifar_resnet(
        [
            {"block": "cbam", "stages": [3], "blocks": "last"},
            {"block": "gc", "stages": [3], "blocks": "last", "args": {"fusion": "add+scale"}},
            {"block": "snl", "stages": [2], "blocks": "first"},
        ]
    )
    outputs = collect(model, torch.randn(2, 3, 32, 32))
    assert [(o.block, o.kind) for o in outputs] == [
        ("snl", "context"),
        ("cbam", "channel"),
        ("cbam", "spatial"),
        ("gc", "channel"),
        ("gc", "context"),
    ]
    for out in select(outputs, kind="context"):
        torch.testing.assert_close(out.tensor.sum(dim=(1, 2)), torch.ones(2))
    assert [o.kind for o in select(outputs, block="cbam")] == ["channel", "spatial"]
    assert collect(cifar_resnet([]), torch.randn(1, 3, 32, 32)) == []


# --- GCNet: query independence -----------------------------------------------------------


def test_query_independence_of_constructed_maps():
    same = torch.rand(1, 7).softmax(-1).expand(5, 7)
    assert query_independence(same).item() == pytest.approx(0.0, abs=1e-6)
    assert query_independence(torch.eye(6)).item() == pytest.approx(1.0)
    batch = torch.stack([same[:5, :5], torch.eye(5)])
    assert query_independence(batch).shape == (2,)


def test_query_independence_of_non_local_blocks():
    # theta without weights: every query is theta's bias, so the attention ignores the query
    ignoring = NonLocal(8, subsample=False)
    with torch.no_grad():
        ignoring.theta.weight.zero_()
        ignoring.theta.bias.normal_()
    scores = block_query_independence(nn.Sequential(ignoring), torch.randn(2, 8, 6, 6))
    assert scores["0"] == pytest.approx(0.0, abs=1e-6)
    # gaussian f on one-hot features: x_i . x_j = 100 [i == j], each query attends to itself
    selfish = NonLocal(16, pairwise="gaussian", subsample=False)
    one_hot = 10 * torch.eye(16).reshape(1, 16, 4, 4)
    scores = block_query_independence(nn.Sequential(selfish), one_hot)
    assert scores["0"] > 0.99


# --- ParseNet: receptive fields ----------------------------------------------------------


def ones_conv(**kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, 3, bias=False, **kwargs)
    nn.init.ones_(conv.weight)
    return conv


def test_receptive_field_of_a_single_3x3_conv():
    conv = ones_conv(padding=1)
    image = torch.randn(1, 9, 9)
    rf = empirical_receptive_field(conv, image)
    assert rf.unit == (4, 4) and rf.size == (3, 3) and rf.box == (3, 3, 5, 5)
    assert rf.change.shape == (9, 9) and rf.change[0, 0] == 0
    assert theoretical_receptive_field(conv).size == (3, 3)
    # a 3x3 patch touches the field from one pixel further away on each side
    assert empirical_receptive_field(conv, image, patch_size=3).size == (5, 5)


def test_receptive_field_of_stacked_convs():
    two = nn.Sequential(ones_conv(padding=1), ones_conv(padding=1))
    assert theoretical_receptive_field(two).size == (5, 5)
    assert theoretical_receptive_field(two, "0").size == (3, 3)
    assert empirical_receptive_field(two, torch.randn(1, 11, 11)).size == (5, 5)
    strided = nn.Sequential(ones_conv(stride=2), ones_conv(dilation=2), nn.MaxPool2d(2))
    rf = theoretical_receptive_field(strided)
    assert rf.size == (3 + (3 - 1) * 2 * 2 + (2 - 1) * 2, 13) and rf.jump == (4, 4)


def test_receptive_field_of_a_cifar_resnet():
    model = build_backbone("resnet20_cifar", num_classes=10, zero_init_last=False)
    # stem 3x3, then two 3x3 convs per unit; the stride-2 shortcut is not counted twice
    assert theoretical_receptive_field(model, "layer1.0").size == (7, 7)
    deeper = theoretical_receptive_field(model, "layer2.0")
    assert deeper.size == (15 + 2 + 4, 21) and deeper.jump == (2, 2)
    assert not any("downsample" in path for path in deeper.layers)
    rf = empirical_receptive_field(model, torch.randn(3, 16, 16), layer="layer1.0", trials=1)
    assert (3, 3) <= rf.size <= (7, 7)  # never wider than the theoretical field


# --- SENet: excitation analysis ----------------------------------------------------------


def labelled_batches(brightness=(0.0, 0.0, 0.0), n=2):
    torch.manual_seed(1)
    for _ in range(2):
        labels = torch.arange(3).repeat_interleave(n)
        images = (
            torch.randn(len(labels), 3, 32, 32) + torch.tensor(brightness)[labels, None, None, None]
        )
        yield images, labels


def test_class_specificity_definition():
    assert class_specificity(torch.full((4, 6), 0.3)) == 0.0
    assert class_specificity(torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="K >= 2"):
        class_specificity(torch.ones(1, 5))


def test_constant_se_gate_has_zero_class_specificity():
    # zero_init_last=False: with it, every residual branch, and so every SE input, is 0
    model = cifar_resnet([{"block": "se", "stages": "all"}], zero_init_last=False)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "registry_name", None) == "se":
                module.fc[2].weight.zero_()  # gate = sigmoid(bias), whatever the image
    excitations = class_excitations(model, labelled_batches(brightness=(0.0, 5.0, -5.0)))
    assert len(excitations) == 9
    for ex in excitations:
        assert ex.classes == (0, 1, 2) and ex.count.tolist() == [4, 4, 4]
        assert ex.mean.shape == (3, ex.overall.shape[0])
        assert ex.specificity == 0.0


def test_class_dependent_gate_has_positive_class_specificity():
    placements = [{"block": "se", "stages": [1], "blocks": "first"}]
    model = cifar_resnet(placements, zero_init_last=False)
    (flat,) = class_excitations(model, labelled_batches())
    (bright,) = class_excitations(model, labelled_batches(brightness=(0.0, 5.0, -5.0)), [2, 0])
    assert bright.classes == (2, 0) and bright.specificity > 1e-3
    assert bright.specificity > 10 * flat.specificity
    with pytest.raises(ValueError, match="no images of classes"):
        class_excitations(model, labelled_batches(), classes=[7])


# --- Grad-CAM ----------------------------------------------------------------------------


class Region(nn.Module):
    """Keeps rows/cols 2..5 of the input and zeroes the rest."""

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[..., 2:6, 2:6] = 1
        return x * mask


def test_grad_cam_highlights_the_region_the_output_depends_on():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.abs_()
        head.weight.fill_(1.0)
    act = nn.ReLU()
    model = nn.Sequential(Region(), conv, act, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    cam = grad_cam(model, torch.rand(2, 3, 16, 16) + 0.1, targets=[0, 1], target_layer=act)
    assert cam.shape == (2, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    inside = cam[:, 2:6, 2:6].mean()
    outside = cam[:, 8:, 8:].mean()
    assert inside > 0.5 and outside < 0.05


def test_grad_cam_on_a_resnet():
    model = cifar_resnet([{"block": "se", "stages": "all"}])
    assert default_target_layer(model) is model.layer3
    cam = grad_cam(model, torch.randn(2, 3, 32, 32), target_layer="layer2")
    assert cam.shape == (2, 32, 32) and cam.dtype == torch.float32
    assert cam.min() >= 0 and cam.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())


# --- checkpoints -------------------------------------------------------------------------


def test_load_run_from_plain_and_lightning_checkpoints(tmp_path):
    placements = [{"block": "eca", "stages": [2, 3]}]
    record = {
        "config": {
            "model": {"name": "resnet20_cifar", "drop_path_rate": 0.0},
            "attention": {"placements": placements},
            "data": {"num_classes": 7},
        }
    }
    trained = cifar_resnet(placements, num_classes=7)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param))
    trained.eval()
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    lightning = {"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}
    torch.save({**lightning, "epoch": 3}, tmp_path / "last.ckpt")
    (tmp_path / "record.json").write_text(json.dumps(record))

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
        for source, weights in ((record, "weights.pt"), (tmp_path / "record.json", "last.ckpt")):
            model = load_run(source, tmp_path / weights)
            assert not model.training
            torch.testing.assert_close(model(x), expected)
    torch.save({"state_dict": {"net.x": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="'model.' keys"):
        load_weights(build_from_record(record), tmp_path / "other.ckpt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_weights(cifar_resnet([], num_classes=7), tmp_path / "weights.pt")
