"""Tables and plots from run records, with the papers' numbers beside ours.

    python -m bench.tables [--results results] [--runs DIR] [--out DIR] [--readme FILE]
                           [--no-plots]

Everything is rebuilt from ``<results>/runs/<ablation>/*.json`` alone, so the committed
tables can be proven equal to what ``make tables`` produces: rows are sorted the same way
every time, floats have fixed formats, and nothing carries a timestamp.

How a record becomes a table row. The ablation file (``experiments/ablation/<name>.yaml``)
is part of every run's resolved config, and with it:

- ``variants``: the table's rows, in order; each ``{label, ref, match}`` where ``match``
  maps dotted config paths to the values that pick the runs of that row, and ``ref`` is the
  row key of the paper's table, keyed by setting (``bench.variants.paper_row``: a row
  shows the paper's number only in the paper's setting);
- ``paper``: ``{name, table, protocol, settings}``, the file and table in
  ``results/reference`` and the settings its numbers are for.

Runs of one ablation under different settings (protocol, data, backbone when it is not an
axis) are never averaged together: each setting gets its own table, named after it
(``results/tables/<ablation>/<setting>.md``). Cost-only records (``status: cost-only``,
written by ``python -m bench.costs``) make ``results/tables/<ablation>/cost.md``.

Accuracies are top-1/top-5 accuracy in %, final epoch, as mean +- sample std over seeds
with n, and top-1's 95% confidence interval (Student t, n - 1 degrees of freedom; none for
n = 1). A paper's error rates are shown as accuracies (100 - err); the delta (ours -
paper) is only printed when our runs used the paper's dataset, since anything else
compares different tasks.

Each row is also compared with the ablation's baseline row, paired by seed (``bench.stats``):
the mean and 95% interval of the per-seed differences of top-1, and a verdict (above the
baseline beyond seed noise, within noise, below the baseline, n too small). The baseline
is the variant the ablation names in its top-level ``baseline: <label>``; without one, the
variant whose ``match`` has ``attention.block: none`` (where there are several, such as one
per backbone, each row is compared with the one that agrees with it on every other key of
``match``); without either, there are no paired columns. ``results/README.md`` opens with
a headline per trained table: the best row, its difference to the baseline, its cost.

PNGs are written with the Agg backend and without the ``Software`` metadata; they are
deterministic for a given matplotlib version, but the byte-equality test of the committed
tables covers md/csv/tex/README only (a matplotlib upgrade may change pixels).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.records import COST_ONLY, load_records
from bench.stats import (
    ABOVE,
    BELOW,
    CONFIDENCE,
    Summary,
    paired_differences,
    summarize,
    t_interval,
    verdict,
)
from bench.variants import (
    Variant,
    config_value,
    paper_row,
    same_value,
    setting_of,
    variants_of,
)

# --- reading records -------------------------------------------------------------------


# --- aggregation ------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean, sample std and count of one quantity over seeds."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n >= 2 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% Student-t interval of the mean (None for n < 2)."""
        return t_interval(self.values, CONFIDENCE)


@dataclass
class Row:
    """One variant of one table: our runs aggregated, and the paper's numbers."""

    variant: Variant
    params: Stat = field(default_factory=Stat)
    gmacs: Stat = field(default_factory=Stat)
    throughput: Stat = field(default_factory=Stat)
    top1: Stat = field(default_factory=Stat)
    top5: Stat = field(default_factory=Stat)
    best_top1: Stat = field(default_factory=Stat)
    best_top5: Stat = field(default_factory=Stat)
    paper: dict = field(default_factory=dict)
    ref: str | None = None  # the paper's row in this table's setting
    commits: set = field(default_factory=set)  # the code versions its runs came from
    precisions: set = field(default_factory=set)  # trainer.precision of its runs
    datasets: set = field(default_factory=set)
    # Our runs' dataset where it is the paper's (so a delta means something), else None.
    dataset: str | None = None
    # seed -> its runs' top-1 (one per seed unless a seed was run twice)
    top1_by_seed: dict = field(default_factory=dict)
    # The row this one is compared with (itself for the baseline row), None if none.
    baseline: Variant | None = None
    delta: Summary | None = None  # paired top-1 differences to the baseline
    verdict: str = ""

    def add(self, record: Mapping) -> None:
        self.datasets.add(str(config_value(record["config"], "data.name")))
        self.commits.add(record.get("git_commit") or "unknown")
        precision = config_value(record["config"], "trainer.precision")
        if precision is not None:
            self.precisions.add(str(precision))
        for name in ("params", "gmacs", "throughput", "top1", "top5", "best_top1", "best_top5"):
            value = record.get(name)
            if value is not None:
                getattr(self, name).values.append(float(value))
        seed = config_value(record["config"], "seed")
        if record.get("top1") is not None and seed is not None:
            self.top1_by_seed.setdefault(seed, []).append(float(record["top1"]))

    @property
    def is_baseline(self) -> bool:
        return self.baseline is not None and self.baseline.label == self.variant.label


