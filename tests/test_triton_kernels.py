"""The Triton kernels (lrcompile.kernels.triton) against the torch sweep and a float64 quadratic reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors, calling the launchers
`forward` / `backward` directly: under the interpreter wrap_triton cannot be traced, and the
triton_op itself is meant for CUDA sites only, so the op's registration (fake kernel, autograd,
torch.compile) is tested on CUDA only. The interpreter runs every program in Python: the shapes
are tiny and the tiles 16 wide.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own jit
functions are fixed then). Importing lrcompile imports torch._inductor and with it triton, so
when conftest got there first, the kernel tests skip here and one test runs this file again in
a fresh process that sets the variable (and LRCOMPILE_KERNELS=triton) before anything else.

Every kernel result is held to the float64 quadratic reference (lrcompile.reference) on fresh
random inputs seeded per case, scores within |x| <= 2: forward, dq, dk, dv and d key-weights, at
1e-5 (outputs) and 1e-4 (gradients) relative to the largest entry for float32 inputs, and at the
half dtypes' own rounding (HALF_TOLERANCE) for bfloat16 and float16. Half inputs' tile products
take half operands, which multiply exactly in float32, so the interpreter's products are the
tensor cores' up to summation order; the CUDA tests at the end of this file hold the hardware to
CUDA_TOLERANCE.
"""

import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from lrcompile.bench import triton_compile  # noqa: E402
from lrcompile.kernels import operands  # noqa: E402
from lrcompile.kernels import triton as triton_kernels  # noqa: E402
from lrcompile.ops import factored_op  # noqa: E402
from lrcompile.kernels.triton_slabs import slab_blocks  # noqa: E402
from lrcompile.math.features import monomial_table, monomials  # noqa: E402
from lrcompile.reference import polynomial_attention, random_attention_inputs  # noqa: E402

TAYLOR_2 = [1.0, 1.0, 0.5]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_run_here() -> bool:
    if torch.cuda.is_available():
        return True
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton.language.zeros, InterpretedFunction)


KERNELS_RUN_HERE = _kernels_run_here()
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN_HERE, reason="not skipped, moved: runs in the fresh interpreter process of "
                                 "test_kernels_pass_under_the_interpreter_in_a_fresh_process, which fails unless "
                                 "every one of these passes (TRITON_INTERPRET=1 must be set before triton is "
                                 "imported, and this process imported it first)")


@pytest.mark.skipif(KERNELS_RUN_HERE or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the kernel tests run in this process")
def test_kernels_pass_under_the_interpreter_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu",
         "-k", "not fresh_process and not compile_to_cubin and not argument_types_inductor"],
        # LRCOMPILE_ALGORITHM=factored: the torch op these kernels are compared with (state included)
        # would compute such short CPU calls directly, without a state
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, TRITON_INTERPRET="1", LRCOMPILE_KERNELS="triton", LRCOMPILE_ALGORITHM="factored"),
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, result.stdout[-4000:]  # every kernel test ran
    print(f"interpreter process: {summary}")  # the count the skips in this process stand for (pytest -s, -rP)


@pytest.fixture(autouse=True)
def _torch_sweep(monkeypatch):
    """The torch sweep, not the C one, is the reference every kernel is held to (docs/design.md §6)."""
    monkeypatch.setenv("LRCOMPILE_NATIVE", "0")


def _inputs(n_q, n_k, head_dim, value_dim, groups=1, kv_heads=1, padding=False, seed=0):
    """q (B, H, G, n_q, d), k, v, key weights (B, H, n_k) or None, all float32, scores within |x| <= 2."""
    q, k, v = random_attention_inputs(1, kv_heads * groups, n_q, n_k, head_dim, value_dim, score_range=2.0,
                                      kv_heads=kv_heads, dtype=torch.float32, seed=seed, requires_grad=False)
    key_weight = None
    if padding:  # padded keys (w = 0) and soft weights in between, one valid key at least
        generator = torch.Generator().manual_seed(seed + 1)
        key_weight = 0.5 + torch.rand(1, kv_heads, n_k, generator=generator)
        key_weight[torch.rand(1, kv_heads, n_k, generator=generator) < 0.3] = 0
        key_weight[..., 0] = 1
    q = q.unflatten(1, (kv_heads, groups))
    return [t if t is None else t.to(DEVICE) for t in (q, k, v, key_weight)]


