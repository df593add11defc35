import json
import shutil
import sys
import time
from collections import namedtuple
from dataclasses import replace
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch

import data
import system_check
from model import Transformer
from system_check import HardwareManager, SystemCheck, SystemReport

NAMES = ["Python", "GPU", "CPU", "RAM", "Disk", "Packages", "Hub"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test opens a socket: the hub check answers "unreachable" at once unless a test
    replaces data.hub_reachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def by_name(report) -> dict:
    return {check.name: check for check in report.checks}


def test_run_all_reports_every_check_as_json(tmp_path):
    report = SystemCheck(tmp_path).run_all()
    assert [check.name for check in report.checks] == NAMES
    assert all(check.status in ("ok", "warn", "fail") and check.message for check in report.checks)
    assert report.ok == all(check.status != "fail" for check in report.checks)
    assert report.warnings == [check for check in report.checks if check.status == "warn"]
    encoded = json.loads(json.dumps(report.to_dict()))
    assert [check["name"] for check in encoded["checks"]] == NAMES and encoded["seconds"] >= 0
    assert by_name(report)["CPU"].facts["torch_threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        gpu = by_name(report)["GPU"]
        assert gpu.status == "warn" and "training runs on the CPU" in gpu.message


def test_hub_honours_hf_hub_offline_and_reports_a_reachable_hub(monkeypatch):
    started = time.perf_counter()
    hub = SystemCheck(hub_timeout_s=5).check_hub()
    assert time.perf_counter() - started < 0.5
    assert hub.message.startswith("offline mode") and "not reachable" not in hub.message
    assert hub.facts["offline_mode"] is True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(data, "hub_reachable", lambda timeout_s: False)
    hub = SystemCheck().check_hub()
    assert hub.status == "warn" and "not reachable" in hub.message and hub.facts["reachable"] is False
    monkeypatch.setattr(data, "hub_reachable", lambda timeout_s: True)
    assert SystemCheck().check_hub().status == "ok"


def test_a_hanging_hub_check_does_not_hold_up_the_others(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # (offline mode answers at once)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout_s: time.sleep(5))
    started = time.perf_counter()
    report = SystemCheck(hub_timeout_s=0.2).run_all()
    assert time.perf_counter() - started < 0.2 + 1.0
    hub = by_name(report)["Hub"]
    assert hub.status == "warn" and "timed out" in hub.message
    assert [check.name for check in report.checks] == NAMES


def test_a_check_that_raises_becomes_a_warning(monkeypatch):
    def broken(self):
        raise RuntimeError("psutil exploded")

    monkeypatch.setattr(SystemCheck, "check_ram", broken)
    report = SystemCheck().run_all()
    ram = by_name(report)["RAM"]
    assert ram.status == "warn" and "RuntimeError: psutil exploded" in ram.message
    assert by_name(report)["CPU"].status in ("ok", "warn")  # the others still ran


@pytest.mark.parametrize("version, status", [((3, 8, 18), "fail"), ((3, 9, 1), "warn"), ((3, 10, 0), "ok"),
                                             ((3, 13, 2), "ok")])
def test_python_version_rules(version, status):
    check = SystemCheck().check_python(version)
    assert check.status == status and check.facts["version"] == ".".join(map(str, version))
    if status == "fail":
        assert "Sprat needs Python 3.9 or newer" in check.message


def test_disk_walks_up_to_the_nearest_existing_folder(tmp_path, monkeypatch):
    check = SystemCheck(tmp_path / "runs" / "new" / "deeper").check_disk()
    assert check.facts["checked_path"] == str(tmp_path)
    assert check.facts["total_bytes"] == shutil.disk_usage(tmp_path).total
    Usage = namedtuple("Usage", "total used free")
    asked = []
    monkeypatch.setattr(system_check.shutil, "disk_usage", lambda path: asked.append(path) or Usage(10**10, 0, 2**29))
    low = SystemCheck(tmp_path / "missing").check_disk()
    assert asked == [tmp_path] and low.status == "warn" and "checkpoints may not fit" in low.message


def test_packages_are_read_from_metadata_and_judged(monkeypatch):
    installed = {"torch": "2.13.0+cpu", "transformers": "4.46.0", "datasets": "3.1.0", "tokenizers": "0.21.0",
                 "safetensors": "0.4.5", "matplotlib": "3.9.0", "bitsandbytes": "0.45.0"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(system_check.metadata, "version", version)
    check = SystemCheck().check_packages
    assert check().status == "ok" and "torch 2.13.0+cpu" in check().message and "bitsandbytes 0.45.0" in check().message
    del installed["bitsandbytes"]
    assert check().status == "warn" and "built-in NF4 path" in check().message
    installed["torch"] = "2.10.1"
    assert check().status == "warn" and "torch 2.10.1" in check().message
    del installed["transformers"]
    assert check().status == "fail" and "transformers" in check().message


def test_hardware_manager_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("describes a machine without CUDA")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        HardwareManager("cuda")
    hardware = HardwareManager()
    assert hardware.device == "cpu" and hardware.recommended_dtype() == "float32"
    assert not hardware.flash_attention_available and not hardware.fast_bf16
    assert 0 < hardware.memory_available_bytes <= hardware.memory_total_bytes
    assert json.loads(json.dumps(hardware.to_dict()))["recommended_dtype"] == "float32"
    assert hardware.profile().device == "cpu"


def fake_gpu(monkeypatch, name: str, major: int, minor: int, gib: float, bf16: bool) -> None:
    """torch.cuda as a machine with one such GPU would answer (no kernel ever runs)."""
    props = SimpleNamespace(name=name, total_memory=int(gib * 2**30), major=major, minor=minor,
                            multi_processor_count=132)
    for attribute, value in {"is_available": lambda: True, "device_count": lambda: 1,
                             "get_device_properties": lambda index: props, "get_device_name": lambda index: name,
                             "is_bf16_supported": lambda: bf16,
                             "mem_get_info": lambda: (int(gib * 0.9 * 2**30), int(gib * 2**30))}.items():
        monkeypatch.setattr(torch.cuda, attribute, value)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)


def test_gpu_facts_and_advice_for_an_ampere_or_newer_card(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 9, 0, 79.2, bf16=True)
    check = SystemCheck().check_gpu()
    assert check.status == "ok"
    assert check.message == ("NVIDIA H100 80GB HBM3, 79.2 GiB, compute 9.0: bf16 autocast recommended, "
                             "flash attention available")
    assert check.facts["compute_capability"] == [9, 0] and check.facts["bf16"] and check.facts["flash_attention"]
    hardware = HardwareManager()
    assert hardware.device == "cuda" and hardware.recommended_dtype() == "bfloat16"
    assert hardware.flash_attention_available and hardware.compute_capability == (9, 0)
    assert hardware.memory_total_bytes == int(79.2 * 2**30)


def test_gpu_facts_and_advice_for_an_older_card(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", 7, 5, 15.0, bf16=False)
    check = SystemCheck().check_gpu()
    assert "compute 7.5: fp16 autocast" in check.message and "no flash attention" in check.message
    hardware = HardwareManager()
    assert hardware.recommended_dtype() == "float16" and not hardware.flash_attention_available


def test_activation_bytes_grow_with_sequence_and_depth(tiny):
    hardware = HardwareManager("cpu")
    config = replace(tiny, context_len=32)
    short, long = (hardware.activation_bytes_per_sequence(config, seq_len) for seq_len in (16, 32))
    assert 1.6 <= long / short <= 2.4
    two, four = (hardware.activation_bytes_per_sequence(replace(config, num_layers=n), 16) for n in (2, 4))
    assert four > two
    with pytest.raises(ValueError, match="context_len"):
        hardware.activation_bytes_per_sequence(config, 33)


def test_depth_extrapolation_equals_measuring_the_deep_model(tiny):
    """Only 1- and 2-layer models run; a direct measurement of 3 layers must agree."""
    hardware = HardwareManager("cpu")
    config = replace(tiny, num_layers=3)
    direct = hardware._saved_bytes(Transformer(config), 1, 16) + 16 * config.vocab_size * 4
    assert hardware.activation_bytes_per_sequence(config, 16) == direct


def test_gradient_checkpointing_keeps_less_but_counts_one_recomputed_block(tiny):
    """(The first checkpointed forward imports torch._dynamo: ~2 s once per process.)"""
    hardware = HardwareManager("cpu")
    config = replace(tiny, num_layers=4)
    plain = hardware.activation_bytes_per_sequence(config, 16)
    checkpointed = hardware.activation_bytes_per_sequence(config, 16, gradient_checkpointing=True)
    one_block = plain - hardware.activation_bytes_per_sequence(replace(config, num_layers=3), 16)
    assert one_block < checkpointed < plain - one_block


def test_max_micro_batch_is_a_power_of_two_that_fits(tiny, monkeypatch):
    hardware = HardwareManager("cpu")
    batch = hardware.max_micro_batch(tiny, 16, limit=100)
    assert batch == 64  # ample memory: the limit rounded down to a power of two
    monkeypatch.setattr(hardware, "activation_bytes_per_sequence", lambda config, seq_len: 1000)
    state = 16 * tiny.num_params()
    monkeypatch.setattr(hardware, "memory_available_bytes", (state + 5500) / 0.8)
    assert hardware.max_micro_batch(tiny, 16) == 4  # room for 5 sequences
    monkeypatch.setattr(hardware, "memory_available_bytes", (state + 1500) / 0.8)
    assert hardware.max_micro_batch(tiny, 16) == 1
    monkeypatch.setattr(hardware, "memory_available_bytes", state / 2)
    assert hardware.max_micro_batch(tiny, 16) == 0


# ---- peak throughput for MFU ---------------------------------------------------------------
@pytest.mark.parametrize("name, bf16_tflops, tf32_tflops, fp32_tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5, 494.5, 67.0),
    ("NVIDIA H100 PCIe", 756.5, 378.0, 51.0),
    ("NVIDIA H100 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA H200", 989.5, 494.5, 67.0),
    ("NVIDIA H200 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA GH200 480GB", 989.5, 494.5, 67.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0, 19.5),
    ("NVIDIA L40S", 362.05, 183.0, 91.6),
    ("NVIDIA L40", 181.05, 90.5, 90.5),
    ("NVIDIA L4", 121.0, 60.0, 30.3),
    ("NVIDIA A10", 125.0, 62.5, 31.2),
    ("NVIDIA GeForce RTX 4090", 165.2, 82.6, 82.6),
    ("NVIDIA GeForce RTX 3090", 71.0, 35.6, 35.6),
])
def test_datasheet_peaks_are_the_dense_figures(name, bf16_tflops, tf32_tflops, fp32_tflops):
    assert system_check.device_peak_flops(name, torch.bfloat16) == (bf16_tflops * 1e12, False)
    assert system_check.device_peak_flops(name, torch.float16) == (bf16_tflops * 1e12, False)
    assert system_check.device_peak_flops(name, torch.float32, tf32=True) == (tf32_tflops * 1e12, False)
    assert system_check.device_peak_flops(name, torch.float32) == (fp32_tflops * 1e12, False)


@pytest.mark.parametrize("name, half_tflops, fp32_tflops", [
    ("Tesla T4", 65.0, 8.1), ("Tesla V100-SXM2-16GB", 125.0, 15.7), ("Tesla V100-PCIE-32GB", 112.0, 14.0),
    ("Tesla V100S-PCIE-32GB", 130.0, 16.4)])
def test_cards_without_bf16_tensor_cores_give_fp16_from_the_table_and_estimate_bf16(name, half_tflops, fp32_tflops):
    assert system_check.device_peak_flops(name, torch.float16) == (half_tflops * 1e12, False)
    assert system_check.device_peak_flops(name, torch.float32) == (fp32_tflops * 1e12, False)
    # no bf16 (nor TF32) units: the fp32 rate, estimated from the multiprocessors and clock
    peak, estimated = system_check.device_peak_flops(name, torch.bfloat16, capability=(7, 5), multiprocessors=40,
                                                     clock_hz=1.59e9)
    assert estimated and peak == pytest.approx(40 * 1.59e9 * 128)
    assert system_check.device_peak_flops(name, torch.float32, tf32=True, capability=(7, 5), multiprocessors=40,
                                          clock_hz=1.59e9)[1]


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU",
                                  "NVIDIA GeForce RTX 3090 Ti", "NVIDIA A800-SXM4-80GB", "NVIDIA B200"])
def test_names_that_only_resemble_a_known_card_are_estimated(name):
    assert system_check.device_peak_flops(name, torch.bfloat16)[1]


def test_estimates_follow_the_architecture_and_reproduce_known_cards():
    # an H100 SXM's 132 multiprocessors at 1.83 GHz: within 1% of its datasheet's 989.5 TFLOP/s
    peak, estimated = system_check.device_peak_flops("NVIDIA H800", torch.bfloat16, capability=(9, 0),
                                                     multiprocessors=132, clock_hz=1.83e9)
    assert estimated and peak == pytest.approx(989.5e12, rel=0.01)
    # an A100's 108 at 1.41 GHz against its 312 dense bf16 and 156 TF32
    assert system_check.estimated_peak_flops(torch.bfloat16, (8, 0), 108, 1.41e9) == pytest.approx(312e12, rel=0.01)
    assert system_check.estimated_peak_flops(torch.float32, (8, 0), 108, 1.41e9, tf32=True) == \
        pytest.approx(156e12, rel=0.01)
    # a newer capability uses the nearest known one below it; no clock: the default clock
    assert system_check.estimated_peak_flops(torch.bfloat16, (9, 1), 100) == 100 * 1.5e9 * 4096
    # nothing known about the device: an A100's figures
    assert system_check.device_peak_flops("Some Future GPU", torch.bfloat16) == (312e12, True)
    assert system_check.device_peak_flops("Some Future GPU", torch.float32) == (19.5e12, True)
    with pytest.raises(ValueError, match="int8"):
        system_check.device_peak_flops("NVIDIA H200", torch.int8)


def test_cuda_peak_flops_reads_the_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: the default clock
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 9, 0, 79.2, bf16=True)
    assert system_check.cuda_peak_flops(torch.bfloat16) == (989.5e12, False)
    fake_gpu(monkeypatch, "NVIDIA H800", 9, 0, 79.2, bf16=True)
    assert system_check.cuda_peak_flops(torch.bfloat16) == (132 * 1.5e9 * 4096, True)