@dataclass
class Table:
    """One ablation under one setting (or its cost-only table)."""

    ablation: str
    setting: str
    cost_only: bool
    source: str
    paper_name: str | None
    paper_table: str | None
    rows: list[Row]
    unmatched: int = 0

    @property
    def stem(self) -> str:
        return f"{self.ablation}/{self.setting}"


def _paper_rows(paper: str | None, table: str | None) -> tuple[dict, str | None]:
    if not paper or not table:
        return {}, None
    from bench.reference import MissingReference, load_reference

    try:
        data = load_reference(paper)
    except MissingReference as err:
        warnings.warn(f"no paper numbers: {err}", stacklevel=3)
        return {}, None
    if table not in data["tables"]:
        warnings.warn(f"no paper numbers: {paper}.yaml has no table {table!r}", stacklevel=3)
        return {}, None
    spec = data["tables"][table]
    return {k: dict(v) for k, v in spec["rows"].items()}, spec.get("dataset")


def paper_numbers(row: Mapping, dataset: str | None) -> dict:
    """The paper's params, GMACs and top-1/top-5 accuracy (%) for ``dataset``; None if absent.

    Error rates become accuracies; CIFAR tables pick the column of ``dataset``
    (``cifar10_*`` or ``cifar100_*``).
    """

    def accuracy(acc_key: str, err_key: str):
        if acc_key in row:
            return float(row[acc_key])
        if err_key in row:
            return round(100.0 - float(row[err_key]), 10)
        return None

    if dataset and dataset.startswith("cifar"):
        top1, top5 = accuracy(f"{dataset}_acc", f"{dataset}_err"), None
    else:
        top1, top5 = accuracy("top1_acc", "top1_err"), accuracy("top5_acc", "top5_err")
    return {
        "params_m": float(row["params_m"]) if "params_m" in row else None,
        "gmacs": float(row["gmacs"]) if "gmacs" in row else None,
        "top1": top1,
        "top5": top5,
    }


def _comparable(ours: str | None, paper: str | None) -> bool:
    """Whether our dataset is the paper table's (so an accuracy delta means something)."""
    if not ours or not paper:
        return False
    ours, paper = ours.lower(), paper.lower()
    return ours == paper or (paper == "cifar" and ours in ("cifar10", "cifar100"))


def baselines_of(config: Mapping, variants: Sequence[Variant]) -> dict[str, Variant | None]:
    """Variant label -> the variant it is compared with (see the module docstring)."""
    label = config.get("baseline")
    if label is not None:
        named = [v for v in variants if v.label == str(label)]
        if not named:
            labels = [v.label for v in variants]
            raise ValueError(
                f"{config.get('ablation')}: baseline {label!r} is not a variant label; "
                f"the variants are {labels}"
            )
        return {v.label: named[0] for v in variants}
    plain = [v for v in variants if same_value(v.match.get("attention.block"), "none")]

    def rest(variant: Variant) -> dict:
        return {k: x for k, x in variant.match.items() if not k.startswith("attention.")}

    out: dict[str, Variant | None] = {}
    for variant in variants:
        if len(plain) == 1:
            out[variant.label] = plain[0]
            continue
        mine = rest(variant)
        same = [
            c
            for c in plain
            if rest(c).keys() == mine.keys() and all(same_value(rest(c)[k], mine[k]) for k in mine)
        ]
        out[variant.label] = same[0] if len(same) == 1 else None
    return out


def _per_seed(row: Row, where: str) -> dict:
    """seed -> top-1 of a row; a seed run more than once counts with its mean."""
    twice = sorted(str(s) for s, values in row.top1_by_seed.items() if len(values) > 1)
    if twice:
        warnings.warn(
            f"{where}: {row.variant.label!r} has several runs of seed(s) {twice}; "
            "each seed's mean is paired with the baseline",
            stacklevel=3,
        )
    return {s: statistics.fmean(v) for s, v in row.top1_by_seed.items()}