def _relative_error(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()  # results on CUDA, references on the CPU
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _torch_sweep_values(q, k, v, key_weight, coefficients, scale, causal, chunk_size, grad_out):
    out, denominator, state, exact = factored_op.factored_attention(
        q, k, v, key_weight, coefficients, scale, causal, chunk_size, 0.0, "allow", "test")
    grads = factored_op.factored_attention_backward(
        grad_out, q, k, v, key_weight, out, denominator, state, exact, coefficients, scale, causal, chunk_size,
        key_weight is not None)
    return out, denominator, grads


def _quadratic_reference(q, k, v, key_weight, coefficients, scale, causal, grad_out):
    """out and (dq, dk, dv, dw) of the quadratic float64 polynomial attention, by autograd."""
    batch, heads, groups, n_q, d = q.shape
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    inputs, mask = [q64, k64, v64], None
    if key_weight is not None:
        w64 = key_weight.detach().cpu().double().requires_grad_()
        inputs.append(w64)
        mask = w64.log().repeat_interleave(groups, dim=1).unsqueeze(-2)  # (B, H G, 1, n_k), -inf where padded
    out = polynomial_attention(q64.flatten(1, 2), k64, v64, coefficients, attn_mask=mask, is_causal=causal,
                               scale=scale, enable_gqa=groups > 1).unflatten(1, (heads, groups))
    grads = torch.autograd.grad(out, inputs, grad_out.cpu().double())
    return out, grads


# (n_q, n_k, groups, kv_heads, chunk_size): self-attention, GQA (two query heads per key head),
# cross-attention; chunks of a tile (16), ending inside a tile (12), smaller (8) and larger (32)
LAYOUTS = {
    "self": (40, 40, 1, 2, 16),
    "gqa": (40, 40, 2, 1, 12),
    "cross_longer_keys": (24, 40, 1, 1, 8),
    "cross_longer_queries": (40, 27, 2, 1, 32),
}
MASKS = {  # (causal, key padding)
    "none": (False, False), "key_padding": (False, True), "causal": (True, False), "causal_key_padding": (True, True),
}
# Polynomials positive on the tested score range |x| <= 2: Taylor at degree 2, and at degree 3 one
# that increases everywhere (P' = 1 + x + 0.3 x^2 > 0) with P(-2) = 0.2, so denominators stay clear of 0.
POLYNOMIALS = {2: TAYLOR_2, 3: [1.0, 1.0, 0.5, 0.1]}


def _assert_gradients_close(grads, references, key_weight, tolerance):
    for name, grad, reference in zip(("dq", "dk", "dv", "dkey_weight"), grads, references):
        assert grad.shape == reference.shape, name
        if name == "dkey_weight" and key_weight is None:  # no weights, no gradient: both empty
            continue
        if name == "dkey_weight":  # d/dw of the reference's log(w) mask is undefined at w = 0
            valid = key_weight > 0
            grad, reference = grad[valid], reference[valid.to(reference.device)]
        assert _relative_error(grad, reference) < tolerance, name


@needs_kernels
@pytest.mark.parametrize("degree", POLYNOMIALS, ids=lambda g: f"degree_{g}")
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_gradients_match_the_torch_sweep_and_float64(layout, mask, degree):
    n_q, n_k, groups, kv_heads, chunk_size = LAYOUTS[layout]
    causal, padding = MASKS[mask]
    coefficients = POLYNOMIALS[degree]
    head_dim, value_dim = 4, 5
    scale = 1 / math.sqrt(head_dim)
    seed = 100 * list(LAYOUTS).index(layout) + 10 * list(MASKS).index(mask) + degree
    q, k, v, key_weight = _inputs(n_q, n_k, head_dim, value_dim, groups, kv_heads, padding, seed=seed)
    grad_out = torch.randn(q.shape[:-1] + (value_dim,), generator=torch.Generator().manual_seed(seed + 7)).to(DEVICE)

    out, denominator, state = triton_kernels.forward(q, k, v, key_weight, coefficients, scale, causal, chunk_size)
    grads = triton_kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale,
                                    causal, chunk_size, key_weight is not None)
    sweep_out, sweep_denominator, sweep_grads = _torch_sweep_values(
        q, k, v, key_weight, coefficients, scale, causal, chunk_size, grad_out)
    exact_out, exact_grads = _quadratic_reference(q, k, v, key_weight, coefficients, scale, causal, grad_out)

    assert _relative_error(out, sweep_out) < 1e-5
    assert _relative_error(denominator, sweep_denominator) < 1e-5
    assert _relative_error(out, exact_out) < 1e-5
    _assert_gradients_close(grads, sweep_grads, key_weight, 1e-4)
    _assert_gradients_close(grads, exact_grads, key_weight, 1e-4)
    if causal and n_k > n_q:  # keys no query sees get no gradient
        assert grads[1][..., n_q:, :].abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("degree, head_dim", [(2, 32), (3, 32)], ids=["degree_2_d32", "degree_3_d32"])
