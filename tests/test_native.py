"""lrcompile.kernels.cpu: the C kernels against the torch evaluation and autograd, float64 references.

The kernels must build on this project's machines (CI included): a build that silently fell back
to torch would hide a broken kernel behind a slower but correct path.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrcompile.kernels import cpu, reference
from lrcompile.kernels.cpu import CFeatureMap
from lrcompile.math.features import FeatureMap, monomial_table, monomials
from lrcompile.math.polynomial import exp_polynomial

SHAPES = [(1, 3), (4, 1), (5, 4), (8, 3), (16, 2), (64, 2)]  # (head_dim, degree)


def test_native_kernels_build_here():
    if not cpu.enabled():
        pytest.skip("LRCOMPILE_NATIVE=0")
    assert cpu.library() is not None, cpu.status()
    assert cpu.status().startswith("native C kernels")


def random_rows(batch, rows, head_dim, dtype, stride_pad=0, seed=0):
    """(batch, rows, d) rows with unit last stride, and row stride d + stride_pad."""
    generator = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, rows, head_dim + stride_pad, generator=generator, dtype=torch.float64)
    return wide[..., :head_dim].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim, degree", SHAPES)
@pytest.mark.parametrize("with_coefficients", [False, True])
def test_native_features_equal_the_monomials_times_coefficients(head_dim, degree, with_coefficients, dtype):
    table = monomial_table(head_dim, degree)
    coefficients = table.coefficients(exp_polynomial(degree, 1.0, "chebyshev").coefficients, dtype, "cpu") \
        if with_coefficients else None
    rows = random_rows(3, 70, head_dim, dtype, stride_pad=3)  # 70 rows: a full tile and a partial one
    out = torch.full((3, table.feature_dim + 2, 80), float("nan"), dtype=dtype)[:, :table.feature_dim, 5:75]
    CFeatureMap(table, coefficients, rows)(rows, out)
    expected = monomials(rows.double(), table) * (1 if coefficients is None else coefficients.double())
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected.mT, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("head_dim, degree", SHAPES)
@pytest.mark.parametrize("with_coefficients", [False, True])
def test_native_feature_backward_is_the_autograd_vector_jacobian_product(head_dim, degree, with_coefficients):
    table = monomial_table(head_dim, degree)
    coefficients = torch.randn(table.feature_dim, dtype=torch.float64) if with_coefficients else None
    rows = random_rows(2, 70, head_dim, torch.float64, stride_pad=2).requires_grad_()
    grad = torch.randn(2, table.feature_dim, 70, dtype=torch.float64)
    features = monomials(rows, table) * (1 if coefficients is None else coefficients)
    (expected,) = torch.autograd.grad(features, rows, grad.mT)
    out = torch.empty(2, 70, head_dim + 4, dtype=torch.float64)[..., 1:head_dim + 1]
    CFeatureMap(table, coefficients, rows).backward(rows.detach(), grad, out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset, groups", [(0, 1), (0, 3), (2, 1), (-1, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_causal_block_is_the_masked_polynomial_and_its_derivative(offset, groups, dtype):
    coefficients = torch.tensor(exp_polynomial(3, 1.0, "chebyshev").coefficients, dtype=dtype)
    positions, keys = 5, 7
    scores = torch.randn(2, positions * groups, keys, dtype=torch.float64)
    grad = torch.randn_like(scores)
    row_position = offset + torch.arange(positions * groups) // groups
    mask = (row_position[:, None] >= torch.arange(keys)).double()
    c = coefficients.double()
    polynomial = sum(c[m] * scores**m for m in range(len(c)))
    derivative = sum(m * c[m] * scores ** (m - 1) for m in range(1, len(c)))
    got_scores, got_grad = scores.to(dtype, copy=True), grad.to(dtype, copy=True)
    cpu.causal_block(got_scores, got_grad, offset, groups, coefficients)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got_scores.double(), polynomial * mask, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got_grad.double(), grad * mask * derivative, rtol=tolerance, atol=tolerance)


def test_kernels_refuse_rows_without_unit_last_stride():
    table = monomial_table(4, 2)
    rows = torch.randn(2, 8, 4).mT.contiguous().mT  # (2, 8, 4) with stride 8 along the last axis
    with pytest.raises(ValueError, match="unit last stride"):
        CFeatureMap(table, None, rows)(rows, torch.empty(2, table.feature_dim, 8))


def test_feature_maps_run_in_c_only_where_the_call_runs_the_c_kernels():
    q, coefficients = torch.empty(1, 1, 1, 8, 4), (1.0, 1.0, 0.5)
    assert isinstance(cpu.CSweeps(q, coefficients, 1.0, False, 8).phi, cpu.CFeatureMap)
    assert type(reference.Sweeps(q, coefficients, 1.0, False, 8).phi) is FeatureMap
    assert type(cpu.CSweeps(q, (1.0,), 1.0, False, 8).phi) is FeatureMap  # degree 0: a constant, in torch


@pytest.mark.parametrize("name, mirror", [("problem", "Problem"), ("direct_problem", "DirectProblem")])
def test_a_struct_whose_ctypes_mirror_differs_from_the_c_side_is_refused(monkeypatch, name, mirror):
    class Widened(getattr(cpu, mirror)):  # a field added in Python only
        _fields_ = [("extra", cpu.ctypes.c_int64)]

    assert cpu.library() is not None
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setitem(cpu._STRUCT_MIRRORS, name, Widened)
    with pytest.raises(cpu.NativeLayoutError, match=rf"lrc_{name} is \d+ bytes but its ctypes mirror cpu.Widened is"):
        cpu.library()


def test_an_unwritable_cache_falls_back_to_a_temporary_directory_and_says_so(monkeypatch, tmp_path):
    assert cpu.library() is not None
    built = Path(cpu.status().rsplit("; ", 1)[1].rstrip(")"))  # "native C kernels (compiler; path)"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    temporary = tmp_path / "tmp"
    fallback = temporary / f"lrcompile-{os.getuid()}"
    fallback.mkdir(parents=True, mode=0o700)
    shutil.copy(built, fallback / built.name)  # the same build: found there instead of compiled again
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    monkeypatch.setattr(cpu.tempfile, "gettempdir", lambda: str(temporary))
    monkeypatch.setattr(cpu, "_state", {})
    with pytest.warns(UserWarning, match=f"kernel cache {blocker / 'cache'} cannot be written .* in {fallback} instead"):
        assert cpu.library() is not None
    assert cpu.status().endswith(f"{fallback / built.name})")


def _run_fresh_python(code, **environment):
    env = {**os.environ, **environment}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_without_a_working_compiler_the_torch_path_computes_the_same_and_says_why(tmp_path):
    code = """
