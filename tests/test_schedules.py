"""LR schedules against their closed-form formulas, step by step, with and without warmup."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from bench.schedules import SCHEDULES, build_scheduler

LR = 0.1
SPE = 7  # steps per epoch: odd, so epoch boundaries and fractional warmups are exercised
EPOCHS = 12
TOTAL = SPE * EPOCHS
SCHEDULE_DIR = Path(__file__).resolve().parents[1] / "experiments" / "schedule"


def lr_curve(cfg, steps=TOTAL, spe=SPE, epochs=EPOCHS):
    """The LR used by each of `steps` optimizer steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=spe, max_epochs=epochs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def expected(cfg, k, spe=SPE, epochs=EPOCHS):
    """Closed form of the module docstring for step k."""
    total = spe * epochs
    w_epochs = cfg.get("warmup_epochs", 0)
    w = max(1, round(w_epochs * spe)) if w_epochs else 0
    if k < w:
        start = cfg.get("warmup_start_factor", 0.01)
        return LR * (start + (1 - start) * k / w)
    name, s = cfg["name"], k - w
    t = s / spe
    if name == "fixed":
        return LR
    if name == "step":
        return LR * cfg["gamma"] ** (k // spe // cfg["step_size"])
    if name == "multistep":
        drops = [max(1, math.floor(m * epochs + 0.5)) for m in cfg["milestones"]]
        return LR * cfg["gamma"] ** sum(k >= d * spe for d in drops)
    if name == "exp":
        return LR * cfg["gamma"] ** (s // spe)
    if name == "inv":
        return LR * (1 + cfg["gamma"] * t) ** -cfg["power"]
    if name == "poly":
        return LR * (1 - s / (total - w)) ** cfg["power"]
    if name == "sigmoid":
        return LR / (1 + math.exp(-cfg["gamma"] * (t - cfg["step_size"])))
    if name == "cosine":
        lo = cfg.get("min_lr", 0.0)
        return lo + (LR - lo) * (1 + math.cos(math.pi * s / (total - w))) / 2
    raise AssertionError(name)


CASES = {
    "fixed": {},
    "step": {"step_size": 4, "gamma": 0.1},
    "multistep": {"milestones": [0.5, 0.75], "gamma": 0.2},
    "exp": {"gamma": 0.8},
    "inv": {"gamma": 0.5, "power": 0.75},
    "poly": {"power": 0.9},
    "sigmoid": {"gamma": -1.5, "step_size": 6},
    "cosine": {"min_lr": 0.001},
}


def test_cases_cover_every_policy():
    assert set(CASES) == set(SCHEDULES)


@pytest.mark.parametrize("warmup", [0, 2, 0.5])
@pytest.mark.parametrize("name", sorted(CASES))
def test_curve_matches_closed_form(name, warmup):
    cfg = {"name": name, **CASES[name], "warmup_epochs": warmup, "warmup_start_factor": 0.1}
    lrs = lr_curve(cfg)
    want = [expected(cfg, k) for k in range(TOTAL)]
    assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12)
    if warmup:
        assert lrs[0] == pytest.approx(0.1 * LR)


def test_drops_only_at_epoch_boundaries():
    for name in ("step", "multistep", "exp"):
        lrs = lr_curve({"name": name, **CASES[name]})
        changes = [k for k in range(1, TOTAL) if lrs[k] != lrs[k - 1]]
        assert changes and all(k % SPE == 0 for k in changes), name


def test_paper_multistep_on_cifar_resnet():
    # He et al.: /10 at 32k and 48k of 64k iterations; in 164 epochs that is epoch 82, 123.
    cfg = {"name": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1}
    lrs = lr_curve(cfg, steps=164, spe=1, epochs=164)
    assert lrs[81] == pytest.approx(LR) and lrs[82] == pytest.approx(LR / 10)
    assert lrs[122] == pytest.approx(LR / 10) and lrs[123] == pytest.approx(LR / 100)


def test_step_drops_at_absolute_epochs_despite_warmup():
    cfg = {"name": "step", "step_size": 4, "gamma": 0.1, "warmup_epochs": 1}
    lrs = lr_curve(cfg)
    assert lrs[4 * SPE - 1] == pytest.approx(LR)
    assert lrs[4 * SPE] == pytest.approx(LR / 10)


def test_cosine_and_poly_reach_their_floor():
    for name, floor in (("cosine", 0.001), ("poly", 0.0)):
        cfg = {"name": name, **CASES[name], "warmup_epochs": 1}
        lrs = lr_curve(cfg, steps=TOTAL + 1)
        assert lrs[SPE] == pytest.approx(LR)  # peak right after the warmup
        assert lrs[TOTAL] == pytest.approx(floor, abs=1e-9)
        assert all(a >= b for a, b in zip(lrs[SPE:], lrs[SPE + 1 :], strict=False))


def test_state_dict_round_trip_resumes_the_curve():
    cfg = {"name": "inv", "gamma": 0.5, "power": 0.75, "warmup_epochs": 1}
    full = lr_curve(cfg)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=LR)
    sch = build_scheduler(opt, cfg, steps_per_epoch=SPE, max_epochs=EPOCHS)
    for _ in range(20):
        opt.step()
        sch.step()
    state, opt_state = sch.state_dict(), opt.state_dict()
    opt2 = torch.optim.SGD([param], lr=LR)
    sch2 = build_scheduler(opt2, cfg, steps_per_epoch=SPE, max_epochs=EPOCHS)
    opt2.load_state_dict(opt_state)
    sch2.load_state_dict(state)
    resumed = []
    for _ in range(20, TOTAL):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sch2.step()
    assert resumed == pytest.approx(full[20:], rel=1e-9)


def test_unknown_schedule_lists_accepted():
    with pytest.raises(ValueError) as err:
        lr_curve({"name": "cosin"})
    for name in SCHEDULES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"name": "step", "gamma": 0.1}, "step_size"),
        ({"name": "cosine", "gamma": 0.1}, "gamma"),
        ({"name": "fixed", "warmup_epoch": 1}, "warmup_epoch"),
        ({"name": "multistep", "milestones": [81, 122], "gamma": 0.1}, "fractions"),
        ({"name": "multistep", "milestones": [0.75, 0.5], "gamma": 0.1}, "increase"),
        ({"name": "multistep", "milestones": [0.1], "gamma": 0.1, "warmup_epochs": 3}, "warmup"),
        ({"name": "exp", "gamma": -0.5}, "gamma"),
        ({"name": "fixed", "warmup_epochs": EPOCHS}, "warmup_epochs"),
        ({"name": "fixed", "warmup_epochs": 1, "warmup_start_factor": 0}, "start_factor"),
    ],
)
def test_bad_keys_are_named(cfg, needle):
    with pytest.raises(ValueError, match=needle):
        lr_curve(cfg)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_policy_has_a_yaml_that_builds(name):
    cfg = yaml.safe_load((SCHEDULE_DIR / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    lrs = lr_curve(cfg, steps=3 * 164, spe=3, epochs=164)
    assert all(0 <= lr <= LR * (1 + 1e-9) for lr in lrs)