def test_widest_interpreted_heads_match_float64(degree, head_dim, causal):
    """d = 32: 36 degree-2 slabs of 4 x 4 under the interpreter, and at degree 3 its limit, 120 slabs
    of 4 x 4 x 4 (6545 rows)."""
    value_dim, chunk_size = 16, 16
    coefficients = POLYNOMIALS[degree]
    scale = 1 / math.sqrt(head_dim)
    q, k, v, key_weight = _inputs(20, 20, head_dim, value_dim, padding=True, seed=degree + 2 * causal)
    grad_out = torch.randn(q.shape[:-1] + (value_dim,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, denominator, state = triton_kernels.forward(q, k, v, key_weight, coefficients, scale, causal, chunk_size)
    grads = triton_kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale,
                                    causal, chunk_size, True)
    exact_out, exact_grads = _quadratic_reference(q, k, v, key_weight, coefficients, scale, causal, grad_out)
    assert _relative_error(out, exact_out) < 1e-5
    _assert_gradients_close(grads, exact_grads, key_weight, 1e-4)


@needs_kernels
@pytest.mark.parametrize("degree", POLYNOMIALS, ids=lambda g: f"degree_{g}")
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("head_dim", [5, 9], ids=lambda d: f"d{d}")
def test_state_is_one_row_per_monomial_in_the_torch_sweeps_order(head_dim, causal, degree):
    """r = C(d + g, g) rows, row f summing monomial f of k' (monomial_table's order, no coefficient)
    times W^_j over the keys: the torch sweep's state, by enumeration in float64. d = 5 and 9
    span two and three column blocks of a slab (INTERPRETED_SLAB_WIDTH), so off-diagonal slabs and
    the masked doubles of the diagonal ones are both in play."""
    value_dim, scale = 3, 0.5
    q, k, v, key_weight = _inputs(24, 24, head_dim, value_dim, padding=True, seed=40 + degree + head_dim)
    state = triton_kernels.forward(q, k, v, key_weight, POLYNOMIALS[degree], scale, causal, 16)[2]
    k_centred = operands.centre_keys(k.double(), key_weight.double(), scale, causal)[0]
    weighted = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).double() * key_weight.double().unsqueeze(-1)
    expected = monomials(k_centred, monomial_table(head_dim, degree)).mT @ weighted
    assert state.shape == (1, 1, math.comb(head_dim + degree, degree), value_dim + 1)
    assert triton_kernels.state_rows(head_dim, degree) == math.comb(head_dim + degree, degree)
    assert _relative_error(state, expected) < 1e-5
    if not causal:  # the torch sweep's own state (its causal call keeps none past the last chunk)
        sweep_state = factored_op.factored_attention(q, k, v, key_weight, POLYNOMIALS[degree], scale, causal, 16,
                                                     0.0, "allow", "test")[2]
        assert _relative_error(state, sweep_state) < 1e-5


@triton.jit
def _slab_blocks_kernel(out_ptr, n_blocks, POWER: tl.constexpr, NBP: tl.constexpr):
    slab = tl.program_id(0)
    first, second, third = slab_blocks(slab, n_blocks, POWER, NBP)
    tl.store(out_ptr + 3 * slab, first)
    tl.store(out_ptr + 3 * slab + 1, second)
    tl.store(out_ptr + 3 * slab + 2, third)


