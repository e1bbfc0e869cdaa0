"""What a run prints: the lines that matter, and the rest only when asked (``verbose=true``).

A sweep's output is one line per run (``bench.sweep.SweepProgress``), a progress bar for
the run in hand and a summary; a single ``make train`` keeps Lightning's progress bar and
our own few lines (where the run lives, its placements, params and GMACs). What is hidden
unless ``verbose=true``: Lightning's info lines (seed, accelerator, the LitLogger tip,
checkpoint restores), its model summary, W&B's terminal output, and two library warnings
that say nothing about the run (a pytree deprecation inside Lightning, and Lightning's
note that a resumed run's checkpoint folder is not empty).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from pytorch_lightning.callbacks import TQDMProgressBar

# Library loggers whose INFO lines are chatter in our runs.
CHATTY_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning", "torch._dynamo")
# Warnings (regexes of their message) that describe the libraries, not the run.
LIBRARY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"Checkpoint directory .* exists and is not empty",
)


def quiet_libraries() -> None:
    """Hide the libraries' chatter for the rest of this process (see the module docstring)."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("WANDB_SILENT", "true")


# Steps between bar updates when the output is a file (a background sweep's log), where
# every update is appended rather than redrawn: a few lines per epoch, not one per step.
LOG_REFRESH_STEPS = 100


def progress_bar(in_sweep: bool) -> TQDMProgressBar:
    """Lightning's bar; in a sweep its epoch bars are cleared when done, so what stays on
    the screen is the sweep's one line per run. Written to a file, it updates every
    ``LOG_REFRESH_STEPS`` steps."""
    refresh = 1 if sys.stdout.isatty() else LOG_REFRESH_STEPS
    return TQDMProgressBar(refresh_rate=refresh, leave=not in_sweep)
