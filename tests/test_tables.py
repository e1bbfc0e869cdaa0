"""bench.tables: run records -> md/csv/tex/png tables with the paper's numbers beside ours."""

from __future__ import annotations

import csv
import io
import shutil
import statistics
from pathlib import Path

import pytest

from bench import costs, tables
from bench.records import run_id, write_record
from bench.reference import agrees, reference_table
from bench.variants import Variant

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"

VARIANTS = [
    {"label": "channel -> spatial", "ref": "channel_spatial",
     "match": {"attention.order": "channel_spatial"}},
    {"label": "parallel", "ref": "parallel", "match": {"attention.order": "parallel"}},
]  # fmt: skip


def make_record(
    order, seed, top1, top5, *, protocol="cpu", data="imagenet", status="done", version=None
):
    config = {
        "ablation": "cbam_arrangement",
        "seed": seed,
        "attention": {"block": "cbam", "order": order},
        "model": {"name": "resnet50"},
        "data": {"name": data},
        "protocol": {"name": protocol} | ({"version": version} if version else {}),
        "paper": {"name": "cbam", "table": "arrangement"},
        "source": "CBAM Table 3",
        "variants": VARIANTS,
    }
    done = status == "done"
    return {
        "schema_version": 1,
        "run_id": run_id(config),
        "ablation": "cbam_arrangement",
        "run_name": f"{order}-s{seed}",
        "status": status,
        "config": config,
        "params": 28_089_624,
        "gmacs": 3.8644,
        "top1": top1 if done else None,
        "top5": top5 if done else None,
        "best_top1": top1 + 0.5 if done else None,
        "best_top5": top5 if done else None,
        "epochs": 3,
        "max_epochs": 3,
        "throughput": 100.0 + seed,
        "wall_time_s": 1.0,
        "device": "cpu",
        "versions": {},
        "git_commit": None,
        "started_at": "2024-01-01T00:00:00",
        "finished_at": "2024-01-01T00:01:00",
    }


def write_records(root: Path, records) -> None:
    for record in records:
        write_record(root / "runs" / record["ablation"] / f"{record['run_id']}.json", record)


@pytest.fixture
def synthetic(tmp_path) -> Path:
    records = [
        make_record("channel_spatial", 0, 77.0, 93.0),
        make_record("channel_spatial", 1, 78.0, 94.0),
        make_record("channel_spatial", 2, 79.5, 93.5),
        make_record("parallel", 0, 76.0, 92.0),
        # Neither a failed run nor one under another protocol may enter the cpu table.
        make_record("parallel", 1, 10.0, 20.0, status="failed: boom"),
        make_record("parallel", 0, 50.0, 60.0, protocol="smoke"),
    ]
    write_records(tmp_path, records)
    return tmp_path


def _table(built, setting):
    (table,) = [t for t in built if t.setting == setting]
    return table


def test_a_new_protocol_version_is_its_own_setting(tmp_path):
    """Runs of a protocol's new recipe are never averaged with the old recipe's runs."""
    write_records(
        tmp_path,
        [
            make_record("channel_spatial", 0, 77.0, 93.0),
            make_record("channel_spatial", 0, 88.0, 98.0, version=2),
            make_record("channel_spatial", 1, 89.0, 98.0, version=2),
        ],
    )
    built = tables.build_tables(tables.load_records(tmp_path / "runs"))
    old, new = _table(built, "cpu-imagenet-resnet50"), _table(built, "cpu-v2-imagenet-resnet50")
    assert old.rows[0].top1.n == 1 and old.rows[0].top1.mean == 77.0
    assert new.rows[0].top1.n == 2 and new.rows[0].top1.mean == pytest.approx(88.5)