@needs_kernels
@pytest.mark.parametrize("power", [2, 3])
@pytest.mark.parametrize("n_blocks", [1, 3, 8, 16])
def test_slab_numbering_is_colex_over_the_column_blocks(n_blocks, power):
    """slab_blocks' closed form against the enumeration: (I, J) with I <= J, or (I, J, L) with
    I <= J <= L, in colex order (the last block slowest), as many as _Launch.slab_count says."""
    if power == 2:
        blocks = [(i, j, j) for j in range(n_blocks) for i in range(j + 1)]
    else:
        blocks = [(i, j, last) for last in range(n_blocks) for j in range(last + 1) for i in range(j + 1)]
    assert len(blocks) == math.comb(n_blocks + power - 1, power)
    out = torch.full((len(blocks), 3), -1, dtype=torch.int32, device=DEVICE)
    _slab_blocks_kernel[(len(blocks),)](out, n_blocks, POWER=power, NBP=triton.next_power_of_2(n_blocks))
    assert out.cpu().tolist() == [list(b) for b in blocks]


def test_the_state_has_the_symmetric_rank_at_the_issues_sizes():
    """r = C(d + g, g): 2145 rows at d = 64, degree 2 (not d (d + 1) + 1 = 4161), 6545 at d = 32,
    degree 3 (not 17953), and the slabs compute no more than 1.3 r' of them."""
    assert triton_kernels.state_rows(64, 2) == 2145 and triton_kernels.state_rows(32, 3) == 6545
    for head_dim, degree in ((64, 2), (32, 3), (128, 2)):
        launch = triton_kernels._Launch(head_dim, 64, degree, (1.0, 1.0, 0.5, 0.1), 64, "bf16")
        computed = sum(launch.slab_count(m) * (launch.slab_width(m) ** m if m > 1 else head_dim)
                       for m in launch.powers) + 1
        assert triton_kernels.state_rows(head_dim, degree) <= computed <= 1.3 * triton_kernels.state_rows(head_dim,
                                                                                                           degree)


# Half-precision inputs against float64 on the same (rounded) inputs. The operands stay in the
# input dtype into every tile product, which accumulates in float32: q', k', W^ and G^ are each
# rounded once to it, and so are the features formed from them and the float32 states where a
# product takes them as an operand (bfloat16 2^-9, float16 2^-12 relative, as on tensor cores;
# the interpreter multiplies the rounded operands exactly in float32). Gradients cancel, so their
# errors are taken against the largest entry with room for that: 2e-2 for bfloat16 (the worst
# case seen, causal dq, is 1.4e-2), 5e-3 for float16.
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@needs_kernels
@pytest.mark.parametrize("degree", POLYNOMIALS, ids=lambda g: f"degree_{g}")
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("dtype", HALF_TOLERANCE, ids=str)
def test_half_precision_inputs_accumulate_in_float32(dtype, causal, degree):
    head_dim, value_dim, scale, chunk_size = 4, 5, 0.5, 12
    coefficients = POLYNOMIALS[degree]
    q, k, v, key_weight = _inputs(24, 24, head_dim, value_dim, groups=2, padding=True, seed=60 + degree + 2 * causal)
    q, k, v, key_weight = (t.to(dtype) for t in (q, k, v, key_weight))
    grad_out = torch.randn(q.shape[:-1] + (value_dim,), generator=torch.Generator().manual_seed(61)).to(DEVICE, dtype)
    out, denominator, state = triton_kernels.forward(q, k, v, key_weight, coefficients, scale, causal, chunk_size)
    grads = triton_kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale,
                                    causal, chunk_size, True)
    exact_out, exact_grads = _quadratic_reference(q, k, v, key_weight, coefficients, scale, causal, grad_out)
    assert out.dtype == dtype and denominator.dtype == torch.float32
    assert all(grad.dtype == dtype for grad in grads)
    assert _relative_error(out, exact_out) < HALF_TOLERANCE[dtype]
    _assert_gradients_close(grads, exact_grads, key_weight, HALF_TOLERANCE[dtype])


@needs_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_ops_pass_opcheck_with_a_grouped_query_view(dtype, causal):
    """Schema, fake kernel (sizes and strides) and autograd registration of both Triton ops, on
    GQA's grouped query layout as the rewrite hands it: a view of a transposed (B, n, H, d) projection."""
    generator = torch.Generator().manual_seed(70 + causal)
    q = torch.randn(1, 20, 4, 4, generator=generator).to(DEVICE, dtype).transpose(1, 2).unflatten(1, (2, 2))
    k, v = (torch.randn(1, 20, 2, 4, generator=generator).to(DEVICE, dtype).transpose(1, 2) for _ in range(2))
    key_weight = (0.5 + torch.rand(1, 2, 20, generator=generator)).to(DEVICE, dtype)
    args = (POLYNOMIALS[2], 0.5, causal, 8)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    leaves = [t.detach().requires_grad_() for t in (q, k, v, key_weight)]
    torch.library.opcheck(torch.ops.lrcompile.triton_factored_attention.default, (*leaves, *args), test_utils=utils)
    out, denominator, state = torch.ops.lrcompile.triton_factored_attention(q, k, v, key_weight, *args)
    grad_out = torch.randn(1, 20, 2, 2, 4, generator=generator).to(DEVICE, dtype).permute(0, 2, 3, 1, 4)
    torch.library.opcheck(torch.ops.lrcompile.triton_factored_attention_backward.default,
                          (grad_out, q, k, v, key_weight, out, denominator, state, *args, True), test_utils=utils)


