"""The trained model of a run: built from its run record, weights from a checkpoint.

A run record (``results/runs/<ablation>/<run_id>.json``, see ``bench.records``) holds the
resolved config; the model is ``bench.lit.build_model(config["model"],
config["attention"]["placements"], config["data"]["num_classes"])``. Weights come from a
Lightning checkpoint (``<output_dir>/<ablation>/<run_id>/checkpoints/last.ckpt``, whose
``state_dict`` keys are the LightningModule's, ``model.``-prefixed) or from a plain
``torch.save(model.state_dict())`` file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.lit import build_model

LIGHTNING_PREFIX = "model."


def _config(record: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        record = json.loads(Path(record).read_text())
    if "config" not in record:
        raise ValueError("a run record needs a 'config' key (see bench.records)")
    return record["config"]


def build_from_record(record: Mapping[str, Any] | str | os.PathLike) -> nn.Module:
    """The untrained model of a run: its backbone with its attention placements.

    ``record``: a run record (dict) or the path of its JSON file."""
    config = _config(record)
    try:
        model_cfg = config["model"]
        placements = config["attention"]["placements"]
        num_classes = config["data"]["num_classes"]
    except KeyError as err:
        raise ValueError(f"the run record's config lacks {err}") from None
    model, _ = build_model(model_cfg, placements or [], int(num_classes))
    return model


def model_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's weights out of a loaded Lightning checkpoint (``state_dict`` with
    ``model.`` keys, the prefix removed) or a plain state dict (returned as it is)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return dict(checkpoint)
    weights = {
        key[len(LIGHTNING_PREFIX) :]: value
        for key, value in state.items()
        if key.startswith(LIGHTNING_PREFIX)
    }
    if not weights:
        raise ValueError(
            f"the checkpoint's state_dict has no {LIGHTNING_PREFIX!r} keys; "
            "was it written by bench.lit.LitClassifier?"
        )
    return weights


def load_weights(
    model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a Lightning checkpoint or a plain state-dict file into ``model`` (strictly:
    every key must match) and return the model. Read with ``weights_only=True``, so no
    code in the file runs."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a checkpoint or state dict, got {type(checkpoint)}")
    model.load_state_dict(model_state_dict(checkpoint))
    return model


def load_run(
    record: Mapping[str, Any] | str | os.PathLike,
    weights: str | os.PathLike,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The trained model of a run, in eval mode: ``build_from_record`` + ``load_weights``."""
    model = build_from_record(record)
    return load_weights(model, weights, map_location).to(map_location).eval()
