"""The papers' published numbers, as machine-readable tables (``results/reference/*.yaml``).

One YAML file per paper::

    paper: CBAM                      # display name
    title: ..., authors: ..., venue: ...
    arxiv: "1807.06521"              # or url: ...
    tables:
      imagenet:                      # stable table key
        source: Table 4              # where in the paper
        description: ...
        dataset: imagenet
        rows:
          resnet50_cbam: {backbone: resnet50, attention: cbam, params_m: 28.09, gmacs: 3.864, ...}

Row keys are stable names for a variant, so that a measured table can put the paper's
column beside its own (``reference_value("cbam", "imagenet", "resnet50_cbam", "top1_err")``).
Every row field must be one of ``FIELDS``; numeric fields carry their unit in the name.
Floats load as ``Published`` numbers that remember how many decimals the paper printed,
so ``agrees(measured, published)`` can compare at exactly that precision.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"

# Measured quantities: name -> unit. Error and accuracy are never mixed in one field.
NUMBERS = {
    "params_m": "parameters, millions (1e6) as printed",
    "gmacs": "multiply-accumulates per image, billions; what SE/CBAM/ECA call GFLOPs",
    "top1_err": "ImageNet top-1 error, %",
    "top5_err": "ImageNet top-5 error, %",
    "top1_acc": "ImageNet top-1 accuracy, %",
    "top5_acc": "ImageNet top-5 accuracy, %",
    "cifar10_err": "CIFAR-10 error, %",
    "cifar100_err": "CIFAR-100 error, %",
    "cifar10_acc": "CIFAR-10 accuracy, %",
    "cifar100_acc": "CIFAR-100 accuracy, %",
    "box_ap": "COCO box AP",
    "mask_ap": "COCO mask AP",
}
# What the variant is: how to build it in this suite, where that is known.
SETTINGS = {
    "backbone": "build_backbone name (or the paper's model name)",
    "cifar_stem": "true for a 3x3 stride-1 stem without max-pool",
    "input": "input side in pixels for params_m/gmacs (224 unless given)",
    "attention": "registry name of the block, or none",
    "stages": "1-based residual stages holding the block (our numbering)",
    "position": "injector position of the block",
    "reduction": "reduction ratio r of the block's MLP",
    "pool": "pooling variant",
    "gate": "gate non-linearity",
    "order": "arrangement of channel and spatial gates",
    "fusion": "how the context is fused (add / scale)",
    "kernel_size": "kernel size of the block's conv",
    "channels": "channels the block sees",
    "variant": "a named variant without a direct build recipe",
    "note": "free text",
}
FIELDS = {**NUMBERS, **SETTINGS}
_PAPER_KEYS = {"paper", "title", "authors", "venue", "arxiv", "url", "tables"}
_TABLE_KEYS = {"source", "description", "dataset", "rows"}


class ReferenceSchemaError(ValueError):
    """A reference YAML file does not follow the schema."""


class MissingReference(KeyError):
    """A paper, table, row or field that the reference files do not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


