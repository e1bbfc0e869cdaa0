"""Tables and plots from run records, with the papers' numbers beside ours.

    python -m bench.tables [--results results] [--no-plots]

Everything is rebuilt from ``<results>/runs/<ablation>/*.json`` alone, so the committed
tables can be proven equal to what ``make tables`` produces: rows are sorted the same way
every time, floats have fixed formats, and nothing carries a timestamp.

How a record becomes a table row. The ablation file (``experiments/ablation/<name>.yaml``)
is part of every run's resolved config, and with it:

- ``variants``: the table's rows, in order; each ``{label, ref, match}`` where ``match``
  maps dotted config paths to the values that pick the runs of that row, and ``ref`` is the
  row key of the paper's table (``null`` where the paper has no such row);
- ``paper``: ``{name, table}``, the file and table in ``results/reference``.

Runs of one ablation under different settings (protocol, data, backbone when it is not an
axis) are never averaged together: each setting gets its own table, named after it
(``results/tables/<ablation>/<setting>.md``). Cost-only records (``status: cost-only``,
written by ``python -m bench.costs``) make ``results/tables/<ablation>/cost.md``.

Accuracies are top-1/top-5 accuracy in %, final epoch, as mean +- sample std over seeds
with n. A paper's error rates are shown as accuracies (100 - err); the delta (ours - paper)
is only printed when our runs used the paper's dataset, since anything else compares
different tasks.

PNGs are written with the Agg backend and without the ``Software`` metadata; they are
deterministic for a given matplotlib version, but the byte-equality test of the committed
tables covers md/csv/tex/README only (a matplotlib upgrade may change pixels).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.records import COST_ONLY, load_records
from bench.variants import Variant, config_value, variants_of

# Config paths that name the setting a run was trained under, in the order they appear in
# a table's file name. A path that is an axis of the ablation is left out of the name.
SETTING_KEYS = ("protocol.name", "data.name", "model.name")
IMAGENET_DATASETS = ("imagenet",)


# --- reading records -------------------------------------------------------------------


def setting_of(config: Mapping, variants: Sequence[Variant]) -> str:
    """A file-name-safe name for what a run was trained under, e.g. ``cifar-cifar10``."""
    axis_paths = {key for v in variants for key in v.match}
    parts = []
    for key in SETTING_KEYS:
        if key in axis_paths or any(key.startswith(p + ".") for p in axis_paths):
            continue
        value = config_value(config, key)
        if value is not None:
            parts.append(str(value))
    name = "-".join(parts) or "default"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


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
    datasets: set = field(default_factory=set)
    # Our runs' dataset where it is the paper's (so a delta means something), else None.
    dataset: str | None = None

    def add(self, record: Mapping) -> None:
        self.datasets.add(str(config_value(record["config"], "data.name")))
        for name in ("params", "gmacs", "throughput", "top1", "top5", "best_top1", "best_top5"):
            value = record.get(name)
            if value is not None:
                getattr(self, name).values.append(float(value))


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


def build_tables(records: Iterable[Mapping]) -> list[Table]:
    """Group records by ablation and setting, and aggregate them into tables (sorted)."""
    groups: dict[tuple[str, str, bool], list[Mapping]] = defaultdict(list)
    for record in records:
        status = record.get("status")
        cost_only = status == COST_ONLY
        if status != "done" and not cost_only:
            continue
        config = record["config"]
        setting = "cost" if cost_only else setting_of(config, variants_of(config))
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
            ref = row.variant.ref
            if ref and ref in paper_rows:
                row.paper = paper_numbers(paper_rows[ref], row.dataset or paper_dataset)
            elif ref and paper_rows:
                warnings.warn(f"{ablation}: paper table has no row {ref!r}", stacklevel=2)
        if unmatched:
            warnings.warn(
                f"{ablation} ({setting}): {unmatched} record(s) match no single variant",
                stacklevel=2,
            )
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


def fmt_delta(ours: float | None, paper: float | None, digits: int = 2) -> str:
    if ours is None or paper is None:
        return ""
    delta = round(ours - paper, digits)
    return f"{delta + 0.0:+.{digits}f}"  # + 0.0 turns -0.00 into +0.00


def fmt_stat(stat: Stat, digits: int = 2, pm: str = " ± ") -> str:
    if stat.mean is None:
        return ""
    if stat.std is None:
        return fmt(stat.mean, digits)
    return f"{stat.mean:.{digits}f}{pm}{stat.std:.{digits}f}"


def _params_m(stat: Stat) -> float | None:
    return None if stat.mean is None else stat.mean / 1e6


def columns(table: Table) -> list[tuple[str, str]]:
    """(header, csv name) pairs of the table's columns."""
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
    return [
        ("Variant", "variant"),
        ("n", "n"),
        ("Params (M)", "params_m"),
        ("GMACs", "gmacs"),
        ("img/s", "throughput"),
        ("Top-1 (%)", "top1"),
        ("Top-5 (%)", "top5"),
        ("Paper top-1", "paper_top1"),
        ("Δ top-1", "delta_top1"),
        ("Paper top-5", "paper_top5"),
        ("Δ top-5", "delta_top5"),
    ]


