"""bench/gpu_check.py without a GPU: the CPU smoke run reports every check, and a check
that raises, fails or overruns its time limit is recorded while the run goes on."""

import json
from dataclasses import replace

from bench import gpu_check
from bench.gpu_check import CheckSpec

CUDA_ONLY = {"oom", "nf4", "compile"}


def report(out) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_cpu_smoke_run_reports_every_check(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke", "--in-process"]) == 0
    document = report(tmp_path)
    assert document["finished"] and document["mode"] == "cpu-smoke"
    statuses = {check["name"]: check["status"] for check in document["checks"]}
    assert list(statuses) == [spec.name for spec in gpu_check.CHECKS]
    assert set(statuses.values()) <= set(gpu_check.STATUSES)
    for check in document["checks"]:
        if check["name"] in CUDA_ONLY:
            assert check["status"] == "skipped" and check["skip_reason"] == "no CUDA"
        else:
            assert check["status"] == "ok", check
    values = {check["name"]: check["values"] for check in document["checks"]}
    assert values["environment"]["model_attention"] != "none"
    assert values["trainer_choices"]["fused_adamw_ran"] and values["trainer_choices"]["dtype"] == "float32"
    assert values["throughput"]["sprat_tokens_per_s"] > 0 and values["throughput"]["transformers_tokens_per_s"] > 0
    assert values["trainer_run"]["exit_code"] == 0 and values["trainer_run"]["steps"] == 3
    assert values["generation"]["fp32"]["identical"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | {status} |" in markdown for name, status in statuses.items())
    assert "## Training throughput" in markdown and "## Generation" in markdown
    log = (tmp_path / "log.txt").read_text()
    assert all(f"{name}: {status}" in log for name, status in statuses.items())


def test_a_check_that_raises_or_fails_is_recorded_and_the_next_one_runs(tmp_path):
    def broken(recorder, ctx):
        recorder.record(measured=1.5)
        raise RuntimeError("kernel exploded")

    def disappointing(recorder, ctx):
        recorder.expect(True, "never said")
        recorder.expect(False, "slower than expected")

    args = gpu_check.parse_args(["--out", str(tmp_path), "--cpu-smoke", "--in-process"])
    gpu_check.run_all(args, [CheckSpec("broken", broken, 10), CheckSpec("disappointing", disappointing, 10)])
    broken_result, disappointing_result = report(tmp_path)["checks"]
    assert broken_result["status"] == "error" and "kernel exploded" in broken_result["error"]
    assert broken_result["values"] == {"measured": 1.5}  # what it measured before it raised is kept
    assert disappointing_result["status"] == "fail" and disappointing_result["failures"] == ["slower than expected"]
    assert "| broken | error |" in (tmp_path / "gpu_check.md").read_text()


def test_an_isolated_check_past_its_time_limit_is_stopped_and_the_next_one_runs(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--cpu-smoke"])
    environment = gpu_check.BY_NAME["environment"]
    gpu_check.run_all(args, [replace(environment, limit_s=0.5), environment])
    stopped, finished = report(tmp_path)["checks"]
    assert stopped["status"] == "timeout" and stopped["limit_s"] == 0.5 and "time limit" in stopped["error"]
    assert finished["status"] == "ok" and finished["values"]["device"] == "cpu"


def test_the_attention_kernel_is_named_from_the_operators_that_ran():
    assert gpu_check.attention_kernel({"aten::_scaled_dot_product_flash_attention", "aten::mm"}) == "flash"
    assert gpu_check.attention_kernel({"aten::_scaled_dot_product_flash_attention_for_cpu"}) == "flash"
    assert gpu_check.attention_kernel({"aten::_scaled_dot_product_efficient_attention"}) == "efficient"
    assert gpu_check.attention_kernel({"aten::bmm", "aten::softmax"}) == "none"