UNSUPPORTED = {  # (coefficients, head_dim, dtype): what `supports` refuses, and the torch sweep then runs
    "degree_4": ([1.0, 1.0, 0.5, 1 / 6, 1 / 24], 4, torch.float32),
    "degree_3_d_over_32": (POLYNOMIALS[3], 33, torch.float32),
    "float64": (TAYLOR_2, 4, torch.float64),
}


@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("unsupported", UNSUPPORTED)
def test_unsupported_calls_fall_back_to_the_torch_sweep(unsupported, causal):
    coefficients, head_dim, dtype = UNSUPPORTED[unsupported]
    q, k, v, key_weight = (t.to(dtype) for t in _inputs(20, 20, head_dim, 3, padding=True))
    grad_out = torch.randn(q.shape[:-1] + (3,), generator=torch.Generator().manual_seed(5), dtype=dtype).to(DEVICE)
    assert not triton_kernels.supports(q, v, coefficients)
    out, denominator, state = triton_kernels.forward(q, k, v, key_weight, coefficients, 0.5, causal, 8)
    grads = triton_kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, 0.5,
                                    causal, 8, True)
    sweep_out, _, sweep_grads = _torch_sweep_values(q, k, v, key_weight, coefficients, 0.5, causal, 8, grad_out)
    assert torch.equal(out, sweep_out)
    for grad, sweep_grad in zip(grads, sweep_grads):
        assert torch.equal(grad, sweep_grad)


def test_causal_kernels_chunk_at_least_256_rows_on_cuda_and_as_the_site_says_elsewhere():
    """On CUDA the per-chunk states would take n / C r (d_v + 1) floats: the kernels coarsen the
    chunk (the same function at any chunk, as the layouts above check with chunks of 8 to 32)."""
    assert triton_kernels.kernel_chunk(64, torch.device("cuda")) == triton_kernels.CUDA_MIN_CHUNK == 256
    assert triton_kernels.kernel_chunk(512, torch.device("cuda")) == 512
    assert triton_kernels.kernel_chunk(12, torch.device("cpu")) == 12


def test_the_state_kernel_splits_long_rows_only_where_heads_and_slabs_leave_a_gpu_idle():
    cuda = torch.device("cuda")
    assert triton_kernels._rows_per_split(65536, 8 * 37, 64, cuda) == 32768  # B H slabs = 296 programs: 2 splits
    assert triton_kernels._rows_per_split(65536, 16 * 65 * 4, 64, cuda) == 65536  # enough programs: none
    assert triton_kernels._rows_per_split(4096, 1 * 65, 64, cuda) == 2048  # splits stay >= MIN_ROWS_PER_SPLIT
    assert triton_kernels._rows_per_split(40, 5, 16, torch.device("cpu")) == 32  # interpreted: the tests split


def test_tiles_timed_on_a_gpu_are_used_on_that_gpu_only(tmp_path, monkeypatch):
    from lrcompile.kernels import triton_tuning

    rows = [{"head_dim": 64, "degree": 2, "dtype": "torch.bfloat16", "causal": True,
             "best": {"block": 32, "chunk": 512, "ms": 1.0}}]
    monkeypatch.setenv(triton_tuning.ENVIRONMENT_VARIABLE, str(tmp_path / "tuning.json"))
    triton_tuning.record(rows, "NVIDIA H200", tmp_path / "tuning.json")
    assert triton_tuning.choice(64, 2, torch.bfloat16, True, "NVIDIA H200") == {"block": 32, "chunk": 512, "ms": 1.0}
    assert triton_tuning.choice(64, 2, torch.bfloat16, True, "NVIDIA H100") is None  # timed elsewhere
    assert triton_tuning.choice(64, 2, torch.bfloat16, False, "NVIDIA H200") is None  # not timed
    assert triton_kernels.kernel_chunk(64, torch.device("cuda"), 512) == 512
    triton_tuning._load.cache_clear()