def test_aggregates_mean_std_n_and_paper_delta(synthetic):
    built = tables.build_tables(tables.load_records(synthetic / "runs"))
    assert sorted(t.setting for t in built) == ["cpu-imagenet-resnet50", "smoke-imagenet-resnet50"]
    table = _table(built, "cpu-imagenet-resnet50")
    first, second = table.rows
    assert first.variant.label == "channel -> spatial"
    assert first.top1.n == 3 and second.top1.n == 1
    assert first.top1.mean == pytest.approx(statistics.fmean([77.0, 78.0, 79.5]))
    assert first.top1.std == pytest.approx(statistics.stdev([77.0, 78.0, 79.5]))
    assert second.top1.std is None  # one seed: no spread to report
    # CBAM prints error 22.66/6.31 and 22.95/6.59: the table shows accuracies.
    assert first.paper["top1"] == pytest.approx(77.34)
    assert second.paper["top5"] == pytest.approx(93.41)
    md = tables.to_markdown(table)
    # 95% CI: 78.1667 ± t(0.975, 2) 4.3027 * 1.2583 / sqrt(3) = ± 3.1258
    assert (
        "| channel -> spatial | 3 | 28.090 | 3.864 | 101 | 78.17 ± 1.26 | [75.04, 81.29] "
        "| 93.50 ± 0.50 |" in md
    )
    assert "| parallel | 1 | 28.090 | 3.864 | 100 | 76.00 |  | 92.00 |" in md  # n = 1: no CI
    assert "Verdict" not in md  # no baseline: no paired columns
    # delta = ours - paper: 78.1667 - 77.34 and 76.0 - 77.05
    assert "| 77.34 | +0.83 |" in md
    assert "| 77.05 | -1.05 |" in md
    rows = list(csv.DictReader(io.StringIO(tables.to_csv(table))))
    assert [r["n"] for r in rows] == ["3", "1"]
    assert rows[0]["top1_std"] == f"{statistics.stdev([77.0, 78.0, 79.5]):.3f}"
    assert rows[0]["delta_top1"] == "+0.827"
    assert rows[0]["best_top1_mean"] == "78.667"
    assert (rows[0]["top1_ci95_low"], rows[0]["top1_ci95_high"]) == ("75.041", "81.292")
    assert rows[0]["verdict"] == rows[0]["baseline"] == ""
    tex = tables.to_latex(table)
    assert r"78.17 $\pm$ 1.26" in tex and r"\toprule" in tex and "cbam\\_arrangement" in tex


def test_no_delta_on_another_dataset(tmp_path):
    write_records(tmp_path, [make_record("parallel", 0, 60.0, 90.0, data="cifar10")])
    (table,) = tables.build_tables(tables.load_records(tmp_path / "runs"))
    assert table.rows[0].dataset is None
    headers = [h for h, _ in tables.columns(table)]
    row = dict(zip(headers, tables.cells(table, table.rows[0]), strict=True))
    assert row["Paper top-1"] == "77.05" and row["Δ top-1 vs paper"] == ""  # no delta across
    assert "No Δ vs paper" in tables.to_markdown(table)  # datasets, and the caption says so


BLOCK_VARIANTS = [
    {"label": "ResNet", "ref": None, "match": {"attention.block": "none"}},
    {"label": "+ SE", "ref": None, "match": {"attention.block": "se"}},
    {"label": "+ CBAM", "ref": None, "match": {"attention.block": "cbam"}},
]


def block_record(block, seed, top1, *, baseline=None, model="resnet20_cifar", variants=None):
    record = make_record("channel_spatial", seed, top1, 95.0, data="cifar10")
    config = record["config"]
    config.update(ablation="cifar_blocks", variants=variants or BLOCK_VARIANTS, paper=None)
    config["attention"] = {"block": block}
    config["model"] = {"name": model}
    if baseline is not None:
        config["baseline"] = baseline
    record.update(ablation="cifar_blocks", run_id=run_id(config), params=270_000 + len(block))
    return record


def paired_table(tmp_path, records):
    write_records(tmp_path, records)
    (table,) = tables.build_tables(tables.load_records(tmp_path / "runs"))
    return table, {row.variant.label: row for row in table.rows}


def test_rows_are_compared_with_the_baseline_paired_by_seed(tmp_path):
    base = {0: 80.0, 1: 81.0, 2: 79.0, 3: 80.5}
    se = {0: 81.0, 1: 82.5, 2: 80.5}  # +1.0, +1.5, +1.5: seed 3 has no SE run
    cbam = {0: 78.0, 1: 82.0, 2: 79.5}  # -2.0, +1.0, +0.5
    records = [block_record("none", s, v) for s, v in base.items()]
    records += [block_record("se", s, v) for s, v in se.items()]
    records += [block_record("cbam", s, v) for s, v in cbam.items()]
    table, rows = paired_table(tmp_path, records)
    assert rows["ResNet"].is_baseline and rows["ResNet"].verdict == "baseline"
    delta = rows["+ SE"].delta
    # mean 4/3, s = sqrt(1/12), 95% CI ± t(0.975, 2) 4.3027 * s / sqrt(3) = ± 0.7171
    assert delta.n == 3 and delta.mean == pytest.approx(4 / 3)
    assert (delta.low, delta.high) == pytest.approx((0.61622, 2.05045), abs=1e-5)
    assert rows["+ SE"].verdict == "above the baseline beyond seed noise"
    assert rows["+ CBAM"].verdict == "within noise"
    md = tables.to_markdown(table)
    assert "| Δ top-1 vs baseline [95% CI] | Verdict |" in md
    assert "| +1.33 [+0.62, +2.05] | above the baseline beyond seed noise |" in md
    assert "ours - the baseline, ResNet, paired by seed" in md
    assert "Paper top-1" not in md  # no paper numbers: no paper columns
    csv_rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(tables.to_csv(table)))}
    assert csv_rows["+ SE"]["n_pairs"] == "3" and csv_rows["+ SE"]["baseline"] == "ResNet"
    assert csv_rows["+ SE"]["delta_baseline_ci95_low"] == "+0.616"
    tex = tables.to_latex(table)
    assert "+1.33 [+0.62, +2.05] & above the baseline beyond seed noise" in tex
    assert "(CI $>$ 0)" in tex  # a bare > prints as ¿ in LaTeX's default encoding