def compare_with_baselines(rows: Sequence[Row], config: Mapping, where: str) -> None:
    """Fill in each row's baseline, paired difference and verdict."""
    baselines = baselines_of(config, [row.variant for row in rows])
    by_label = {row.variant.label: row for row in rows}
    for row in rows:
        row.baseline = baselines.get(row.variant.label)
        if row.baseline is None or row.is_baseline:
            row.verdict = "baseline" if row.is_baseline else ""
            continue
        base = by_label[row.baseline.label]
        diffs = paired_differences(_per_seed(row, where), _per_seed(base, where))
        row.delta = summarize(list(diffs.values()))
        row.verdict = verdict(row.delta)


def build_tables(records: Iterable[Mapping]) -> list[Table]:
    """Group records by ablation and setting, and aggregate them into tables (sorted)."""
    groups: dict[tuple[str, str, bool], list[Mapping]] = defaultdict(list)
    for record in records:
        status = record.get("status")
        cost_only = status == COST_ONLY
        if status != "done" and not cost_only:
            continue
        config = record["config"]
        setting = "cost" if cost_only else setting_of(config)
        groups[record["ablation"], setting, cost_only].append(record)

    tables = []
    for (ablation, setting, cost_only), members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r["run_id"])
        config = members[0]["config"]
        variants = variants_of(config)
        paper = config.get("paper") or {}
        paper_rows, paper_dataset = _paper_rows(paper.get("name"), paper.get("table"))
        rows = [Row(v) for v in variants]
        unmatched = 0
        for record in members:
            hits = [row for row in rows if row.variant.matches(record["config"])]
            if len(hits) != 1:
                unmatched += 1
                continue
            hits[0].add(record)
        for row in rows:
            ours = next(iter(row.datasets)) if len(row.datasets) == 1 else None
            row.dataset = ours if _comparable(ours, paper_dataset) else None
            # The paper's row in this table's setting (none outside the paper's settings).
            row.ref = ref = paper_row(config, row.variant)
            if ref and ref in paper_rows:
                row.paper = paper_numbers(paper_rows[ref], row.dataset or paper_dataset)
            elif ref and paper_rows:
                warnings.warn(f"{ablation}: paper table has no row {ref!r}", stacklevel=2)
        if unmatched:
            warnings.warn(
                f"{ablation} ({setting}): {unmatched} record(s) match no single variant",
                stacklevel=2,
            )
        if not cost_only:
            compare_with_baselines(rows, config, f"{ablation} ({setting})")
        tables.append(
            Table(
                ablation=ablation,
                setting=setting,
                cost_only=cost_only,
                source=str(config.get("source", "")).strip(),
                paper_name=paper.get("name"),
                paper_table=paper.get("table"),
                rows=[row for row in rows if row.params.n or row.top1.n],
                unmatched=unmatched,
            )
        )
    return tables


# --- formatting -------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def fmt_signed(value: float | None, digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.00 into +0.00


def fmt_delta(ours: float | None, paper: float | None, digits: int = 2) -> str:
    if ours is None or paper is None:
        return ""
    return fmt_signed(ours - paper, digits)


def fmt_stat(stat: Stat, digits: int = 2, pm: str = " ± ") -> str:
    if stat.mean is None:
        return ""
    if stat.std is None:
        return fmt(stat.mean, digits)
    return f"{stat.mean:.{digits}f}{pm}{stat.std:.{digits}f}"


def fmt_interval(interval: tuple[float, float] | None, digits: int = 2, signed=False) -> str:
    if interval is None:
        return ""
    show = fmt_signed if signed else fmt
    return f"[{show(interval[0], digits)}, {show(interval[1], digits)}]"


def fmt_paired(delta: Summary | None, digits: int = 2) -> str:
    """A paired difference: ``+0.52 [-0.10, +1.14]``, or its mean alone for one pair."""
    if delta is None or delta.mean is None:
        return ""
    text = fmt_signed(delta.mean, digits)
    if delta.low is not None and delta.high is not None:
        text += " " + fmt_interval((delta.low, delta.high), digits, signed=True)
    return text


def _params_m(stat: Stat) -> float | None:
    return None if stat.mean is None else stat.mean / 1e6


def _has_baseline(table: Table) -> bool:
    return any(row.baseline is not None for row in table.rows)


def _has_paper(table: Table) -> bool:
    return any(row.paper.get(k) is not None for row in table.rows for k in ("top1", "top5"))


