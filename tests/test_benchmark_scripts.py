"""benchmarks/op_speed.py: the GPU command's paths at tiny sizes on the CPU, and its target table."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from lrcompile.compile import calibration

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def op_speed():
    return script("op_speed")


def test_the_gpu_methods_run_at_tiny_sizes_on_the_cpu_and_triton_is_skipped_with_its_reason(
        op_speed, tmp_path, monkeypatch, fresh_dynamo):
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(tmp_path / "calibration.json"))
    monkeypatch.delenv("LRCOMPILE_ALGORITHM", raising=False)
    paths = {name: tmp_path / name for name in ("R.md", "op.png", "op.json")}
    op_speed.main(["--device", "cpu", "--n", "64", "128", "--repeats", "1", "--dtypes", "float32",
                   "--configurations", "64:2", "--methods", "sdpa", "lowrank_triton", "lowrank_torch", "--calibrate",
                   "--results", str(paths["R.md"]), "--plot", str(paths["op.png"]), "--json", str(paths["op.json"])])
    (result,) = json.loads(paths["op.json"].read_text())
    rows = {(r["method"], r["n"], r["causal"]): r for r in result["rows"]}
    assert all(rows["lowrank_torch", n, c]["total_s"] > 0 for n in (64, 128) for c in (False, True))
    assert rows["lowrank_triton", 64, False]["skipped"].startswith("skipped (the Triton kernels run on CUDA")
    assert result["implementations"]["lowrank_torch"] == "torch"
    assert "<!-- op-speed:start -->" in paths["R.md"].read_text() and paths["op.png"].stat().st_size > 0
    # the torch sweep's calibration, keyed to this machine, is what the policy now finds for that path
    found = calibration.lookup("cpu", "torch")
    assert found.calibration is not None and found.description.startswith("this machine's calibration")
    assert "not measured" in "\n".join(op_speed.target_lines([result]))
    # the factored algorithm was forced for the run only: later calls in this process choose again
    assert "LRCOMPILE_ALGORITHM" not in os.environ


def test_targets_are_the_speed_ups_over_sdpa_in_the_same_run(op_speed):
    rows = [{"method": "sdpa", "n": 16384, "causal": False, "total_s": 1.0, "skipped": ""},
            {"method": "lowrank_triton", "n": 16384, "causal": False, "total_s": 0.2, "skipped": "",
             "product_flops": 0.05e12},
            {"method": "sdpa", "n": 16384, "causal": True, "total_s": 1.0, "skipped": ""},
            {"method": "lowrank_triton", "n": 16384, "causal": True, "total_s": 0.8, "skipped": "",
             "product_flops": 0.05e12}]
    result = {"settings": {"dtype": "bfloat16", "methods": ["sdpa", "lowrank_triton"]},
              "matmul": {"gflops": 1000.0}, "rows": rows}
    lines = op_speed.target_lines([result])
    assert "| bfloat16 | lowrank_triton | non-causal | 16384 | 5.00x | 4x | yes | 25% (< 30%) |" in lines
    assert "| bfloat16 | lowrank_triton | causal | 16384 | 1.25x | 1.5x | no | 6% (< 30%) |" in lines  # P9's, not P5's 1.2x
    assert any("| causal | 65536 |" in line and "not measured" in line for line in lines)


def test_the_cuda_run_defaults_to_the_sizes_and_methods_of_the_issue(op_speed):
    args, runs, _ = op_speed.parse_arguments(["--device", "cuda"])
    assert [(run.dtype, run.heads) for run in runs] == [("bfloat16", 16), ("float32", 16)]
    assert runs[0].n == [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    assert runs[0].methods == ["sdpa", "inductor", "lowrank_triton", "lowrank_torch"]
    assert runs[0].time_limit_s == 200 and args.json.name == "op_speed_cuda.json"  # 2 dtypes within 8 minutes


@pytest.fixture(scope="module")
def gpu_check():
    return script("gpu_check")


def test_gpu_check_runs_its_steps_at_tiny_sizes_on_the_cpu_into_one_folder(gpu_check, tmp_path, capsys):
    """The GPU run's plumbing, checked where there is no GPU: each step's log and one JSON with every
    step's results in the folder given; the CUDA tests are recorded as skipped, not as passed."""
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "tests", "autotune", "timings"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = result["steps"]
    assert steps["tests"]["status"].startswith("skipped: the CUDA tests need CUDA")
    assert steps["autotune"]["status"] == "passed" and steps["timings"]["status"] == "passed"
    assert {(row["head_dim"], row["degree"], row["causal"]) for row in steps["autotune"]["rows"]} == {
        (d, g, c) for d, g in gpu_check.SIZES["cpu"]["configurations"] for c in (False, True)}
    assert all(row["best"] in row["timed"] and len(row["timed"]) == len(gpu_check.AUTOTUNE_SPACE)
               for row in steps["autotune"]["rows"])
    assert all(row["ours_ms"] > 0 and row["flash_ms"] > 0 for row in steps["timings"]["rows"])
    table = json.loads((tmp_path / "triton_tuning.json").read_text())  # what the kernels read on that device
    assert table["device"] == "cpu" and len(table["choices"]) == len(steps["autotune"]["rows"])
    assert result["passed"] is True and result["device"] == "cpu"
    assert "speed-up" in (tmp_path / "timings.log").read_text() and (tmp_path / "autotune.log").exists()


