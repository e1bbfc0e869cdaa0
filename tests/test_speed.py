"""bench.speed: the quick CPU report is written with every row and ratio column.

No timing is asserted: the numbers of a quick run on a shared machine mean nothing. What is
checked is the report's shape, that our blocks are configured like timm's (parameter
counts), and that the explicit-matrix reference computes what the SDPA path computes.
"""

import csv
import json

import pytest
import torch
from test_tables import make_record

from bench.loop_speed import full_runs
from bench.speed import (
    BLOCKS,
    MICRO_BLOCKS,
    SDPA_BLOCKS,
    ExplicitPath,
    build_ours,
    build_timm,
    count_params,
    main,
    our_block,
    sdpa_block,
    sizes_for,
    timm_block,
)

QUICK = sizes_for("cpu", quick=True)
UNITS = {"resnet50": 16, "resnet20_cifar": 9}  # residual units, one block each


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(out)]) == 0
    with open(out / "cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return (out / "cpu.md").read_text(), rows


def _section(rows, name):
    return [row for row in rows if row["section"] == name]


def test_model_rows_cover_every_backbone_and_block(report):
    _, rows = report
    models = _section(rows, "model")
    expected = {(b.name, block) for b in QUICK.backbones for block in BLOCKS}
    assert {(row["backbone"], row["block"]) for row in models} == expected
    assert len(models) == len(expected)
    for row in models:
        for mode in ("train", "infer"):
            assert float(row[f"{mode}_ours_img_s"]) > 0
            assert float(row[f"{mode}_ours_peak_mb"]) >= 0
            if row["block"] == "non_local":  # no timm equivalent: ours only
                assert row[f"{mode}_ratio"] == row[f"{mode}_timm_img_s"] == ""
            else:
                assert float(row[f"{mode}_ratio"]) > 0
                assert float(row[f"{mode}_timm_img_s"]) > 0


def test_our_models_are_the_size_of_timms(report):
    _, rows = report
    for row in _section(rows, "model"):
        if row["block"] == "non_local":
            assert row["params_diff"] == ""
        elif row["block"] == "gc":  # timm's key conv bias, one per block
            assert int(row["params_diff"]) == -UNITS[row["backbone"]]
        else:
            assert int(row["params_diff"]) == 0, row


def test_block_and_sdpa_rows(report):
    _, rows = report
    blocks = _section(rows, "block")
    assert {(r["block"], r["stage"]) for r in blocks} == {
        (b, f"layer{i}") for b in MICRO_BLOCKS for i in range(1, 5)
    }
    for row in blocks:
        assert float(row["time_ratio"]) > 0
        extra = 1 if row["block"] == "gc" else 0
        assert int(row["params_timm"]) - int(row["params_ours"]) == extra
    sdpa = _section(rows, "sdpa")
    assert [r["block"] for r in sdpa] == list(SDPA_BLOCKS)
    for row in sdpa:
        assert float(row["time_ratio"]) > 0
        assert float(row["max_rel_diff"]) < 1e-3
        assert float(row["explicit_peak_mb"]) > 0 and float(row["sdpa_peak_mb"]) > 0


def test_targets_and_markdown(report):
    markdown, rows = report
    targets = _section(rows, "target")
    names = {row["target"] for row in targets}
    assert len(names) == 4
    assert all(row["verdict"].startswith(("met", "missed", "not")) for row in targets)
    # one target row per timed ours/timm pair (none excluded), per block shape, per SDPA block
    pairs = sum(len(UNITS) for block in BLOCKS if block not in ("none", "non_local")) * 2
    loops = 1  # quick: the smoke protocol's plain net
    assert len(targets) == pairs + len(MICRO_BLOCKS) * 4 + len(SDPA_BLOCKS) + loops
    headings = ("## Targets", "## 1. Model throughput", "## 2. Blocks", "## 3. SDPA", "## 4.")
    for heading in headings:
        assert heading in markdown
    for column in ("train ours/timm", "infer ours/timm", "time ours/timm", "time SDPA/explicit"):
        assert column in markdown


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["--quick", "--sections", "model,speed", "--out", str(tmp_path)]) == 2
    assert "--sections" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", SDPA_BLOCKS)
def test_explicit_path_is_the_same_maths_with_gradients(name):
    block = sdpa_block(name, 16).double()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    sdpa_out = block(x)
    (sdpa_grad,) = torch.autograd.grad(sdpa_out.square().sum(), x)
    explicit_out = ExplicitPath(block)(x)
    (explicit_grad,) = torch.autograd.grad(explicit_out.square().sum(), x)
    torch.testing.assert_close(explicit_out, sdpa_out)
    torch.testing.assert_close(explicit_grad, sdpa_grad)


@pytest.mark.parametrize("name", MICRO_BLOCKS)
def test_micro_blocks_match_timms_settings(name):
    ours, theirs = our_block(name, 256), timm_block(name, 256)
    extra = 1 if name == "gc" else 0
    assert count_params(theirs) - count_params(ours) == extra


def test_timm_side_is_timms_own_attention_module():
    backbone = QUICK.backbones[1]  # the CIFAR net: timm's ResNet class with attn_layer
    theirs = build_timm(backbone, "se")
    assert type(theirs.layer1[0].se).__module__.startswith("timm.")
    ours = build_ours(backbone, "se")
    assert count_params(ours) == count_params(theirs)
    assert build_timm(backbone, "non_local") is None


def test_loop_row_times_a_real_run_against_its_model_alone(report):
    markdown, rows = report
    (loop,) = _section(rows, "loop")
    assert (loop["protocol"], loop["block"], loop["batch"]) == ("smoke", "none", "16")
    assert float(loop["loop_img_s"]) > 0 and float(loop["model_img_s"]) > 0
    ratio = float(loop["loop_img_s"]) / float(loop["model_img_s"])
    assert float(loop["loop_ratio"]) == pytest.approx(ratio, abs=2e-3)
    assert loop["full_runs"] == "0" and loop["full_img_s"] == ""  # smoke runs are no results
    assert "loop / model" in markdown


def test_full_runs_are_the_same_protocol_version_precision_and_block(tmp_path):
    def record(name, *, version=2, precision="bf16-mixed", blocks=(), epochs=3, rate=800.0):
        r = make_record(name, 0, 85.0, 99.0, version=version)
        r["config"]["trainer"] = {"precision": precision}
        r.update(run_id=name, epochs=epochs, throughput=rate)
        r["attention"] = [{"block": b} for b in blocks]
        return r

    records = [
        record("a", rate=800.0),
        record("b", rate=820.0),
        record("old", version=None, rate=500.0),  # version 1
        record("fp32", precision="32", rate=450.0),
        record("se", blocks=("se",) * 9, rate=700.0),
        record("cut", epochs=2, rate=900.0),  # stopped by the time guard
    ]
    root = tmp_path / "runs" / "cifar_blocks"
    root.mkdir(parents=True)
    for r in records:
        (root / f"{r['run_id']}.json").write_text(json.dumps(r))
    config = {"protocol": {"name": "cpu", "version": 2}, "trainer": {"precision": "bf16-mixed"}}
    assert sorted(full_runs(tmp_path / "runs", config, "none")) == [800.0, 820.0]
    assert full_runs(tmp_path / "runs", config, "se") == [700.0]