def columns(table: Table) -> list[tuple[str, str]]:
    """(header, key) pairs of the table's md/tex columns. Trained tables leave out the
    paired columns where there is no baseline, and the paper's where it has no numbers."""
    if table.cost_only:
        return [
            ("Variant", "variant"),
            ("Params (M)", "params_m"),
            ("GMACs", "gmacs"),
            ("Paper params (M)", "paper_params_m"),
            ("Δ params (M)", "delta_params_m"),
            ("Paper GMACs", "paper_gmacs"),
            ("Δ GMACs", "delta_gmacs"),
        ]
    out = [
        ("Variant", "variant"),
        ("n", "n"),
        ("Params (M)", "params_m"),
        ("GMACs", "gmacs"),
        ("img/s", "throughput"),
        ("Top-1 (%)", "top1"),
        ("95% CI", "top1_ci"),
    ]
    if _has_baseline(table):
        out += [("Δ top-1 vs baseline [95% CI]", "delta_baseline"), ("Verdict", "verdict")]
    out.append(("Top-5 (%)", "top5"))
    if _has_paper(table):
        out += [
            ("Paper top-1", "paper_top1"),
            ("Δ top-1 vs paper", "delta_top1"),
            ("Paper top-5", "paper_top5"),
            ("Δ top-5 vs paper", "delta_top5"),
        ]
    return out


def _cell_values(table: Table, row: Row, pm: str) -> dict[str, str]:
    paper = row.paper
    params = _params_m(row.params)
    gmacs = row.gmacs.mean
    if table.cost_only:
        return {
            "variant": row.variant.label,
            "params_m": fmt(params, 3),
            "gmacs": fmt(gmacs, 3),
            "paper_params_m": fmt(paper.get("params_m")),
            "delta_params_m": fmt_delta(params, paper.get("params_m")),
            "paper_gmacs": fmt(paper.get("gmacs"), 3),
            "delta_gmacs": fmt_delta(gmacs, paper.get("gmacs"), 3),
        }
    compare = row.dataset is not None
    return {
        "variant": row.variant.label,
        "n": str(row.top1.n),
        "params_m": fmt(params, 3),
        "gmacs": fmt(gmacs, 3),
        "throughput": fmt(row.throughput.mean, 0),
        "top1": fmt_stat(row.top1, pm=pm),
        "top1_ci": fmt_interval(row.top1.interval),
        "delta_baseline": fmt_paired(row.delta),
        "verdict": row.verdict,
        "top5": fmt_stat(row.top5, pm=pm),
        "paper_top1": fmt(paper.get("top1")),
        "delta_top1": fmt_delta(row.top1.mean, paper.get("top1")) if compare else "",
        "paper_top5": fmt(paper.get("top5")),
        "delta_top5": fmt_delta(row.top5.mean, paper.get("top5")) if compare else "",
    }


def cells(table: Table, row: Row, pm: str = " ± ") -> list[str]:
    """Formatted cells of one row, in ``columns`` order."""
    values = _cell_values(table, row, pm)
    return [values[key] for _, key in columns(table)]


def csv_values(table: Table, row: Row) -> list[str]:
    """Unformatted-but-fixed-precision values for the CSV (mean and std apart). The CSV
    keeps every column in every table, empty where there is nothing to show."""
    paper = row.paper
    params = _params_m(row.params)
    base = [row.variant.label, row.ref or ""]
    if table.cost_only:
        return base + [
            fmt(params, 4),
            fmt(row.gmacs.mean, 4),
            fmt(paper.get("params_m")),
            fmt(paper.get("gmacs"), 3),
        ]
    compare = row.dataset is not None
    interval = row.top1.interval or (None, None)
    delta = row.delta or Summary(0, None, None, None, None)
    return base + [
        str(row.top1.n),
        fmt(params, 4),
        fmt(row.gmacs.mean, 4),
        fmt(row.throughput.mean, 1),
        fmt(row.top1.mean, 3),
        fmt(row.top1.std, 3),
        fmt(interval[0], 3),
        fmt(interval[1], 3),
        fmt(row.top5.mean, 3),
        fmt(row.top5.std, 3),
        fmt(row.best_top1.mean, 3),
        fmt(row.best_top5.mean, 3),
        fmt(paper.get("top1")),
        fmt(paper.get("top5")),
        fmt_delta(row.top1.mean, paper.get("top1"), 3) if compare else "",
        fmt_delta(row.top5.mean, paper.get("top5"), 3) if compare else "",
        row.baseline.label if row.baseline else "",
        str(delta.n) if row.delta else "",
        fmt_signed(delta.mean, 3),
        fmt(delta.std, 3),
        fmt_signed(delta.low, 3),
        fmt_signed(delta.high, 3),
        row.verdict,
        " ".join(sorted(c[:7] for c in row.commits)),
    ]