@pytest.mark.parametrize(
    ("diffs", "verdict"),
    [([-1.0, -1.5, -1.5], "below the baseline"), ([2.0], "n too small"), ([], "n too small")],
)
def test_verdicts_below_and_too_few_pairs(tmp_path, diffs, verdict):
    records = [block_record("none", s, 80.0) for s in range(3)]
    records += [block_record("se", s, 80.0 + d) for s, d in enumerate(diffs)]
    records += [block_record("cbam", 9, 70.0)]  # seed 9: no baseline run to pair with
    _, rows = paired_table(tmp_path, records)
    if diffs:
        assert rows["+ SE"].verdict == verdict
    assert rows["+ CBAM"].verdict == "n too small" and rows["+ CBAM"].delta.n == 0


def test_the_ablation_names_its_baseline(tmp_path):
    records = [block_record(b, s, 80.0 + s + i, baseline="+ SE")
               for i, b in enumerate(("none", "se")) for s in range(2)]  # fmt: skip
    _, rows = paired_table(tmp_path, records)
    assert rows["+ SE"].is_baseline and rows["ResNet"].baseline.label == "+ SE"
    assert rows["ResNet"].delta.mean == pytest.approx(-1.0)


def test_a_baseline_that_is_no_variant_is_named(tmp_path):
    write_records(tmp_path, [block_record("none", 0, 80.0, baseline="ResNet-20")])
    with pytest.raises(ValueError, match=r"baseline 'ResNet-20' is not a variant label.*'\+ SE'"):
        tables.build_tables(tables.load_records(tmp_path / "runs"))


def test_one_baseline_per_backbone_without_a_baseline_key(tmp_path):
    variants = [
        {"label": f"{m} {b}", "ref": None, "match": {"model.name": m, "attention.block": b}}
        for m in ("resnet18", "resnet50")
        for b in ("none", "se")
    ]
    records = []
    for m in ("resnet18", "resnet50"):
        for b, top1 in (("none", 70.0), ("se", 71.0)):
            for seed in range(2):
                value = top1 + 5 * (m == "resnet50") + seed
                records.append(block_record(b, seed, value, model=m, variants=variants))
    _, rows = paired_table(tmp_path, records)
    assert rows["resnet50 se"].baseline.label == "resnet50 none"
    assert rows["resnet18 se"].baseline.label == "resnet18 none"
    assert rows["resnet50 se"].delta.mean == pytest.approx(1.0)


def test_no_baseline_row_means_no_paired_columns(synthetic):
    built = tables.build_tables(tables.load_records(synthetic / "runs"))
    table = _table(built, "cpu-imagenet-resnet50")
    assert all(row.baseline is None and row.delta is None for row in table.rows)
    assert "Δ top-1 vs baseline" not in tables.to_latex(table)


def test_readme_opens_with_a_headline_per_trained_table(tmp_path):
    records = [block_record("none", s, 80.0 + s) for s in range(3)]
    records += [block_record("se", s, 81.0 + s + 0.1 * (s == 1)) for s in range(3)]
    write_records(tmp_path, records)
    tables.make_tables(tmp_path, plots=False)
    readme = (tmp_path / "README.md").read_text()
    headlines = readme.split("## Headlines")[1].split("\n## ")[0]
    line = next(x for x in headlines.splitlines() if x.startswith("- **cifar_blocks**"))
    assert "best top-1 + SE, 82.03 ± 1.00 (n = 3)" in line
    assert "Δ +1.03 [95% CI +0.89, +1.18] vs ResNet: above the baseline beyond seed noise" in line
    assert line.endswith("; 0.270M params, 3.864 GMACs.")
    assert readme.index("## Headlines") < readme.index("## cifar_blocks")