def test_gpu_check_records_a_step_past_its_budget_as_skipped(gpu_check, tmp_path):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "timings", "--budget-s", "0"]) == 0
    status = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["timings"]["status"]
    assert status.startswith("skipped:") and "budget" in status


@pytest.mark.slow
def test_gpu_check_trains_llama_and_gpt2_one_step_with_every_site_rewritten_on_the_cpu(gpu_check, tmp_path,
                                                                                     fresh_dynamo):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "models"]) == 0
    models = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["models"]["models"]
    assert set(models) == {"llama", "llama-autocast", "gpt2"}
    for record in models.values():
        assert len(record["sites"]) == 2 and all(site["calls"] == 1 for site in record["sites"].values())
        assert record["problems"] == [] and abs(record["loss"] - record["exact_loss"]) < 0.1 * record["exact_loss"]


def test_gpu_check_without_cuda_says_so_and_writes_nothing(gpu_check, tmp_path, capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert gpu_check.main(["--out", str(tmp_path / "run")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_gpu_check_holds_each_timing_to_the_target_p9_sets_for_it(gpu_check):
    def row(head_dim, degree, causal, heads, n, ours_ms, flash_ms):
        return dict(head_dim=head_dim, degree=degree, causal=causal, heads=heads, n=n, ours_ms=ours_ms,
                    flash_ms=flash_ms, speed_up=flash_ms / ours_ms)

    assert gpu_check.target(row(64, 2, False, 16, 65536, 1.0, 21.0)) == {"target": "speed-up >= 20x", "met": True}
    assert gpu_check.target(row(64, 2, True, 16, 16384, 2.0, 2.5)) == {"target": "speed-up >= 1.5x", "met": False}
    assert gpu_check.target(row(64, 2, True, 8, 65536, 8.5, 50.0)) == {"target": "<= 8 ms", "met": False}
    assert gpu_check.target(row(32, 3, True, 16, 16384, 2.0, 2.5)) == {"target": "faster than flash", "met": True}
    assert gpu_check.target(row(32, 3, False, 16, 16384, 2.0, 2.5)) is None  # P9 asks nothing of it



@pytest.mark.slow
def test_kernel_registers_tabulates_every_launched_kernel_compiled_for_sm90(tmp_path, capsys):
    """Without a GPU: every kernel one call launches, compiled for sm_90 with Inductor's types, with
    the registers and spills ptxas reports and its bf16 tensor-core products, into its section."""
    from lrcompile.kernels import triton as triton_kernels

    if not isinstance(triton_kernels.state_kernel, __import__("triton").runtime.JITFunction):
        pytest.skip("the kernels are interpreted in this process: nothing to compile")
    kernel_registers = script("kernel_registers")
    results = tmp_path / "R.md"
    kernel_registers.main(["--configurations", "16:2", "--results", str(results)])
    section = results.read_text()
    assert "<!-- kernel-registers:start -->" in section
    rows = [line for line in section.splitlines() if line.startswith("| 16, 2 |")]
    kernels = {row.split("|")[2].strip().strip("`").split("(")[0] for row in rows}
    assert kernels == {"state_kernel", "apply_state_kernel", "chunk_states_kernel", "block_forward_kernel",
                       "block_query_backward_kernel", "block_key_backward_kernel"}
    for row in rows:  # registers counted, and every kernel's products on the tensor cores
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert int(cells[4]) > 0 and int(cells[6]) + int(cells[7]) > 0, row
