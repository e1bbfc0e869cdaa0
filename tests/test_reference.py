"""The machine-readable copy of the papers' numbers: schema, lookups, printed precision."""

import pickle

import pytest

from bench.reference import (
    FIELDS,
    NUMBERS,
    MissingReference,
    Published,
    ReferenceSchemaError,
    agrees,
    load_reference,
    papers,
    parse_reference,
    reference_table,
    reference_value,
    validate,
)

VALID = """
paper: X
title: A paper
arxiv: "0000.00000"
tables:
  main:
    source: Table 1
    rows:
      base: {backbone: resnet50, top1_err: 24.80, params_m: 25.6}
"""


def test_every_paper_file_loads_and_names_its_source():
    assert papers() == ["cbam", "eca", "gcnet", "senet", "simam_cifar"]
    for paper in papers():
        data = load_reference(paper)
        assert data.get("arxiv") or data.get("url")
        for table in data["tables"].values():
            assert table["source"]
            for row in table["rows"].values():
                assert set(row) <= set(FIELDS)
                # error and accuracy of one metric never sit in one row
                for metric in ("top1", "top5", "cifar10", "cifar100"):
                    assert not {f"{metric}_err", f"{metric}_acc"} <= set(row)


@pytest.mark.parametrize(
    ("paper", "table", "row", "field", "value"),
    [
        ("cbam", "imagenet", "resnet18_cbam", "params_m", 11.78),
        ("cbam", "imagenet", "resnet50_cbam", "gmacs", 3.864),
        ("cbam", "arrangement", "parallel", "top5_err", 6.59),
        ("senet", "reduction_ratio", "r32", "params_m", 26.9),
        ("senet", "stage", "se_stage_4", "stages", [3]),
        ("senet", "cifar", "wrn16_8_se", "cifar100_err", 19.14),
        ("senet", "imagenet", "resnet152_se", "gmacs", 11.32),
        ("eca", "imagenet", "resnet50", "params_m", 24.37),
        ("eca", "no_reduction", "se_var3", "top1_acc", 77.42),
        ("eca", "adaptive_kernel", "stage4", "kernel_size", 7),
        ("gcnet", "imagenet_fusion", "att_add", "top5_acc", 93.66),
        ("gcnet", "coco_ratio", "r32", "mask_ap", 35.7),
        ("simam_cifar", "cifar", "resnet110_eca", "cifar100_acc", 76.33),
        ("simam_cifar", "resnet18_cifar_stem", "resnet18", "gmacs", 0.556),
    ],
)
def test_spot_values_match_the_papers(paper, table, row, field, value):
    assert reference_value(paper, table, row, field) == value


def test_row_counts_cover_the_papers_tables():
    sizes = {
        ("senet", "imagenet"): 6,
        ("senet", "reduction_ratio"): 5,
        ("senet", "stage"): 4,
        ("senet", "integration"): 4,
        ("senet", "cifar"): 6,
        ("cbam", "imagenet"): 6,
        ("cbam", "spatial_attention"): 4,
        ("eca", "imagenet"): 4,
        ("eca", "no_reduction"): 6,
        ("eca", "kernel_size"): 5,
        ("gcnet", "imagenet_fusion"): 5,
        ("simam_cifar", "cifar"): 8,
    }
    for (paper, table), n in sizes.items():
        assert len(reference_table(paper, table)) == n, (paper, table)


def test_published_numbers_keep_their_printed_decimals():
    gmacs = reference_value("cbam", "imagenet", "resnet50_se", "gmacs")
    assert isinstance(gmacs, Published)
    assert gmacs == 3.86 and gmacs.decimals == 3 and str(gmacs) == "3.860"
    assert reference_value("senet", "imagenet", "resnet50", "gmacs").decimals == 2
    assert pickle.loads(pickle.dumps(gmacs)).decimals == 3
    # load_reference hands out a copy that still knows the precision
    copied = load_reference("cbam")["tables"]["imagenet"]["rows"]["resnet50_se"]["gmacs"]
    assert copied.decimals == 3


def test_agrees_compares_at_the_printed_precision():
    three = Published("3.860")
    assert agrees(3.8605, three) and agrees(3.8596, three)
    assert not agrees(3.8606, three) and not agrees(3.8594, three)
    assert agrees(3.8649, Published("3.86")) and not agrees(3.8651, Published("3.86"))
    assert agrees(7, 7) and not agrees(7.6, 7)


def test_lookups_are_copies():
    rows = reference_table("cbam", "imagenet")
    rows["resnet50"]["params_m"] = 0
    assert reference_value("cbam", "imagenet", "resnet50", "params_m") == 25.56
    load_reference("cbam")["tables"].clear()
    assert reference_table("cbam", "imagenet")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", "imagenet"), "no reference paper 'nope'; available: cbam, eca"),
        (("cbam", "imagenett"), "no table in cbam.yaml: 'imagenett'; available: imagenet,"),
    ],
)
def test_missing_paper_or_table_is_a_clear_key_error(args, message):
    with pytest.raises(KeyError) as info:
        reference_table(*args)
    assert isinstance(info.value, MissingReference)
    assert str(info.value).startswith(message)


def test_missing_row_or_field_names_what_exists():
    with pytest.raises(MissingReference, match=r"row .*'resnet50_xx'; available: resnet18"):
        reference_value("cbam", "imagenet", "resnet50_xx", "gmacs")
    with pytest.raises(MissingReference, match=r"field .*'top1_acc'; available: .*top1_err"):
        reference_value("cbam", "imagenet", "resnet50", "top1_acc")


def test_a_valid_text_parses():
    data = parse_reference(VALID)
    assert data["tables"]["main"]["rows"]["base"]["top1_err"].decimals == 2


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("top1_err: 24.80", "top1_error: 24.80", r"unknown fields \['top1_error'\]"),
        ("top1_err: 24.80", "top1_err: '24.80'", "top1_err must be a number"),
        ("params_m: 25.6}", "params_m: 25.6, params_m: 25.7}", r"\['params_m'\] given twice"),
        ("    source: Table 1\n", "", "table 'main': missing 'source'"),
        ('arxiv: "0000.00000"\n', "", "needs 'arxiv' or 'url'"),
        ("title: A paper\n", "titel: A paper\n", r"unknown keys \['titel'\]"),
        (
            "    rows:\n      base: {backbone: resnet50, top1_err: 24.80, params_m: 25.6}\n",
            "    rows: {}\n",
            "rows must be a non-empty mapping",
        ),
    ],
)
def test_schema_errors_name_the_place(old, new, message):
    assert old in VALID
    with pytest.raises(ReferenceSchemaError, match=message) as info:
        parse_reference(VALID.replace(old, new), name="x.yaml")
    assert str(info.value).startswith("x.yaml")


def test_validate_rejects_a_non_mapping():
    with pytest.raises(ReferenceSchemaError, match="expected a mapping"):
        validate([1, 2])


def test_number_fields_name_their_unit():
    for field, unit in NUMBERS.items():
        assert field.endswith(("_m", "_err", "_acc", "_ap")) or field == "gmacs", field
        assert unit