def test_supports_says_what_it_refuses():
    def reason(degree, head_dim, value_dim=8, dtype=torch.float32):
        q, v = torch.empty(1, 1, 1, 2, head_dim, dtype=dtype), torch.empty(1, 1, 2, value_dim, dtype=dtype)
        return triton_kernels.unsupported_reason(q, v, [1.0] * (degree + 1))

    assert reason(2, 128) is None and reason(3, 32) is None and reason(1, 128) is None
    assert reason(2, 128, dtype=torch.bfloat16) is None and reason(3, 32, dtype=torch.float16) is None
    assert "degree 4" in reason(4, 8) and "degree 0" in reason(0, 8)
    assert "d = 33 at degree 3" in reason(3, 33) and "d <= 32 at degree 3" in reason(3, 33)
    assert "d = 129" in reason(2, 129)
    assert "d_v = 129" in reason(2, 64, value_dim=129)
    assert "torch.float64" in reason(2, 64, dtype=torch.float64)


@needs_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
def test_degree_one_runs_the_degree_two_kernels_with_no_quadratic_term(causal):
    coefficients = [2.0, 1.0]  # positive on the tested range |x| <= 2
    q, k, v, key_weight = _inputs(24, 24, 4, 3, groups=2, padding=True)
    grad_out = torch.randn(q.shape[:-1] + (3,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out, denominator, state = triton_kernels.forward(q, k, v, key_weight, coefficients, 0.5, causal, 16)
    grads = triton_kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, 0.5,
                                    causal, 16, True)
    exact_out, exact_grads = _quadratic_reference(q, k, v, key_weight, coefficients, 0.5, causal, grad_out)
    assert _relative_error(out, exact_out) < 1e-5
    _assert_gradients_close(grads, exact_grads, key_weight, 1e-4)


# ---- compiled for a GPU, without one ---------------------------------------------------------------


def _compiled_kernels():
    """Every kernel with the constants a launch on CUDA gives it: degree 2 at d = d_v = 64 with
    float32 inputs, and degree 3 at its limit d = 32 with d_v = 128 and half inputs."""
    launches = [triton_kernels._Launch(64, 64, 2, (1.0, 1.0, 0.5, 0.0), 64, "tf32x3"),
                triton_kernels._Launch(32, 128, 3, (1.0, 1.0, 0.5, 0.1), 32, "bf16")]
    kernels = []
    for launch in launches:
        polynomial = launch.polynomial()
        kernels += [
            (triton_kernels.block_forward_kernel, dict(launch.constants(), **polynomial)),
            (triton_kernels.block_query_backward_kernel, dict(launch.constants(), **polynomial)),
            (triton_kernels.block_key_backward_kernel, dict(launch.constants(), **polynomial)),
        ]
        for power in launch.powers:
            kernels.append((triton_kernels.state_kernel, launch.power_constants(power)))
            kernels += [(triton_kernels.chunk_states_kernel, dict(launch.power_constants(power), REVERSE=reverse,
                                                                  STORE_TOTAL=not reverse)) for reverse in (False, True)]
        for chunked in (False, True):
            kernels += [(triton_kernels.apply_state_kernel,
                         dict(launch.apply_constants(), STORE_U=store_u, GRADIENT=gradient, CHUNKED=chunked,
                              ACCUMULATE=chunked))
                        for store_u, gradient in ((True, False), (False, True), (True, True))]
    return kernels


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() and KERNELS_RUN_HERE,
                    reason="the kernels are interpreted in this process: nothing to compile")