def csv_header(table: Table) -> list[str]:
    base = ["variant", "paper_row"]
    if table.cost_only:
        return base + ["params_m", "gmacs", "paper_params_m", "paper_gmacs"]
    return base + [
        "n",
        "params_m",
        "gmacs",
        "throughput",
        "top1_mean",
        "top1_std",
        "top1_ci95_low",
        "top1_ci95_high",
        "top5_mean",
        "top5_std",
        "best_top1_mean",
        "best_top5_mean",
        "paper_top1",
        "paper_top5",
        "delta_top1",
        "delta_top5",
        "baseline",
        "n_pairs",
        "delta_baseline_mean",
        "delta_baseline_std",
        "delta_baseline_ci95_low",
        "delta_baseline_ci95_high",
        "verdict",
        "commits",
    ]


def _baseline_caption(table: Table) -> str:
    labels = {row.baseline.label for row in table.rows if row.baseline is not None}
    whom = (
        f"the baseline, {next(iter(labels))}"
        if len(labels) == 1
        else "each row's baseline (the row without attention that agrees with it on every "
        "other axis)"
    )
    return (
        f"Δ vs baseline: ours - {whom}, paired by seed: mean and 95% CI of the per-seed "
        "differences. Verdict: above the baseline beyond seed noise (CI > 0), within noise "
        "(CI contains 0), below the baseline (CI < 0), n too small (fewer than 2 pairs)."
    )


def _caption(table: Table) -> list[str]:
    lines = []
    if table.source:
        lines.append(f"Source: {table.source}")
    if table.paper_name:
        lines.append(
            f"Paper numbers: `results/reference/{table.paper_name}.yaml`, "
            f"table `{table.paper_table}`."
        )
    if table.cost_only:
        lines.append(
            "Cost only (no training): params and GMACs of one forward pass, "
            "batch 1, at the paper's input size."
        )
    else:
        lines.append(
            "Accuracy: final epoch, mean ± sample std over n seeds; 95% CI of the mean: "
            "Student t, n - 1 degrees of freedom (none for n = 1)."
        )
        if _has_baseline(table):
            lines.append(_baseline_caption(table))
        if _has_paper(table):
            lines.append(
                "Δ vs paper = ours - paper."
                if any(row.dataset for row in table.rows)
                else "No Δ vs paper: our runs did not use the paper's dataset."
            )
        commits = sorted({c for row in table.rows for c in row.commits})
        if len(commits) > 1:
            # Code changes between runs can move a number by more than seed noise does.
            lines.append(
                f"Runs from {len(commits)} commits ("
                + ", ".join(c[:7] for c in commits)
                + "): rows may differ by code as well as by variant; see the CSV's commits."
            )
        precisions = sorted({p for row in table.rows for p in row.precisions})
        if len(precisions) > 1:
            # precision: auto follows the machine (bf16-mixed where the CPU has native
            # bf16), so one protocol's table can gather runs made at different precisions.
            lines.append(
                f"Runs at {len(precisions)} precisions ({', '.join(precisions)}): "
                "rows may differ by numerics as well as by variant; see each run's record."
            )
    if table.unmatched:
        lines.append(f"{table.unmatched} record(s) matched no variant and are left out.")
    return lines