import warnings, torch
from lrcompile import lowrank_attention
from lrcompile.kernels import cpu
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    out = lowrank_attention(q, k, v, is_causal=True, chunk_size=16)
print(cpu.status())
print([str(w.message) for w in caught])
print(float(out.abs().sum()))
"""
    broken = _run_fresh_python(code, CC="false", LRCOMPILE_CACHE_DIR=str(tmp_path))
    assert broken.returncode == 0, broken.stderr
    status, warnings_text, total = broken.stdout.strip().splitlines()[-3:]
    assert status.startswith("torch operations (") and "false failed on kernels.c" in status
    assert "native CPU kernels unavailable" in warnings_text
    working = _run_fresh_python(code)
    assert working.returncode == 0, working.stderr
    assert working.stdout.strip().splitlines()[-3].startswith("native C kernels")
    assert float(working.stdout.strip().splitlines()[-1]) == pytest.approx(float(total), rel=1e-12)


def test_the_built_library_is_reused_from_the_cache(tmp_path):
    code = "from lrcompile.kernels import cpu; cpu.library(); print(cpu.status())"
    first = _run_fresh_python(code, LRCOMPILE_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _run_fresh_python(code, LRCOMPILE_CACHE_DIR=str(tmp_path))
    assert second.returncode == 0 and second.stdout.strip().startswith("native C kernels"), second.stderr
    assert list(tmp_path.glob("kernels-*.so")) == built and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("is_causal", [False, True])
def test_the_c_sweep_gives_the_same_result_on_one_thread_or_two(is_causal):
    from conftest import attention_inputs
    from lrcompile import lowrank_attention

    q, k, v = attention_inputs(2, 4, 150, 150, 8)
    grad_out = torch.randn(2, 4, 150, 8, dtype=torch.float64)
    results = []
    for count in (2, 1):
        torch.set_num_threads(count)
        out = lowrank_attention(q, k, v, is_causal=is_causal, chunk_size=32)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    torch.set_num_threads(2)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("is_causal", [False, True])
def test_the_c_sweep_peak_memory_stays_below_one_n_by_r_block(is_causal):
    from lrcompile.bench.peak_memory import run_child

    n, head_dim = 32768, 64  # two heads, two threads: the C sweep
    child = run_child(["-m", "lrcompile.bench"], ["--memory-child", json.dumps(dict(
        method="lowrank", n=n, causal=is_causal, batch=1, heads=2, head_dim=head_dim, degree=2, score_range=1.0,
        compiled_max_n=n))])
    if child["note"].startswith("peak RSS cannot be reset"):
        pytest.skip(child["note"])
    # what remains is O(n d) per head: outputs, gradients, scaled and centred copies (150-170 MB here)
    one_block = n * math.comb(head_dim + 2, 2) * 4  # n x r float32 features of one head: 281 MB
    assert child["peak_bytes"] < one_block, child
