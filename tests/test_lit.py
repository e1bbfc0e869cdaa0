"""The LightningModule built from the real composed config: parameter groups, optimizers,
loss and metric keys."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.config import compose, resolve
from bench.lit import LitClassifier, no_weight_decay_names, optimizer_spec, param_groups


def config(*overrides: str) -> dict:
    return resolve(compose(["protocol=smoke", "data.root=unused", *overrides]))


def quiet_trainer(**options) -> pl.Trainer:
    """One epoch, no logger, checkpoint, progress bar or summary."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return pl.Trainer(max_epochs=1, enable_model_summary=False, **quiet, **options)


def srm_config(**optim) -> dict:
    cfg = config("attention=none")
    cfg["attention"]["placements"] = [{"block": "srm", "stages": [3]}]
    cfg["optim"].update(optim)
    return cfg


def test_param_groups_split_norms_biases_and_marked_parameters():
    module = LitClassifier(srm_config(), num_classes=10)
    model = module.model
    decay, no_decay = (g["params"] for g in param_groups(model, 5e-4))
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay}
    no_decay_names = {names[id(p)] for p in no_decay}
    # Every trainable parameter exactly once.
    assert len(decay) + len(no_decay) == len(names)
    assert decay_names.isdisjoint(no_decay_names)
    assert decay_names | no_decay_names == set(names.values())
    # Norm weights/biases and the classifier bias get no decay; convolutions and fc do.
    assert "bn1.weight" in no_decay_names and "fc.bias" in no_decay_names
    assert "conv1.weight" in decay_names and "fc.weight" in decay_names
    # SRM marks its 2-D style weights ``cfc``: found through the generic walk.
    marked = {n for n in no_decay_names if n.endswith(".cfc")}
    assert marked and all(model.get_parameter(n).ndim == 2 for n in marked)
    assert marked <= no_weight_decay_names(model)
    assert not any(n.endswith(".cfc") for n in decay_names)


def test_param_groups_count_a_shared_parameter_once_and_skip_frozen():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 3  # shared w, b; last bias
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_configured_optimizers_and_groups():
    cls, options = optimizer_spec(config("optim=nesterov")["optim"])
    assert cls is torch.optim.SGD and options["nesterov"] is True and options["momentum"] == 0.9
    adamw_cfg = config("optim=adamw")
    cls, options = optimizer_spec(adamw_cfg["optim"])
    assert cls is torch.optim.AdamW and options["weight_decay"] == 0.05
    optimizer = cls(param_groups(nn.Linear(3, 2), options.pop("weight_decay")), **options)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_unknown_optimizer_or_argument_is_a_clear_error():
    with pytest.raises(ValueError, match=r"optim._target_='torch.optim.Lion' is not an importable"):
        optimizer_spec({"name": "lion", "_target_": "torch.optim.Lion", "lr": 0.1})
    with pytest.raises(ValueError, match=r"optim._target_='torch.nn.Linear' is not a torch.optim"):
        optimizer_spec({"name": "x", "_target_": "torch.nn.Linear", "lr": 0.1})
    sgd = "torch.optim.SGD"
    with pytest.raises(ValueError, match=r"optim.betas is not an argument of SGD"):
        optimizer_spec({"name": "sgd", "_target_": sgd, "lr": 0.1, "betas": [0.9, 0.99]})


def test_loss_channels_last_and_metric_keys():
    cfg = config("attention=se", "loss.label_smoothing=0.1", "trainer.channels_last=true")
    module = LitClassifier(cfg, num_classes=10)
    assert module.criterion.label_smoothing == 0.1
    assert module.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = quiet_trainer(limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)
    before = module.model.fc.weight.detach().clone()
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc5"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/acc"]) <= float(metrics["val/acc5"]) <= 1.0
    assert not torch.equal(before, module.model.fc.weight)  # the optimizer stepped
    # The scheduler steps every optimizer step (cosine, 2 steps): LR fell to min_lr=0.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_bf16_mixed_on_the_cpu_runs_under_autocast_with_channels_last():
    """Lightning's `bf16-mixed` on a CPU is torch.autocast("cpu", bfloat16): convolutions
    compute in bf16 on channels_last inputs, the weights and their gradients stay fp32."""
    cfg = config("attention=se", "trainer.channels_last=true", "trainer.precision=bf16-mixed")
    module = LitClassifier(cfg, num_classes=10)
    seen = {}

    def hook(_, inputs, output):
        seen.setdefault("conv1", (inputs[0], output))

    module.model.conv1.register_forward_hook(hook)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = quiet_trainer(
        accelerator="cpu",
        precision=cfg["trainer"]["precision"],
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    inputs, output = seen["conv1"]
    assert output.dtype == torch.bfloat16
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert module.model.conv1.weight.dtype == torch.float32
    assert module.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