def test_kernels_compile_to_cubin_for_sm90():
    """The interpreter accepts what the compiler may not (layouts, loop-carried types, scalar masks):
    compile each kernel down to a cubin for the H100/H200 architecture, which needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, constants in _compiled_kernels():
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "i32"
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() and KERNELS_RUN_HERE,
                    reason="the kernels are interpreted in this process: nothing to compile")
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("dtype, degree", [(torch.bfloat16, 2), (torch.float32, 3)], ids=["bfloat16_degree_2",
                                                                                         "float32_degree_3"])
def test_every_launched_kernel_compiles_for_sm90_with_the_argument_types_inductor_gives(dtype, degree, causal):
    """Inductor compiles our kernels with its own signature: Python floats typed fp64 (on a device
    with fp64), pointers typed by their tensors' dtype. A float argument then makes fp64 products
    that tl.dot refuses ("Both operands must be same dtype"), which only a compile with those types
    shows: every kernel a GQA call launches, forward and backward, with the arguments it gets.
    With bfloat16 inputs every kernel's products run on the tensor cores (mma/wgmma on bf16)."""
    launches = triton_compile.launches_of_one_call(dtype, degree, causal, groups=2, head_dim=CUDA_HEAD_DIM[degree])
    assert {kernel.fn.__name__ for kernel, _, _ in launches} >= set(FORWARD_KERNELS[causal] + BACKWARD_KERNELS[causal])
    failures = []
    for kernel, args, kwargs in launches:
        try:
            compiled = triton_compile.compile_for_gpu(kernel, args, kwargs, arch=90)
        except Exception as error:  # noqa: BLE001 - collect every kernel's failure
            failures.append(f"{kernel.fn.__name__}: {type(error).__name__}: {str(error)[-300:]}")
            continue
        # half operands reach the tensor cores: Hopper's wgmma (or mma.sync) on bf16, not FMA loops
        if dtype == torch.bfloat16 and not any(triton_compile.tensor_core_products(compiled.asm["ptx"], dtype).values()):
            failures.append(f"{kernel.fn.__name__}: no bf16 tensor-core product in the PTX")
    assert not failures, "\n".join(failures)
    typed = {kernel.fn.__name__: triton_compile.inductor_signature(kernel, args, kwargs)[0]
             for kernel, args, kwargs in launches}
    assert not [name for name, signature in typed.items() if "fp64" in signature.values()]  # no Python float


# ---- on CUDA: the registered ops, and the kernels inside a compiled model --------------------------
# Skipped without CUDA; benchmarks/gpu_check.py runs them on a lent GPU. Sizes leave partial tiles
# (n = 300 against 64-row tiles, several chunks of 64) and use each degree's largest head dim.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton_op is for CUDA sites; needs CUDA")
CUDA_HEAD_DIM = {2: 64, 3: 32}
# float32 inputs run tf32x3 products (float32-accurate): what remains is float32 summation over
# n = 300 keys in a different order. bfloat16 inputs go into bfloat16 tensor-core products, whose
# operands (features, G^, the float32 states) are rounded to bfloat16 (2^-9 relative), as under the
# interpreter, where HALF_TOLERANCE's worst case is 1.4e-2 (causal dq); 3e-2 for gradients leaves a
# factor 2 (not yet measured on a GPU).
CUDA_TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 3e-2)}  # (out, gradients)


def _cuda_case(dtype, degree, causal, seed):
    head_dim = CUDA_HEAD_DIM[degree]
    q, k, v, key_weight = _inputs(300, 300, head_dim, 64, groups=2, kv_heads=2, padding=True, seed=seed)
    args = (POLYNOMIALS[degree], 1 / math.sqrt(head_dim), causal, 64)  # coefficients, scale, causal, chunk_size
    return [t.to(dtype) for t in (q, k, v, key_weight)], args


@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("degree", POLYNOMIALS, ids=lambda g: f"degree_{g}")
@pytest.mark.parametrize("dtype", CUDA_TOLERANCE, ids=str)
@needs_cuda
@pytest.mark.gpu
def test_triton_op_on_cuda_matches_float64(dtype, degree, causal):
    inputs, args = _cuda_case(dtype, degree, causal, seed=degree + 2 * causal)
    leaves = [t.clone().requires_grad_() for t in inputs]
    grad_out = torch.randn(inputs[0].shape[:-1] + (64,), generator=torch.Generator().manual_seed(11)).to(DEVICE, dtype)
    out = torch.ops.lrcompile.triton_factored_attention(*leaves, *args)[0]
    grads = torch.autograd.grad(out, leaves, grad_out)
    coefficients, scale, causal, _ = args
    exact_out, exact_grads = _quadratic_reference(*inputs, coefficients, scale, causal, grad_out)
    out_tolerance, gradient_tolerance = CUDA_TOLERANCE[dtype]
    assert out.dtype == dtype and all(grad.dtype == dtype for grad in grads)
    assert _relative_error(out, exact_out) < out_tolerance
    _assert_gradients_close(grads, exact_grads, inputs[3], gradient_tolerance)