def papers() -> list[str]:
    """Keys of the available papers (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))


def _missing(what: str, key, choices) -> MissingReference:
    return MissingReference(f"no {what} {key!r}; available: {', '.join(map(str, choices))}")


def validate(data, name: str = "<reference>") -> None:
    """Raise ReferenceSchemaError, naming the file and place, if ``data`` breaks the schema."""

    def fail(where: str, message: str):
        raise ReferenceSchemaError(f"{name}: {where}: {message}")

    if not isinstance(data, dict):
        fail("top level", "expected a mapping")
    if unknown := set(data) - _PAPER_KEYS:
        fail("top level", f"unknown keys {sorted(unknown)}; accepted: {sorted(_PAPER_KEYS)}")
    for key in ("paper", "title", "tables"):
        if key not in data:
            fail("top level", f"missing {key!r}")
    if "arxiv" not in data and "url" not in data:
        fail("top level", "needs 'arxiv' or 'url' as the source")
    if not isinstance(data["tables"], dict) or not data["tables"]:
        fail("tables", "expected a non-empty mapping of table key -> table")
    for table_key, table in data["tables"].items():
        where = f"table {table_key!r}"
        if not isinstance(table, dict):
            fail(where, "expected a mapping")
        if unknown := set(table) - _TABLE_KEYS:
            fail(where, f"unknown keys {sorted(unknown)}; accepted: {sorted(_TABLE_KEYS)}")
        for key in ("source", "rows"):
            if key not in table:
                fail(where, f"missing {key!r}")
        if not isinstance(table["rows"], dict) or not table["rows"]:
            fail(where, "rows must be a non-empty mapping of row key -> fields")
        for row_key, row in table["rows"].items():
            row_where = f"{where}, row {row_key!r}"
            if not isinstance(row, dict):
                fail(row_where, "expected a mapping of fields")
            if unknown := set(row) - set(FIELDS):
                fail(row_where, f"unknown fields {sorted(unknown)}; accepted: {sorted(FIELDS)}")
            for field, value in row.items():
                if field in NUMBERS and (
                    isinstance(value, bool) or not isinstance(value, (int, float))
                ):
                    fail(row_where, f"{field} must be a number, got {value!r}")


def parse_reference(text: str, name: str = "<text>") -> dict:
    """Parse and validate the text of one reference file; errors name ``name``."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except ReferenceSchemaError as err:
        raise ReferenceSchemaError(f"{name}: {err}") from None
    validate(data, name=name)
    return data


@functools.cache
def _load(paper: str) -> dict:
    path = REFERENCE_DIR / f"{paper}.yaml"
    if not path.is_file():
        raise _missing("reference paper", paper, papers())
    return parse_reference(path.read_text(), name=path.name)


def load_reference(paper: str) -> dict:
    """The validated contents of ``results/reference/<paper>.yaml`` (a fresh copy)."""
    return copy.deepcopy(_load(paper))


def reference_table(paper: str, table: str) -> dict[str, dict]:
    """Rows of one table: row key -> fields. The table's ``source`` is in ``load_reference``."""
    tables = _load(paper)["tables"]
    if table not in tables:
        raise _missing(f"table in {paper}.yaml:", table, tables)
    return {key: dict(row) for key, row in tables[table]["rows"].items()}


def reference_value(paper: str, table: str, row: str, field: str):
    """One published number (or setting), with a clear error if anything is missing."""
    rows = reference_table(paper, table)
    if row not in rows:
        raise _missing(f"row in {paper}.yaml table {table!r}:", row, rows)
    if field not in rows[row]:
        raise _missing(f"field in {paper}.yaml {table}/{row}:", field, rows[row])
    return rows[row][field]


class Published(float):
    """A number as the paper printed it: a float that remembers its decimal places.

    YAML would turn ``3.860`` into ``3.86``; the trailing zero says the paper claims three
    decimals, which is what ``agrees`` compares at.
    """

    decimals: int

    def __new__(cls, text: str):
        value = super().__new__(cls, text)
        value.decimals = len(text.split(".")[1]) if "." in text else 0
        return value

    def __repr__(self) -> str:
        return f"{float(self):.{self.decimals}f}"

    __str__ = __repr__

    def __reduce__(self):
        return Published, (f"{float(self):.{self.decimals}f}",)


def agrees(measured: float, published: float) -> bool:
    """True if ``measured`` rounds to ``published`` at the precision the paper printed."""
    places = getattr(published, "decimals", 0)
    return abs(measured - published) <= 0.5 * 10.0**-places + 1e-12


class _Loader(yaml.SafeLoader):
    """SafeLoader whose floats are ``Published`` (keeping their printed decimals) and which
    refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        if duplicates := sorted({str(k) for k in keys if keys.count(k) > 1}):
            raise ReferenceSchemaError(
                f"line {node.start_mark.line + 1}: key(s) {duplicates} given twice in one mapping"
            )
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor(
    "tag:yaml.org,2002:float",
    lambda loader, node: Published(loader.construct_scalar(node).replace("_", "")),
)