def cells(table: Table, row: Row, pm: str = " ± ") -> list[str]:
    """Formatted cells of one row, in ``columns`` order."""
    paper = row.paper
    params = _params_m(row.params)
    gmacs = row.gmacs.mean
    if table.cost_only:
        return [
            row.variant.label,
            fmt(params, 3),
            fmt(gmacs, 3),
            fmt(paper.get("params_m")),
            fmt_delta(params, paper.get("params_m")),
            fmt(paper.get("gmacs"), 3),
            fmt_delta(gmacs, paper.get("gmacs"), 3),
        ]
    compare = row.dataset is not None
    return [
        row.variant.label,
        str(row.top1.n),
        fmt(params, 3),
        fmt(gmacs, 3),
        fmt(row.throughput.mean, 0),
        fmt_stat(row.top1, pm=pm),
        fmt_stat(row.top5, pm=pm),
        fmt(paper.get("top1")),
        fmt_delta(row.top1.mean, paper.get("top1")) if compare else "",
        fmt(paper.get("top5")),
        fmt_delta(row.top5.mean, paper.get("top5")) if compare else "",
    ]


def csv_values(table: Table, row: Row) -> list[str]:
    """Unformatted-but-fixed-precision values for the CSV (mean and std apart)."""
    paper = row.paper
    params = _params_m(row.params)
    base = [row.variant.label, row.variant.ref or ""]
    if table.cost_only:
        return base + [
            fmt(params, 4),
            fmt(row.gmacs.mean, 4),
            fmt(paper.get("params_m")),
            fmt(paper.get("gmacs"), 3),
        ]
    compare = row.dataset is not None
    return base + [
        str(row.top1.n),
        fmt(params, 4),
        fmt(row.gmacs.mean, 4),
        fmt(row.throughput.mean, 1),
        fmt(row.top1.mean, 3),
        fmt(row.top1.std, 3),
        fmt(row.top5.mean, 3),
        fmt(row.top5.std, 3),
        fmt(row.best_top1.mean, 3),
        fmt(row.best_top5.mean, 3),
        fmt(paper.get("top1")),
        fmt(paper.get("top5")),
        fmt_delta(row.top1.mean, paper.get("top1"), 3) if compare else "",
        fmt_delta(row.top5.mean, paper.get("top5"), 3) if compare else "",
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
        "top5_mean",
        "top5_std",
        "best_top1_mean",
        "best_top5_mean",
        "paper_top1",
        "paper_top5",
        "delta_top1",
        "delta_top5",
    ]


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
            "Accuracy: final epoch, mean ± sample std over n seeds. "
            + (
                "Δ = ours - paper."
                if any(row.dataset for row in table.rows)
                else "No Δ: our runs did not use the paper's dataset."
            )
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


def plot_accuracy_vs_gmacs(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in table.rows:
        if row.top1.mean is None or row.gmacs.mean is None:
            continue
        ax.errorbar(
            row.gmacs.mean,
            row.top1.mean,
            yerr=row.top1.std or 0.0,
            fmt="o",
            capsize=3,
            label=row.variant.label,
        )
        ax.annotate(
            row.variant.label,
            (row.gmacs.mean, row.top1.mean),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{table.ablation} ({table.setting})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_bars(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [row for row in table.rows if row.top1.mean is not None]
    labels = [row.variant.label for row in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 4))
    xs = list(range(len(rows)))
    ax.bar(
        xs,
        [r.top1.mean for r in rows],
        yerr=[r.top1.std or 0.0 for r in rows],
        capsize=4,
        color="tab:blue",
        label="ours (mean ± std)",
    )
    if any(row.dataset for row in rows):
        paper = [(x, r.paper.get("top1")) for x, r in zip(xs, rows, strict=True) if r.dataset]
        paper = [(x, y) for x, y in paper if y is not None]
        if paper:
            ax.scatter(
                *zip(*paper, strict=True), marker="x", color="black", zorder=3, label="paper"
            )
    means = [r.top1.mean for r in rows]
    if means:
        spread = max(means) - min(means)
        ax.set_ylim(min(means) - max(1.0, 2 * spread), max(means) + max(1.0, spread))
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{table.ablation} ({table.setting})")
    ax.legend(fontsize=8)
    fig.tight_layout()
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
            for name, draw in (("top1", plot_bars), ("top1_vs_gmacs", plot_accuracy_vs_gmacs)):
                path = base / f"{table.setting}.{name}.png"
                draw(table, path)
                written.append(path)
    return written


def index_markdown(tables: Sequence[Table], out_dir: Path, readme: Path) -> str:
    """``results/README.md``: every table, with links relative to the README."""
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
    by_ablation: dict[str, list[Table]] = defaultdict(list)
    for table in tables:
        by_ablation[table.ablation].append(table)
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
    results: Path, out_dir: Path | None = None, readme: Path | None = None, plots: bool = True
) -> list[Table]:
    """Rebuild every table (and the README index) from ``<results>/runs``."""
    out_dir = out_dir or results / "tables"
    readme = readme or results / "README.md"
    tables = build_tables(load_records(results / "runs"))
    if out_dir.exists():
        # Stale tables of ablations whose records are gone must not survive a rebuild.
        for old in sorted(out_dir.rglob("*"), reverse=True):
            if old.is_file() and old.suffix in (".md", ".csv", ".tex", ".png"):
                old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(tables, out_dir, plots=plots)
    readme.write_text(index_markdown(tables, out_dir, readme))
    return tables


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


def main(argv: Sequence[str] | None = None) -> None:
    args = results_parser("python -m bench.tables", __doc__).parse_args(argv)
    tables = make_tables(args.results, plots=not args.no_plots)
    print(f"{len(tables)} table(s) from {args.results / 'runs'} -> {args.results / 'tables'}")


if __name__ == "__main__":
    main()
