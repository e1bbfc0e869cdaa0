"""The run configuration: composing it, resolving it and validating it, in one place.

Both entry points use this module and nothing else to turn words into a run:
``python -m bench.train [overrides]`` (Hydra's ``@main``) and ``python -m bench.sweep``
(which composes every run of a grid with ``compose`` before starting the same
``bench.train -m`` multirun). So the same words always give the same config and run id.

Precedence is Hydra's defaults list (``experiments/train.yaml``): the groups (model, data,
attention, optim, schedule, trainer, logger), then the ``protocol`` (the setting: model,
data, optimiser, schedule, epochs), then the optional ``ablation`` (its axes, table rows
and the attention block it studies), then the command line. An ablation never chooses the
protocol; it may declare protocols it cannot run in (``unsupported``), which fail here in
one line before anything is built.

- ``compose(overrides)``: the config ``python -m bench.train <overrides>`` runs.
- ``resolve(cfg)``: a plain dict; attention keys that no placement uses are dropped first.
- ``validate(config)``: every check that needs no data or model weights (placements against
  the backbone, the ablation's protocols, optimiser, schedule, trainer, batch, logger).
- ``dashboard_keys(config)``: the flat keys W&B and the tables group by, read off the
  config (every scalar key of ``attention`` plus the setting), not from a hand list.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.hardware import HardwareError, resolve_trainer
from bench.schedules import build_scheduler
from modules import validate_placements

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# Keys of the trainer group that are ours, not pytorch_lightning.Trainer arguments.
OWN_TRAINER_KEYS = (
    "channels_last",
    "compile",
    "deterministic",
    "float32_matmul_precision",
    "keep_checkpoints",
)
KEEP_CHECKPOINTS = ("final", "all", "none")  # what a finished run keeps (bench.train)


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key and the fix."""


# --- choices ---------------------------------------------------------------------------


def group_options(group: str) -> list[str]:
    """The options of one config group (``experiments/<group>/*.yaml``), sorted."""
    return sorted(p.stem for p in (EXPERIMENTS / group).glob("*.yaml"))


def check_choice(what: str, name: str, choices: Sequence[str]) -> None:
    """A ConfigError for a name that is not among ``choices``, with the closest ones."""
    if name not in choices:
        close = difflib.get_close_matches(str(name), choices, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown {what} {name!r}.{hint} Available: {', '.join(choices)}")


# --- composing -------------------------------------------------------------------------


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    # compose() needs an initialised GlobalHydra; inside a running Hydra app (a callback)
    # one already exists and must be restored afterwards.
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(EXPERIMENTS), version_base=None):
            yield
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def compose(overrides: Sequence[str], hydra_config: bool = False) -> DictConfig:
    """The training config ``python -m bench.train <overrides>`` would run; a ConfigError
    (one line) for an override Hydra cannot apply."""
    try:
        with _hydra():
            return hydra_compose(
                "train", overrides=list(overrides), return_hydra_config=hydra_config
            )
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"cannot compose {' '.join(overrides)}: {message}") from err


# --- resolving -------------------------------------------------------------------------

_PROBE = "__unused_probe__"


def _resolved_placements(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg.attention.placements, resolve=True)
    except OmegaConfBaseException:
        return _PROBE  # the probe value broke an interpolation, so the key is used