def test_command_line_takes_runs_and_out_folders(synthetic, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert tables.main(["--runs", str(synthetic / "runs"), "--out", str(out), "--no-plots"]) == 0
    assert (out / "cbam_arrangement" / "cpu-imagenet-resnet50.md").is_file()
    assert "[md](cbam_arrangement/cpu-imagenet-resnet50.md)" in (out / "README.md").read_text()
    assert not (tmp_path / "README.md").exists()
    # --results alone still rebuilds <results>/tables and <results>/README.md.
    assert tables.main(["--results", str(synthetic), "--no-plots"]) == 0
    assert (synthetic / "tables" / "cbam_arrangement" / "cpu-imagenet-resnet50.csv").is_file()
    assert (synthetic / "README.md").is_file()
    capsys.readouterr()

    assert tables.main(["--runs", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no run records folder at {tmp_path / 'nope'}" in err and len(err.splitlines()) == 1
    # An --out folder holding other files is refused, and nothing in it is deleted.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a").mkdir()
    (tmp_path / "notes" / "a" / "keep.md").write_text("mine")
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert tables.main(["--results", str(synthetic), "--out", str(tmp_path / "notes")]) == 2
    assert "not tables" in capsys.readouterr().err
    assert (tmp_path / "notes" / "a" / "keep.md").read_text() == "mine"


def test_written_files_are_deterministic(synthetic, tmp_path):
    first = tables.make_tables(synthetic, out_dir=tmp_path / "a", readme=tmp_path / "a.md")
    second = tables.make_tables(synthetic, out_dir=tmp_path / "b", readme=tmp_path / "b.md")
    assert len(first) == len(second) == 2
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    expected = {f"cbam_arrangement/{s}.{x}" for s in ("cpu-imagenet-resnet50",
                "smoke-imagenet-resnet50") for x in ("md", "csv", "tex", "top1.png",
                "top1_vs_gmacs.png")}  # fmt: skip
    assert {str(n) for n in names} == expected
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    readme = (tmp_path / "a.md").read_text()
    assert "a/cbam_arrangement/cpu-imagenet-resnet50.md" in readme


def test_stale_tables_are_removed(synthetic, tmp_path):
    out = tmp_path / "out"
    tables.make_tables(synthetic, out_dir=out, readme=tmp_path / "README.md", plots=False)
    shutil.rmtree(synthetic / "runs")
    (synthetic / "runs").mkdir()
    tables.make_tables(synthetic, out_dir=out, readme=tmp_path / "README.md", plots=False)
    assert not list(out.rglob("*.md"))
    assert "No run records yet." in (tmp_path / "README.md").read_text()


def test_cost_only_records_make_a_cost_table(tmp_path):
    assert costs.main(["--results", str(tmp_path), "--ablation", "se_stage", "--no-plots"]) == 0
    assert len(list((tmp_path / "runs" / "se_stage").glob("*.json"))) == 4
    # A second call finds the records and writes nothing (resume).
    assert costs.write_cost_records(tmp_path / "runs", ["se_stage"], progress=False) == []
    (table,) = tables.make_tables(tmp_path, plots=False)
    assert table.cost_only and table.setting == "cost"
    rows = list(csv.DictReader(io.StringIO((tmp_path / "tables/se_stage/cost.csv").read_text())))
    assert [r["paper_row"] for r in rows] == ["se_stage_2", "se_stage_3", "se_stage_4", "se_all"]
    assert float(rows[-1]["params_m"]) == pytest.approx(28.088, abs=1e-3)  # SE-ResNet-50


def test_cost_only_names_an_unknown_ablation_before_any_work(tmp_path, capsys):
    assert costs.main(["--results", str(tmp_path), "--ablation", "se_stage", "nope"]) == 2
    assert "unknown ablation 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # se_stage was not profiled either


# --- the committed tables --------------------------------------------------------------


def committed(path: str) -> Path:
    full = RESULTS / path
    if not full.exists():
        pytest.fail(f"{full} is not committed: run `make costs` (python -m bench.costs) "
                    "and commit results/")  # fmt: skip
    return full


def close_to_paper(ours: float, paper) -> bool:
    """At the paper's printed precision, or within 0.4%: SENet's Table 10 prints
    35.7/30.7/26.9M for r=4/8/32 where a count gives 35.64/30.60/26.83M (its other rows
    agree to the digit), and Table 13's 26.4M for stage 4 is 26.350M."""
    return agrees(ours, paper) or abs(ours - paper) <= 0.004 * paper


@pytest.mark.parametrize(
    ("ablation", "paper", "table"),
    [("se_reduction", "senet", "reduction_ratio"), ("se_stage", "senet", "stage"),
     ("cbam_backbones", "cbam", "imagenet")],
)  # fmt: skip
def test_committed_cost_tables_match_the_papers(ablation, paper, table):
    rows = list(csv.DictReader(io.StringIO(committed(f"tables/{ablation}/cost.csv").read_text())))
    published = reference_table(paper, table)
    checked = 0
    for row in rows:
        ref = published.get(row["paper_row"])
        if ref is None:
            continue
        if "params_m" in ref:
            assert close_to_paper(float(row["params_m"]), ref["params_m"]), row
            checked += 1
        if "gmacs" in ref:
            assert agrees(float(row["gmacs"]), ref["gmacs"]) or abs(
                float(row["gmacs"]) - ref["gmacs"]) <= 6e-4, row  # fmt: skip
            checked += 1
    assert checked >= 4


def test_committed_tables_equal_a_rebuild(tmp_path):
    """`make tables` from the committed records reproduces the committed md/csv/tex and
    README byte for byte (PNGs are left out: pixels may move with matplotlib's version)."""
    committed("README.md")
    shutil.copytree(RESULTS / "runs", tmp_path / "runs")
    shutil.copytree(RESULTS / "reference", tmp_path / "reference")
    tables.make_tables(tmp_path, plots=False)
    ours = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in (".md", ".csv",
            ".tex") and "runs" not in p.parts and "reference" not in p.parts}  # fmt: skip
    # What make tables writes: tables/ and the index (figures/, analysis/ are other tools').
    theirs = {p.relative_to(RESULTS) for p in (RESULTS / "tables").rglob("*")
              if p.suffix in (".md", ".csv", ".tex")} | {Path("README.md")}  # fmt: skip
    assert ours == theirs
    for name in sorted(ours):
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name


def test_rows_from_several_commits_say_so(tmp_path):
    one = {**make_record("parallel", 0, 60.0, 90.0), "git_commit": "a" * 40}
    other = {**make_record("parallel", 1, 61.0, 90.0), "git_commit": "b" * 40}
    write_records(tmp_path, [one])
    (table,) = tables.build_tables(tables.load_records(tmp_path / "runs"))
    assert "commits" not in tables.to_markdown(table)
    write_records(tmp_path, [other])
    (table,) = tables.build_tables(tables.load_records(tmp_path / "runs"))
    assert "Runs from 2 commits (aaaaaaa, bbbbbbb)" in tables.to_markdown(table)
    assert tables.to_csv(table).splitlines()[1].endswith("aaaaaaa bbbbbbb")


def test_rows_at_several_precisions_say_so(tmp_path):
    def at(precision, seed):
        record = make_record("parallel", seed, 60.0 + seed, 90.0)
        record["config"]["trainer"] = {"precision": precision}
        record["run_id"] = run_id(record["config"])
        return record

    write_records(tmp_path, [at("bf16-mixed", 0), at("bf16-mixed", 1)])
    (table,) = tables.build_tables(tables.load_records(tmp_path / "runs"))
    assert "precisions" not in tables.to_markdown(table)
    write_records(tmp_path, [at("32-true", 2)])
    (table,) = tables.build_tables(tables.load_records(tmp_path / "runs"))
    assert "Runs at 2 precisions (32-true, bf16-mixed)" in tables.to_markdown(table)


def test_paper_numbers_only_in_the_papers_setting(tmp_path):
    """A plain ref applies in paper.settings; a mapping picks the paper's row per setting."""

    def record(protocol, model, seed=0):
        r = make_record("parallel", seed, 60.0, 90.0, protocol=protocol)
        config = r["config"]
        config["model"] = {"name": model}
        config["paper"] = {**config["paper"], "settings": ["imagenet-imagenet-resnet50"]}
        r["run_id"] = run_id(config)
        return r

    write_records(tmp_path, [record("imagenet", "resnet50"), record("cpu", "resnet50", 1)])
    by_setting = {t.setting: t for t in tables.build_tables(tables.load_records(tmp_path / "runs"))}
    assert by_setting["imagenet-imagenet-resnet50"].rows[0].paper["top1"] == 77.05
    assert by_setting["cpu-imagenet-resnet50"].rows[0].paper == {}

    variant = Variant("x", {"cifar-cifar10-resnet56_cifar": "resnet56_se"}, {})
    assert variant.ref_in("cifar-cifar10-resnet56_cifar", []) == "resnet56_se"
    assert variant.ref_in("cpu-cifar10-resnet20_cifar", []) is None
    plain = Variant("x", "r16", {})
    assert plain.ref_in("imagenet-imagenet-resnet50", ["imagenet-imagenet-resnet50"]) == "r16"
    assert plain.ref_in("cpu-cifar10-resnet20_cifar", ["imagenet-imagenet-resnet50"]) is None