def to_markdown(table: Table) -> str:
    header = [h for h, _ in columns(table)]
    title = f"# {table.ablation}" + ("" if table.cost_only else f" ({table.setting})")
    if table.cost_only:
        title += " (cost)"
    out = [title, ""]
    out += [line + "  " for line in _caption(table)]
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        out.append("| " + " | ".join(cells(table, row)) + " |")
    return "\n".join(out) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(table))
    for row in table.rows:
        writer.writerow(csv_values(table, row))
    return buffer.getvalue()


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "<": r"$<$",  # text-mode < and > print as ¡ and ¿ in LaTeX's default (OT1) encoding
    ">": r"$>$",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def to_latex(table: Table) -> str:
    header = [h for h, _ in columns(table)]
    spec = "l" + "r" * (len(header) - 1)
    out = [
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{"
        + tex_escape(f"{table.ablation} ({table.setting}). " + " ".join(_caption(table)))
        + "}",
        r"\label{tab:" + f"{table.ablation}-{table.setting}" + "}",
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        out.append(" & ".join(tex_escape(c) for c in cells(table, row)) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# --- plots ------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    # No Software/date metadata, so the same numbers give the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None})


MARKERS = "osD^vP*Xph<>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_accuracy_vs_gmacs(table: Table, path: Path) -> None:
    """Top-1 (mean ± std over seeds) against GMACs, one marker and colour per variant,
    named in a legend: variants often differ in GMACs by less than a label's width, so
    labels written beside the points collide."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    rows = [r for r in table.rows if r.top1.mean is not None and r.gmacs.mean is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    for i, row in enumerate(rows):
        ax.errorbar(
            row.gmacs.mean,
            row.top1.mean,
            yerr=row.top1.std or 0.0,
            fmt=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            capsize=3,
            markersize=6,
            label=row.variant.label,
        )
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 accuracy (%), mean ± std")
    ax.set_title(f"{table.ablation} ({table.setting})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    _save(fig, path)
    plt.close(fig)


def plot_top1(table: Table, path: Path) -> None:
    """Top-1 per variant as a dot plot, and beside it each variant's paired difference to
    the baseline with its 95% interval (the verdict column, drawn).

    Not bars: a bar encodes its value by its length from zero, so its axis must start at
    0, and from 0 the few points between variants at 70-80% shrink to a few pixels. A dot
    encodes its value by its position on a shared scale, which needs no zero, so the axis
    can zoom in on the differences without exaggerating them: the left panel shows every
    seed (hollow) and the mean (filled), the baseline's mean dashed. Whether a difference
    is larger than seed noise is read from the right panel, whose axis does include 0:
    the interval of the seed-paired differences, the same one the verdict uses. (Separate
    per-variant intervals would mislead here: with two seeds each is +-6 standard
    deviations wide, and they ignore the pairing.)
    """
    plt = _pyplot()

    rows = [row for row in table.rows if row.top1.mean is not None]
    compared = [row for row in rows if row.delta is not None and row.delta.mean is not None]
    width = max(4.5, 0.7 * len(rows) + 2.5)
    panels = 2 if compared else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(width * panels, 4), layout="constrained", squeeze=False
    )
    ax = axes[0][0]
    xs = list(range(len(rows)))
    for x, row in zip(xs, rows, strict=True):
        values = row.top1.values
        spread = [0.1 * (2 * j / (len(values) - 1) - 1) if len(values) > 1 else 0.0
                  for j in range(len(values))]  # fmt: skip
        ax.scatter(
            [x + o for o in spread],
            values,
            s=18,
            facecolors="none",
            edgecolors="0.4",
            linewidths=0.9,
            label="seeds" if x == 0 else None,
            zorder=2,
        )
        ax.scatter(x, row.top1.mean, s=40, color="tab:blue", zorder=3,
                   label="mean" if x == 0 else None)  # fmt: skip
    base = next((row for row in rows if row.is_baseline), None)
    if base is not None:
        ax.axhline(base.top1.mean, color="0.3", linestyle="--", linewidth=1, zorder=1,
                   label=f"baseline mean ({base.variant.label})")  # fmt: skip
    paper = [(x, r.paper.get("top1")) for x, r in zip(xs, rows, strict=True) if r.dataset]
    paper = [(x, y) for x, y in paper if y is not None]
    if paper:
        ax.scatter(*zip(*paper, strict=True), marker="x", color="black", zorder=4, label="paper")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xticks(xs, [row.variant.label for row in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("top-1 per seed and mean", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    if compared:
        ax = axes[0][1]
        cx = list(range(len(compared)))
        for x, row in zip(cx, compared, strict=True):
            delta = row.delta
            color = {ABOVE: "tab:green", BELOW: "tab:red"}.get(row.verdict, "0.35")
            yerr = None
            if delta.low is not None and delta.high is not None:
                yerr = [[delta.mean - delta.low], [delta.high - delta.mean]]
            ax.errorbar(x, delta.mean, yerr=yerr, fmt="o", color=color, capsize=4,
                        markersize=6)  # fmt: skip
        ax.axhline(0.0, color="0.3", linewidth=1)
        ax.set_xlim(-0.6, len(compared) - 0.4)
        labels = [row.variant.label for row in compared]
        ax.set_xticks(cx, labels, rotation=30, ha="right", fontsize=8)
        low = min(min(r.delta.low if r.delta.low is not None else r.delta.mean, 0.0)
                  for r in compared)  # fmt: skip
        high = max(max(r.delta.high if r.delta.high is not None else r.delta.mean, 0.0)
                   for r in compared)  # fmt: skip
        pad = 0.08 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
        names = sorted({row.baseline.label for row in compared})
        ax.set_ylabel(f"Δ top-1 vs {names[0] if len(names) == 1 else 'baseline'} (points)")
        ax.set_title(
            "paired by seed: mean and 95% CI\n(red: below the baseline, green: above it)",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{table.ablation} ({table.setting})", fontsize=11)
    _save(fig, path)
    plt.close(fig)


# --- writing ----------------------------------------------------------------------------


def write_tables(tables: Sequence[Table], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write md/csv/tex (and PNGs for trained tables) of every table; returns the paths."""
    written = []
    for table in tables:
        base = out_dir / table.ablation
        base.mkdir(parents=True, exist_ok=True)
        for suffix, text in (
            ("md", to_markdown(table)),
            ("csv", to_csv(table)),
            ("tex", to_latex(table)),
        ):
            path = base / f"{table.setting}.{suffix}"
            path.write_text(text)
            written.append(path)
        if plots and not table.cost_only and any(r.top1.n for r in table.rows):
            for name, draw in (("top1", plot_top1), ("top1_vs_gmacs", plot_accuracy_vs_gmacs)):
                path = base / f"{table.setting}.{name}.png"
                draw(table, path)
                written.append(path)
    return written


def _cost_words(row: Row) -> str:
    return f"{fmt(_params_m(row.params), 3)}M params, {fmt(row.gmacs.mean, 3)} GMACs"


def _versus(row: Row) -> str:
    """``+0.52 [95% CI -0.10, +1.14] vs ResNet: within noise``."""
    delta = row.delta
    if delta is None or delta.mean is None:
        return f"no run pairs with {row.baseline.label}" if row.baseline else ""
    text = f"Δ {fmt_signed(delta.mean)}"
    if delta.low is not None and delta.high is not None:
        text += f" [95% CI {fmt_signed(delta.low)}, {fmt_signed(delta.high)}]"
    return f"{text} vs {row.baseline.label}: {row.verdict}"


def headline(table: Table) -> str:
    """One line for the README: the best row by mean top-1, its difference to its
    baseline (or, where the baseline is best, the best other row's), its cost."""
    rows = [row for row in table.rows if row.top1.mean is not None]
    if not rows:
        return ""
    best = max(rows, key=lambda row: row.top1.mean)  # the first of equals

    def describe(row: Row) -> str:
        return f"{row.variant.label}, {fmt_stat(row.top1)} (n = {row.top1.n})"

    runs = sum(row.top1.n for row in rows)
    text = f"- **{table.ablation}**, {table.setting} ({runs} runs): best top-1 {describe(best)}"
    if best.is_baseline:
        text += f", the baseline; {_cost_words(best)}."
        others = [row for row in rows if not row.is_baseline]
        if others:
            second = max(others, key=lambda row: row.top1.mean)
            text += f" Best of the others: {describe(second)}, {_versus(second)}; "
            text += f"{_cost_words(second)}."
    elif best.baseline is not None:
        text += f", {_versus(best)}; {_cost_words(best)}."
    else:
        text += f"; {_cost_words(best)} (no baseline row)."
    return text


def index_markdown(tables: Sequence[Table], out_dir: Path, readme: Path) -> str:
    """``results/README.md``: headlines, then every table, with links relative to it."""
    rel = Path(_relpath(out_dir, readme.parent))
    out = [
        "# Results",
        "",
        "Generated by `make tables` (`python -m bench.tables`) from the run records in",
        "`runs/<ablation>/*.json`; do not edit by hand. Paper numbers come from",
        "`reference/*.yaml`. Costs (`cost` tables) come from `make costs` (`python -m",
        "bench.costs`), which profiles every variant at the paper's input size without",
        "training.",
        "",
    ]
    trained = [t for t in tables if not t.cost_only and any(r.top1.n for r in t.rows)]
    if trained:
        out += [
            "## Headlines",
            "",
            "Top-1 (%): final epoch, mean ± sample std over n seeds. Δ: top-1 minus the",
            "ablation's baseline, paired by seed, with its 95% confidence interval (Student",
            "t); the verdict says whether that interval lies above 0, below 0, or across",
            "it (within noise).",
            "",
            *[headline(t) for t in trained],
            "",
        ]
    by_ablation: dict[str, list[Table]] = defaultdict(list)
    for table in tables:
        by_ablation[table.ablation].append(table)
    untrained = sorted(set(by_ablation) - {t.ablation for t in trained})
    if trained and untrained:
        out += ["No trained runs yet (costs only): " + ", ".join(untrained) + ".", ""]
    if not by_ablation:
        out.append("No run records yet.")
    for ablation, group in sorted(by_ablation.items()):
        out += [f"## {ablation}", ""]
        if group[0].source:
            out += [group[0].source, ""]
        for table in group:
            stem = (rel / table.ablation / table.setting).as_posix()
            runs = sum(r.top1.n for r in table.rows) if not table.cost_only else len(table.rows)
            links = [f"[md]({stem}.md)", f"[csv]({stem}.csv)", f"[tex]({stem}.tex)"]
            if not table.cost_only and any(r.top1.n for r in table.rows):
                links += [f"[top-1]({stem}.top1.png)", f"[vs GMACs]({stem}.top1_vs_gmacs.png)"]
            what = "cost" if table.cost_only else table.setting
            noun = "variants" if table.cost_only else "runs"
            out.append(f"- {what} ({runs} {noun}): " + ", ".join(links))
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def make_tables(
    results: Path | None = None,
    out_dir: Path | None = None,
    readme: Path | None = None,
    plots: bool = True,
    *,
    runs: Path | None = None,
) -> list[Table]:
    """Rebuild every table (and the README index) from the run records.

    ``runs`` defaults to ``<results>/runs``, ``out_dir`` to ``<results>/tables`` and
    ``readme`` to ``<results>/README.md`` (to ``<out_dir>/README.md`` when only
    ``out_dir`` is given and ``results`` is not).
    """
    if results is None and (runs is None or out_dir is None):
        raise ValueError("make_tables needs results, or both runs and out_dir")
    runs = runs or results / "runs"
    out_dir = out_dir or results / "tables"
    readme = readme or (results / "README.md" if results is not None else out_dir / "README.md")
    if not runs.is_dir():
        raise ValueError(f"no run records folder at {runs}")
    stale = _old_tables(out_dir, readme)
    tables = build_tables(load_records(runs))
    # Stale tables of ablations whose records are gone must not survive a rebuild.
    for old in stale:
        old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(tables, out_dir, plots=plots)
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(index_markdown(tables, out_dir, readme))
    return tables


TABLE_SUFFIXES = (".md", ".csv", ".tex", ".png")


def _old_tables(out_dir: Path, readme: Path) -> list[Path]:
    """The tables a rebuild replaces (``<out_dir>/<ablation>/<file>``). A folder that holds
    anything else is refused, so that ``--out`` pointed at the wrong place deletes nothing."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a folder")
    ours, foreign = [], []
    for path in sorted(out_dir.rglob("*")):
        if path.is_dir() or path == readme:
            continue
        depth = len(path.relative_to(out_dir).parts)
        (ours if depth == 2 and path.suffix in TABLE_SUFFIXES else foreign).append(path)
    if foreign:
        raise ValueError(
            f"{out_dir} holds {len(foreign)} file(s) that are not tables, e.g. {foreign[0]}; "
            "point the tables at an empty folder or at one that holds tables only"
        )
    return ours


def results_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every command that rebuilds the tables shares (tables, costs)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="results folder holding runs/ (default: results)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = results_parser("python -m bench.tables", __doc__)
    parser.add_argument(
        "--runs", type=Path, help="the run records (<ablation>/*.json); default: <results>/runs"
    )
    parser.add_argument("--out", type=Path, help="where the tables go; default: <results>/tables")
    parser.add_argument(
        "--readme",
        type=Path,
        help="the index; default: <results>/README.md, or <out>/README.md with --out",
    )
    args = parser.parse_args(argv)
    runs = args.runs or args.results / "runs"
    out = args.out or args.results / "tables"
    readme = args.readme or (out / "README.md" if args.out else args.results / "README.md")
    try:
        tables = make_tables(args.results, out, readme, plots=not args.no_plots, runs=runs)
    except ValueError as err:
        print(f"python -m bench.tables: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(tables)} table(s) from {runs} -> {out} (index {readme})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