def test_the_check_says_which_precision_a_cpu_trains_in_and_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("describes a machine without CUDA")
    import io

    from rich.console import Console

    import trainer
    from display import check_table

    monkeypatch.delenv(trainer.CPU_DTYPE_VARIABLE)
    trainer.remember_cpu_precision(trainer.CpuPrecision("bfloat16", 1.74, "cached"))
    check = SystemCheck().check_gpu()
    assert "training runs on the CPU in bf16 autocast (measured 1.74x as fast as fp32 on this CPU, cached)" \
        in check.message
    assert check.facts["cpu_dtype"] == "bfloat16" and check.facts["cpu_bf16_speedup"] == 1.74
    hardware = HardwareManager("cpu")
    assert hardware.fast_bf16 and hardware.recommended_dtype() == "bfloat16"
    output = io.StringIO()
    Console(file=output, width=300, color_system=None).print(check_table(SystemReport([check], 0.1), hardware))
    assert "dtype bfloat16 (measured 1.74x as fast as fp32 on this CPU, cached)" in output.getvalue()
    trainer.remember_cpu_precision(trainer.CpuPrecision("float32", 1.05))
    assert "on the CPU in fp32 (bf16 autocast measured only 1.05x" in SystemCheck().check_gpu().message
    assert HardwareManager("cpu").recommended_dtype() == "float32"
