"""bench.console: the libraries' chatter is hidden unless asked for."""

import logging
import os
import sys

from pytorch_lightning.callbacks import TQDMProgressBar

from bench.console import LOG_REFRESH_STEPS, progress_bar, quiet_libraries


def test_quiet_libraries_hides_lightning_info_and_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    lightning = logging.getLogger("pytorch_lightning")
    monkeypatch.setattr(lightning, "level", logging.INFO)
    quiet_libraries()
    assert lightning.getEffectiveLevel() == logging.WARNING
    assert not lightning.isEnabledFor(logging.INFO)
    assert os.environ["WANDB_SILENT"] == "true"


def test_a_sweep_clears_its_epoch_bars_a_single_run_keeps_them():
    assert isinstance(progress_bar(True), TQDMProgressBar)
    assert progress_bar(True)._leave is False and progress_bar(False)._leave is True


def test_the_bar_updates_every_step_on_a_terminal_and_rarely_in_a_log_file(monkeypatch):
    """A background sweep's log gets a few bar lines per epoch, not one per step."""
    for tty, rate in ((True, 1), (False, LOG_REFRESH_STEPS)):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        assert progress_bar(True).refresh_rate == rate