@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("dtype, degree", [(torch.float32, 2), (torch.bfloat16, 3)], ids=["float32_degree_2",
                                                                                         "bfloat16_degree_3"])
@needs_cuda
@pytest.mark.gpu
def test_triton_op_registration_and_compiled_calls_on_cuda(dtype, degree, causal):
    """Schema, fake kernel and autograd registration (opcheck), and the op under torch.compile
    (fullgraph: Inductor inlines our kernels) equal to the eager op."""
    inputs, args = _cuda_case(dtype, degree, causal, seed=20 + degree + 2 * causal)
    torch.library.opcheck(torch.ops.lrcompile.triton_factored_attention.default, (*inputs, *args),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def attention(q, k, v, key_weight):
        return torch.ops.lrcompile.triton_factored_attention(q, k, v, key_weight, *args)[0]

    compiled_leaves, eager_leaves = ([t.clone().requires_grad_() for t in inputs] for _ in range(2))
    compiled_out = torch.compile(attention, fullgraph=True)(*compiled_leaves)
    compiled_grads = torch.autograd.grad(compiled_out.float().square().sum(), compiled_leaves)
    eager_out = attention(*eager_leaves)
    eager_grads = torch.autograd.grad(eager_out.float().square().sum(), eager_leaves)
    out_tolerance, gradient_tolerance = CUDA_TOLERANCE[dtype]
    assert _relative_error(compiled_out, eager_out) < out_tolerance
    for grad, eager_grad in zip(compiled_grads, eager_grads):
        assert _relative_error(grad, eager_grad) < gradient_tolerance


FORWARD_KERNELS = {False: ("state_kernel", "apply_state_kernel"),
                   True: ("block_forward_kernel", "chunk_states_kernel", "apply_state_kernel")}
BACKWARD_KERNELS = {False: ("state_kernel", "apply_state_kernel"),
                    True: ("block_query_backward_kernel", "block_key_backward_kernel", "chunk_states_kernel",
                           "apply_state_kernel")}
INDUCTOR_KERNEL = re.compile(r"def triton_(poi|per|red)_\w+\(")  # Inductor's names for the Triton it generates


class _Encoder(torch.nn.Module):
    """One non-causal self-attention layer (d = 64): projections around SDPA."""

    def __init__(self, width=128, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x):
        batch, n, width = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, n, width))


def _model(causal):
    """(model, inputs) on CUDA: a 2-layer GPT (d = 64, causal) or the encoder layer (non-causal), n = 512."""
    from lrcompile.models import build

    if causal:
        return build(n_layer=2, n_embd=128, n_head=2, block_size=512).cuda(), (torch.randint(0, 256, (2, 512)).cuda(),)
    torch.manual_seed(0)
    return _Encoder().cuda(), (torch.randn(2, 512, 128).cuda(),)


def compiled_step_code(model, inputs):
    """Inductor's output code (one string per compiled graph, forward and backward) for one training
    step of model compiled by lrcompile with every eligible site rewritten."""
    import lrcompile
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(model, backend=lrcompile.backend(lrcompile.Policy(cost_model=False)))

    def step():
        out = compiled(*inputs)
        out.float().square().mean().backward()
        return out

    return run_and_get_code(step)[1]  # resets dynamo first, so the step compiles afresh


def kernel_names(codes):
    """The Triton kernels defined in Inductor's output code, ours and its own, per compiled graph."""
    return [sorted(set(re.findall(r"^def (\w+)\(", code, flags=re.MULTILINE))) for code in codes]


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "gpt"])
@needs_cuda
@pytest.mark.gpu
def test_compiled_model_runs_our_kernels_beside_inductors(causal):
    model, inputs = _model(causal)
    codes = compiled_step_code(model, inputs)

    def holds(code, names):
        return all(name in code for name in names) and INDUCTOR_KERNEL.search(code) is not None

    with_forward = {i for i, code in enumerate(codes) if holds(code, FORWARD_KERNELS[causal])}
    with_backward = {i for i, code in enumerate(codes) if holds(code, BACKWARD_KERNELS[causal])}
    assert with_forward and with_backward and len(with_forward | with_backward) >= 2, (
        f"expected our kernels beside Inductor's in the forward and in the backward graph; got {kernel_names(codes)}")
