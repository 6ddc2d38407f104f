"""lrcompile.bench (`lrcompile bench`): smoke runs at tiny n (one repeat), and the arithmetic of its report."""

import argparse
import json
import math

import pytest

import lrcompile
from lrcompile.bench import command as bench
from lrcompile.bench.peak_memory import run_child
from lrcompile.bench.results import write_results_section
from lrcompile.bench.scaling import crossover, loglog_slope


def bench_args(*argv):
    # A small matmul: its rate is only a reference for the GFLOP/s column, which is not checked here.
    return bench.add_arguments(argparse.ArgumentParser()).parse_args(["--matmul-size", "256", *argv])


def measured_speedups(result):
    sdpa = {(r["n"], r["causal"]): r for r in result["rows"] if r["method"] == "sdpa"}
    return [sdpa[r["n"], r["causal"]][phase] / r[phase]
            for r in result["rows"] for phase in ("forward_s", "total_s")]


def test_eager_methods_give_a_row_per_method_n_and_mask_with_finite_ratios(tmp_path, capsys):
    result = bench.run(bench_args("--n", "64", "128", "--repeats", "1", "--methods", "sdpa", "math", "lowrank",
                                  "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")))
    rows = {(r["method"], r["n"], r["causal"]) for r in result["rows"] if not r["skipped"]}
    assert rows == {(m, n, c) for m in ("sdpa", "math", "lowrank") for n in (64, 128) for c in (False, True)}
    assert all(math.isfinite(s) and s > 0 for s in measured_speedups(result))
    assert all(r["flops"] > 0 and len(r["total_runs"]) == 1 for r in result["rows"])
    assert result["matmul"]["gflops"] > 0
    printed = capsys.readouterr().out
    assert "| 128 | causal | lowrank |" in printed and "speed-up vs sdpa" in printed
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_compiled_methods_are_timed_after_compiling_and_lowrank_compiled_is_really_rewritten(capsys):
    result = bench.run(bench_args("--n", "32", "--repeats", "1", "--causal", "no",
                                  "--methods", "sdpa", "inductor", "lowrank_compiled"))
    rows = {r["method"]: r for r in result["rows"]}
    # A lowrank_compiled row that the backend did not rewrite would be marked "not measured".
    assert not rows["lowrank_compiled"]["skipped"] and not rows["inductor"]["skipped"]
    # the compile is recorded apart from the timed runs (no comparison of two timings here)
    assert all(math.isfinite(rows[m]["first_call_s"]) for m in ("inductor", "lowrank_compiled"))
    assert all(math.isfinite(s) for s in measured_speedups(result))


def test_methods_beyond_their_limits_are_skipped_and_say_why(capsys):
    result = bench.run(bench_args("--n", "64", "256", "--repeats", "1", "--causal", "yes", "--methods", "sdpa", "math",
                                  "lowrank_compiled", "--memory-budget-gib", str(4 * 4 * 128**2 / 2**30),
                                  "--compiled-max-n", "16"))
    skipped = {(r["method"], r["n"]): r["skipped"] for r in result["rows"]}
    assert skipped["math", 64] == "" and skipped["sdpa", 256] == ""
    assert skipped["math", 256].startswith("skipped (needs 1.0 MiB")  # 4 heads x 256^2 x 4 bytes
    assert "--compiled-max-n 16" in skipped["lowrank_compiled", 64]
    assert "skipped (needs" in capsys.readouterr().out


def test_memory_budget_counts_the_weights_of_all_heads():
    settings = bench.Settings.from_args(bench_args("--heads", "4", "--batch", "2"))
    assert bench.weights_bytes(settings, 32768) == 2 * 4 * 32768**2 * 4
    assert "needs 32.0 GiB" in bench.skip_reason("math", 32768, False, settings, fused={})
    assert bench.skip_reason("inductor", 32768, False, settings, fused={False: True}) == ""  # fused into SDPA


def test_peak_memory_is_measured_in_a_child_process():
    child = run_child(["-m", "lrcompile.bench"], ["--memory-child", json.dumps(dict(
        method="lowrank", n=1024, causal=False, batch=1, heads=1, head_dim=64, degree=2, score_range=1.0,
        compiled_max_n=4096))])
    if child["note"].startswith("peak RSS cannot be reset"):
        pytest.skip(child["note"])
    # The (chunk, r) feature blocks alone are 488 x 2145 floats: several MiB above the inputs.
    assert child["peak_bytes"] > 2**20, child