def unused_attention_keys(cfg: DictConfig) -> list[str]:
    """Attention keys (besides ``block`` and ``placements``) whose value the placements do
    not depend on: changing the key to a probe value leaves the resolved placements as
    they were. Works through nested interpolations (``${presets.${attention.variant}}``)."""
    reference = _resolved_placements(cfg)
    unused = []
    for key in cfg.attention:
        if key in ("block", "placements") or cfg.attention[key] is None:
            continue
        probe = copy.deepcopy(cfg)
        probe.attention[key] = _PROBE
        if _resolved_placements(probe) == reference:
            unused.append(str(key))
    return unused


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as a plain dict, interpolations resolved, and every attention
    key that no placement uses dropped (so ``attention=none ++attention.ratio=8`` is the
    plain baseline: one run id, one dashboard group); ``trainer.precision`` and
    ``trainer.compile`` ``auto`` replaced by what this machine runs
    (``bench.hardware.resolve_trainer``). ``hydra`` is left out."""
    cfg = copy.deepcopy(cfg)
    with contextlib.suppress(OmegaConfBaseException):
        OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    for key in unused_attention_keys(cfg):
        cfg.attention.pop(key)
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(" ".join(str(err).split())) from err
    # ``auto`` precision and compile become what this machine runs (bench.hardware), so
    # the run id and the record name them.
    try:
        return resolve_trainer(config)
    except HardwareError as err:
        raise ConfigError(str(err)) from err


# --- validating ------------------------------------------------------------------------


def check_protocol(config: Mapping[str, Any]) -> None:
    """A ConfigError if the run's ablation declares its protocol ``unsupported``."""
    unsupported = config.get("unsupported") or {}
    protocol = config["protocol"]["name"]
    if protocol in unsupported:
        supported = [p for p in group_options("protocol") if p not in unsupported]
        raise ConfigError(
            f"ablation {config['ablation']!r} cannot run with protocol={protocol}: "
            f"{unsupported[protocol]} Supported protocols: {', '.join(supported)}"
        )


def optimizer_spec(optim_cfg: Mapping[str, Any]) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class named by ``optim._target_`` and its keyword arguments; a
    ConfigError for a class that is not a torch optimizer or an argument it does not take."""
    options = {k: v for k, v in optim_cfg.items() if k not in ("name", "_target_", "_partial_")}
    target = optim_cfg.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as err:
        raise ConfigError(f"optim._target_={target!r} is not an importable class") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optim._target_={target!r} is not a torch.optim.Optimizer")
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"optim.{unknown[0]} is not an argument of {cls.__name__}; accepted: "
            + ", ".join(accepted)
        )
    return cls, options


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def validate(config: Mapping[str, Any]) -> None:
    """Raise a ConfigError (one line) for a resolved config that cannot train, before
    anything is built. Data on disk is checked by the datamodule (``bench.data``)."""
    check_protocol(config)
    try:
        validate_placements(config["attention"]["placements"], config["model"]["name"])
    except ValueError as err:
        raise ConfigError(f"attention: {err}") from err
    optimizer_spec(config["optim"])
    epochs = config["trainer"]["max_epochs"]
    _positive_int("trainer.max_epochs", epochs)
    _positive_int("protocol.batch_size", config["protocol"]["batch_size"])
    keep = config["trainer"].get("keep_checkpoints")
    if keep not in KEEP_CHECKPOINTS:
        raise ConfigError(
            f"trainer.keep_checkpoints={keep!r} is not one of {', '.join(KEEP_CHECKPOINTS)}"
        )
    # The real scheduler needs the loader's length; a probe optimizer checks names and keys.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        build_scheduler(probe, config["schedule"], steps_per_epoch=1000, max_epochs=epochs)
    except ValueError as err:
        raise ConfigError(f"schedule: {err}") from err
    logger = config["logger"]
    if logger.get("_target_"):
        try:
            get_class(str(logger["_target_"]))
        except Exception as err:
            raise ConfigError(f"logger._target_={logger['_target_']!r} cannot be imported") from err


def check(cfg: DictConfig) -> dict[str, Any]:
    """``resolve`` then ``validate``: the resolved config of a run that can start."""
    config = resolve(cfg)
    validate(config)
    return config


# --- dashboard -------------------------------------------------------------------------


def dashboard_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys for grouping and filtering runs (W&B config, CSV hparams, tables): every
    key of the ``attention`` group but its placements (so a block's own axes appear as soon
    as its YAML declares them), and the setting."""
    keys = {k: v for k, v in config["attention"].items() if k != "placements"}
    keys.update(
        backbone=config["model"]["name"],
        dataset=config["data"]["name"],
        optimizer=config["optim"]["name"],
        schedule=config["schedule"]["name"],
        protocol=config["protocol"]["name"],
        seed=config["seed"],
        ablation=config["ablation"],
    )
    return keys
