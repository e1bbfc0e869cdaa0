"""bench.hardware: precision and compile `auto` resolved from what the machine has."""

import pytest
import torch

import bench.hardware as hardware
from bench.config import ConfigError, compose, resolve
from bench.records import run_id

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra} ibpb
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    "extra, native",
    [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False), ("", False)],
)
def test_native_bf16_is_read_off_the_cpu_flags(extra, native):
    cpuinfo = X86.format(extra=extra)
    assert hardware.cpu_has_native_bf16(cpuinfo) is native
    assert hardware.auto_precision("cpu", cpuinfo) == ("bf16-mixed" if native else "32")


def test_no_flags_line_means_no_native_bf16():
    assert hardware.cpu_flags(ARM) is None
    assert hardware.cpu_has_native_bf16(ARM) is False  # only x86 flags are trusted


def test_auto_on_cuda_follows_the_gpus_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, want in ((True, "bf16-mixed"), (False, "32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert hardware.auto_precision("auto", X86.format(extra="")) == want
    # accelerator=cpu on a machine with a GPU: the CPU's rule.
    assert hardware.auto_precision("cpu", X86.format(extra="")) == "32"


def test_resolve_turns_auto_into_what_runs(monkeypatch):
    monkeypatch.setattr(hardware, "CPUINFO", hardware.Path("/nonexistent"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, want in ((True, "bf16-mixed"), (False, "32")):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None, n=native: n)
        config = resolve(compose(["protocol=smoke", "trainer.precision=auto"]))
        assert config["trainer"]["precision"] == want
    # The run id names what ran: auto on a bf16 CPU is the bf16-mixed run.
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    auto = resolve(compose(["protocol=smoke", "trainer.precision=auto"]))
    explicit = resolve(compose(["protocol=smoke", "trainer.precision=bf16-mixed"]))
    assert run_id(auto) == run_id(explicit)
    # Explicit values pass through, integers stay integers.
    assert resolve(compose(["protocol=cpu", "trainer.precision=32"]))["trainer"]["precision"] == 32
    # The cpu protocol (version 2) follows the machine: bf16-mixed and compiled SE where
    # the CPU has native bf16, fp32 and eager elsewhere.
    for native, precision, compiled in ((True, "bf16-mixed", True), (False, "32", False)):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None, n=native: n)
        trainer = resolve(compose(["protocol=cpu", "attention=se"]))["trainer"]
        assert (trainer["precision"], trainer["compile"]) == (precision, compiled)


def test_bad_precision_or_compile_is_one_line():
    with pytest.raises(ConfigError, match=r"trainer.precision='bf17' is not one of auto, 32"):
        resolve(compose(["trainer.precision=bf17"]))
    with pytest.raises(ConfigError, match=r"trainer.compile='sometimes' is not one of true"):
        resolve(compose(["trainer.compile=sometimes"]))


def test_compile_auto_compiles_where_the_table_says(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    key = ("cpu", "bf16-mixed", "resnet20_cifar", "se")
    monkeypatch.setattr(hardware, "COMPILE_PAYS", {key: True})
    overrides = ["protocol=smoke", "trainer.precision=bf16-mixed", "trainer.compile=auto"]
    assert resolve(compose([*overrides, "attention=se"]))["trainer"]["compile"] is True
    assert resolve(compose([*overrides, "attention=eca"]))["trainer"]["compile"] is False
    fp32 = [o.replace("bf16-mixed", "32") for o in overrides]
    assert resolve(compose([*fp32, "attention=se"]))["trainer"]["compile"] is False
    assert hardware.placement_blocks([{"block": "se"}, {"block": "cbam"}]) == "cbam+se"
    assert hardware.placement_blocks([]) == "none"


def test_training_flops_and_peaks(monkeypatch):
    # ResNet-20 at 32 px: 0.0408 GMACs per image -> x2 x3 per trained image.
    assert hardware.training_flops(0.0408, 256) == int(0.0408e9 * 6 * 256)
    assert hardware.training_flops(None, 256) is None
    assert hardware.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    # A chip Lightning's table does not parse ("NVIDIA H200") falls back to ours.
    import lightning_fabric.utilities.throughput as fabric

    monkeypatch.setattr(fabric, "get_available_flops", lambda device, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) == 989.4e12
