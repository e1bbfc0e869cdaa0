"""Learning-rate schedules: every policy the reference papers compare, Caffe's names.

`build_scheduler(optimizer, cfg, steps_per_epoch=..., max_epochs=...)` returns a
`torch.optim.lr_scheduler` object that is stepped once per optimizer step (Lightning's
`interval: "step"`), so decays are smooth within an epoch. Policies and their keys
(`k` is the optimizer step, `W` the warmup steps, `T = steps_per_epoch * max_epochs`,
`t = (k - W) / steps_per_epoch` the fractional epoch since the warmup ended, `e` the
whole epochs since the warmup ended):

    fixed      lr                                                   (no keys)
    step       lr * gamma ** (drops so far), a drop every `step_size` epochs of the run
    multistep  lr * gamma ** (drops so far), drops at `milestones` (fractions of max_epochs)
    exp        lr * gamma ** e                                      (gamma per epoch)
    inv        lr * (1 + gamma * t) ** -power                       (gamma per epoch)
    poly       lr * (1 - (k - W) / (T - W)) ** power
    sigmoid    lr / (1 + exp(-gamma * (t - step_size)))             (gamma per epoch)
    cosine     min_lr + (lr - min_lr) * (1 + cos(pi * (k - W) / (T - W))) / 2

Decisions, so one YAML fits every protocol and batch size:
- Rates and positions are in epochs, not iterations. Caffe's per-iteration `gamma` for
  `inv`/`sigmoid` equals ours divided by `steps_per_epoch`; its `stepsize` ours times it.
- `step`, `multistep` and `exp` change the LR only at epoch boundaries, as the papers
  train (ResNet/SENet/CBAM: "divide by 10 at epoch ..."); the others change every step.
- `multistep` milestones are fractions of the run (ResNet on CIFAR: 32k and 48k of 64k
  iterations = [0.5, 0.75]; ImageNet 30/60 of 90 epochs = [1/3, 2/3]), rounded half-up
  to whole epochs, at least 1. `step` and `multistep` drops sit at absolute epochs of the
  run, warmup included (Goyal et al. warm up for 5 epochs and still drop at 30/60/80);
  every other policy starts its clock at the end of the warmup, at the peak LR, so warmup
  and decay join without a jump and `cosine`/`poly` reach their floor at the last step.
- Warmup (`warmup_epochs` > 0, fractional allowed) ramps linearly from
  `warmup_start_factor * lr` to `lr` (`LinearLR`), then hands over (`SequentialLR`).

Built on torch's schedulers: `MultiStepLR` (step, multistep; `StepLR` cannot place a drop
at an absolute epoch once a warmup has shifted its clock), `StepLR` with one-epoch steps
(exp), `PolynomialLR`, `CosineAnnealingLR`, `ConstantLR` (fixed) and `LambdaLR` with
small picklable callables (inv, sigmoid) so checkpoints restore them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

# Policy -> its required keys.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "fixed": (),
    "step": ("step_size", "gamma"),
    "multistep": ("milestones", "gamma"),
    "exp": ("gamma",),
    "inv": ("gamma", "power"),
    "poly": ("power",),
    "sigmoid": ("gamma", "step_size"),
    "cosine": (),
}
# Keys every policy accepts, with their defaults.
COMMON_DEFAULTS: dict[str, Any] = {"warmup_epochs": 0, "warmup_start_factor": 0.01}
OPTIONAL_DEFAULTS: dict[str, dict[str, Any]] = {"cosine": {"min_lr": 0.0}}


class InverseDecay:
    """`(1 + gamma * t) ** -power` with `t` in epochs; a class so `LambdaLR` can save it."""

    def __init__(self, gamma: float, power: float, steps_per_epoch: int):
        self.gamma, self.power, self.steps_per_epoch = gamma, power, steps_per_epoch

    def __call__(self, step: int) -> float:
        return (1.0 + self.gamma * step / self.steps_per_epoch) ** -self.power


class SigmoidRamp:
    """`1 / (1 + exp(-gamma * (t - centre)))` with `t` in epochs."""

    def __init__(self, gamma: float, centre: float, steps_per_epoch: int):
        self.gamma, self.centre, self.steps_per_epoch = gamma, centre, steps_per_epoch

    def __call__(self, step: int) -> float:
        z = -self.gamma * (step / self.steps_per_epoch - self.centre)
        # exp overflows past ~709; the factor is 0 there anyway.
        return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))


def _positive(name: str, value: Any, *, integer: bool = False) -> float:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"schedule.{name} must be {what}, got {value!r}")
    return value


def _check_keys(policy: str, cfg: Mapping) -> dict[str, Any]:
    required = SCHEDULES[policy]
    accepted = {"name", *required, *COMMON_DEFAULTS, *OPTIONAL_DEFAULTS.get(policy, {})}
    unknown = sorted(set(cfg) - accepted)
    missing = [key for key in required if cfg.get(key) is None]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise ValueError(f"schedule {policy!r}: {', '.join(parts)}; it accepts {sorted(accepted)}")
    return {**COMMON_DEFAULTS, **OPTIONAL_DEFAULTS.get(policy, {}), **cfg}


def _milestone_epochs(milestones: Any, max_epochs: int) -> list[int]:
    if not isinstance(milestones, (list, tuple)) or not milestones:
        raise ValueError(f"schedule.milestones must be a non-empty list, got {milestones!r}")
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1:
            raise ValueError(
                "schedule.milestones are fractions of max_epochs in (0, 1) "
                f"(e.g. epoch 81 of 164 is 0.494), got {list(milestones)}"
            )
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"schedule.milestones must increase strictly, got {list(milestones)}")
    # Half-up rounding to whole epochs, never epoch 0 (short smoke runs keep the policy).
    return [max(1, math.floor(m * max_epochs + 0.5)) for m in milestones]


def build_scheduler(
    optimizer: Optimizer, cfg: Mapping, *, steps_per_epoch: int, max_epochs: int
) -> sched.LRScheduler:
    """The LR schedule `cfg` describes, to be stepped after every optimizer step."""
    policy = cfg.get("name")
    if policy not in SCHEDULES:
        raise ValueError(f"unknown schedule {policy!r}; accepted: {sorted(SCHEDULES)}")
    p = _check_keys(policy, cfg)
    _positive("steps_per_epoch", steps_per_epoch, integer=True)
    _positive("max_epochs", max_epochs, integer=True)
    total = steps_per_epoch * max_epochs

    warmup_epochs = p["warmup_epochs"]
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)):
        raise ValueError(f"schedule.warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    warmup = max(1, round(warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 0
    if warmup_epochs < 0 or warmup >= total:
        raise ValueError(
            f"schedule.warmup_epochs must be >= 0 and shorter than the run ({max_epochs} "
            f"epochs), got {warmup_epochs!r}"
        )
    start_factor = p["warmup_start_factor"]
    if not isinstance(start_factor, (int, float)) or not 0 < start_factor <= 1:
        raise ValueError(f"schedule.warmup_start_factor must be in (0, 1], got {start_factor!r}")

    decay_steps = total - warmup  # the main schedule's clock runs from 0 to here
    if policy == "fixed":
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif policy in ("step", "multistep"):
        if policy == "step":
            size = _positive("step_size", p["step_size"], integer=True)
            epochs = list(range(size, max_epochs, size))
        else:
            epochs = _milestone_epochs(p["milestones"], max_epochs)
        # Drops sit at absolute epochs of the run; the main clock starts after the warmup.
        early = [e for e in epochs if e * steps_per_epoch <= warmup]
        if early:
            raise ValueError(
                f"schedule {policy!r}: LR drops at epochs {early} come before the warmup "
                f"ends (epoch {warmup_epochs}); drops must come after it"
            )
        main = sched.MultiStepLR(
            optimizer,
            milestones=[e * steps_per_epoch - warmup for e in epochs],
            gamma=_positive("gamma", p["gamma"]),
        )
    elif policy == "exp":
        main = sched.StepLR(
            optimizer, step_size=steps_per_epoch, gamma=_positive("gamma", p["gamma"])
        )
    elif policy == "inv":
        decay = InverseDecay(
            _positive("gamma", p["gamma"]), _positive("power", p["power"]), steps_per_epoch
        )
        main = sched.LambdaLR(optimizer, decay)
    elif policy == "poly":
        main = sched.PolynomialLR(
            optimizer, total_iters=decay_steps, power=_positive("power", p["power"])
        )
    elif policy == "sigmoid":
        gamma, centre = p["gamma"], p["step_size"]
        for key, value in (("gamma", gamma), ("step_size", centre)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"schedule.{key} must be a number, got {value!r}")
        main = sched.LambdaLR(optimizer, SigmoidRamp(gamma, centre, steps_per_epoch))
    else:  # cosine
        min_lr = p["min_lr"]
        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or min_lr < 0:
            raise ValueError(f"schedule.min_lr must be a number >= 0, got {min_lr!r}")
        main = sched.CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=min_lr)

    if warmup == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, schedulers=[ramp, main], milestones=[warmup])