@pytest.mark.parametrize("bad, message", [
    (["--warmup", "0"], "--warmup must be at least 1"),
    (["--n", "0"], "--n takes positive sequence lengths"),
    (["--score-range", "-1"], "--score-range must be positive"),
])
def test_bad_arguments_say_what_was_received(bad, message):
    with pytest.raises(ValueError, match=message):
        bench.Settings.from_args(bench_args(*bad))


def test_slope_of_a_power_law_is_its_exponent():
    assert loglog_slope([(n, 3e-9 * n**2) for n in (4096, 8192, 32768)]) == pytest.approx(2.0)
    assert loglog_slope([(4096, 1.0)]) is None


def test_crossover_is_interpolated_in_log_log_after_the_last_slower_point():
    assert crossover([(1024, 2.0), (4096, 0.5)])["n"] == pytest.approx(2048)
    # Noise below the crossing does not count: the method must stay faster from there on.
    assert crossover([(512, 0.9), (1024, 2.0), (4096, 0.5)])["n"] == pytest.approx(2048)
    assert crossover([(1024, 2.0), (2048, 1.5)])["text"] == "slower at every n up to 2048"
    assert crossover([(1024, 0.5), (2048, 0.4)])["text"] == "faster at every measured n (from 1024)"
    assert crossover([(1024, 0.5), (2048, 1.4)])["n"] is None


def test_results_section_is_replaced_without_touching_the_others(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# title\n<!-- a:start -->\nold a\n<!-- a:end -->\n<!-- b:start -->\nold b\n<!-- b:end -->\n")
    write_results_section(path, "a", "new a")
    write_results_section(path, "c", "new c")
    assert path.read_text() == ("# title\n<!-- a:start -->\nnew a\n<!-- a:end -->\n<!-- b:start -->\nold b\n"
                                "<!-- b:end -->\n\n<!-- c:start -->\nnew c\n<!-- c:end -->\n")


def test_a_compiled_row_that_lrcompile_did_not_rewrite_is_not_reported_as_lowrank(monkeypatch, capsys):
    keeps_exact = lrcompile.Policy(min_seq_len=10**6, cost_model=False)
    monkeypatch.setattr(bench.Settings, "policy", property(lambda settings: keeps_exact))
    result = bench.run(bench_args("--n", "16", "--repeats", "1", "--causal", "no", "--methods", "sdpa",
                                  "lowrank_compiled"))
    row = next(r for r in result["rows"] if r["method"] == "lowrank_compiled")
    assert row["skipped"].startswith("not measured") and row["total_s"] is None


def test_the_module_runs_as_a_script(tmp_path):
    """`python -m lrcompile.bench`, as the docs and the memory children call it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lrcompile.bench", "--n", "32", "--repeats", "1", "--methods", "sdpa",
                           "lowrank", "--causal", "yes", "--matmul-size", "64", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {(r["method"], r["causal"]) for r in rows} == {("sdpa", True), ("lowrank", True)}


def test_a_cuda_run_reports_the_byte_model_rate():
    from lrcompile.bench.report import table_lines

    result = bench.run(bench_args("--n", "32", "--repeats", "1", "--methods", "sdpa", "lowrank", "--causal", "no"))
    assert "GB/s (byte model)" not in table_lines(result)[0]
    result["settings"]["device"] = "cuda"  # the table as a GPU run prints it
    header, _, *rows = table_lines(result)
    assert header.endswith("| GB/s (byte model) |")
    lowrank = next(r for r in result["rows"] if r["method"] == "lowrank")
    assert lowrank["bytes"] > next(r for r in result["rows"] if r["method"] == "sdpa")["bytes"]
    assert all(float(row.split("|")[-2]) >= 0 for row in rows)


def test_configurations_after_the_time_limit_are_skipped_and_say_so():
    result = bench.run(bench_args("--n", "16", "32", "--repeats", "1", "--methods", "sdpa", "--causal", "no",
                                  "--time-limit-s", "0"))
    skipped = {r["n"]: r["skipped"] for r in result["rows"]}
    assert skipped[16] == "" and skipped[32] == "skipped (--time-limit-s 0 reached)"
