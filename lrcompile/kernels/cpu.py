"""The cpu implementation of the kernel interface: the C kernels, built once per machine, loaded with ctypes.

`csrc/kernels.c` is compiled on first use with the system C compiler (the one Inductor uses on
CPU) into a cache directory, keyed by the sources, the compiler and the CPU, and shared by every
later process. It holds the feature maps and their VJP (`FeatureKernels`), the causal in-chunk
polynomial (`causal_block`), whole forward and backward sweeps (`Sweep`) and the direct algorithm of
short sequences (`DirectKernels`), whose matrix products
call the BLAS torch links (its sgemm_/dgemm_, found in libtorch_cpu). Where no compiler works, or
for tensors the kernels do not take (not on the CPU, not float32/float64), the reference
implementation (`lrcompile.kernels.reference`) computes the same values with torch operations;
`status()` says which path is in use and why.

`forward` and `backward` fill in the kernel interface (lrcompile.kernels.interface): the fused C
direct kernel where the caller asks for the direct algorithm, the whole C sweep where the heads
keep every thread busy (`runs_c_sweep`), else the reference's sweeps with the C feature maps and
in-chunk polynomial (`CSweeps`), several times slower at long lengths.

Environment: LRCOMPILE_NATIVE=0 turns the kernels off; LRCOMPILE_CACHE_DIR moves the cache
(default $XDG_CACHE_HOME/lrcompile or ~/.cache/lrcompile; where it cannot be written, a directory
of the user's own under the system's temporary directory, with a warning); CC names the compiler
(default cc). Which implementation runs a call is decided by `lrcompile.kernels.selector`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from lrcompile.kernels import reference
from lrcompile.kernels.interface import KernelConfig
from lrcompile.kernels.threads import fills_threads

SOURCES = Path(__file__).parent / "csrc"
MAIN_SOURCE = SOURCES / "kernels.c"  # includes the others
# -fopenmp links libgomp.so.1 by soname: inside a torch process that resolves to the libgomp torch
# already loaded, so the kernels share torch's thread pool instead of starting a second one.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Query rows per score tile of the direct kernel: causal tiles (positions of one query head) skip
# the keys after their last position (half the block at n >> tile); non-causal tiles bound a
# thread's scores to about 1 MiB.
CAUSAL_TILE = 64
NON_CAUSAL_TILE_ELEMENTS = 1 << 18

_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    return os.environ.get("LRCOMPILE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; None where they cannot be used (see status())."""
    if not enabled():
        return None
    with _lock:
        if "library" not in _state:
            _state["library"], _state["reason"] = _load()
            if _state["library"] is None:
                warnings.warn(f"lrcompile: native CPU kernels unavailable ({_state['reason']}); "
                              f"using torch operations, several times slower on CPU", stacklevel=3)
        return _state["library"]


def status() -> str:
    """One line: which implementation CPU tensors get (C kernels or torch operations), and why."""
    if not enabled():
        return "torch operations (LRCOMPILE_NATIVE=0)"
    if library() is None:
        return f"torch operations ({_state['reason']})"
    return f"native C kernels ({_state['reason']})"


class FeatureKernels:
    """The C feature map and its VJP for one (head_dim, degree), dtype and coefficient vector.

    Arguments are bound once here; a call passes pointers and strides only (ctypes converts them
    by the declared argument types), so a chunk costs a few microseconds of Python.
    """

    def __init__(self, table, coefficients: torch.Tensor | None, dtype: torch.dtype):
        lib = library()
        if lib is None:
            raise RuntimeError(f"native kernels are unavailable: {status()}")
        self.r, self.lower_dim = table.feature_dim, table.lower_dim
        self._build = getattr(lib, f"lrc_features_{SUFFIX[dtype]}")
        self._vjp = getattr(lib, f"lrc_features_vjp_{SUFFIX[dtype]}")
        # kept alive by this object (the table keeps parent and last): the kernels see addresses
        parent, last = table.recursion()
        self._coefficients = None if coefficients is None else coefficients.to(dtype).contiguous()
        # what the C functions take: addresses of parent, last and the coefficients (or NULL)
        self.tables = (parent.data_ptr(), last.data_ptr(),
                       None if self._coefficients is None else self._coefficients.data_ptr())

    def features(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (B, r, C) <- monomials of x (B, C, d), times the coefficients if any."""
        _check_unit_stride(x, out)
        self._build(x.data_ptr(), x.shape[0], x.shape[1], x.shape[2], x.stride(0), x.stride(1),
                    out.data_ptr(), self.r, out.stride(0), out.stride(1), self.lower_dim, *self.tables,
                    torch.get_num_threads())

    def backward(self, x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
        """out (B, C, d) <- vector-Jacobian product of `features` at x for grad (B, r, C)."""
        _check_unit_stride(x, grad, out)
        failed = self._vjp(x.data_ptr(), x.shape[0], x.shape[1], x.shape[2], x.stride(0), x.stride(1),
                           grad.data_ptr(), self.r, grad.stride(0), grad.stride(1),
                           out.data_ptr(), out.stride(0), out.stride(1), self.lower_dim, *self.tables,
                           torch.get_num_threads())
        if failed:
            raise MemoryError(f"lrcompile: no memory for the scratch tiles of the feature VJP "
                              f"({self.lower_dim} lower-degree features per tile)")


def causal_block(scores: torch.Tensor, grad: torch.Tensor | None, offset: int, groups: int,
                 coefficients: torch.Tensor) -> None:
    """In place: scores X (B, rows, cols) -> P(X) * M; grad dL/dA -> dL/dX = dL/dA * M * P'(X).

    M is the causal mask of position-major rows: row i is position offset + i // groups, relative
    to the block's first key. coefficients: c_0..c_g of P, in scores' dtype.
    """
    _check_unit_stride(scores, *([] if grad is None else [grad]))
    function = getattr(library(), f"lrc_causal_block_{SUFFIX[scores.dtype]}")
    function(scores.data_ptr(), scores.shape[0], scores.shape[1], scores.shape[2], scores.stride(0), scores.stride(1),
             None if grad is None else grad.data_ptr(), 0 if grad is None else grad.stride(0),
             0 if grad is None else grad.stride(1), offset, groups, coefficients.data_ptr(),
             coefficients.numel() - 1, torch.get_num_threads())


class NativeLayoutError(RuntimeError):
    """The C kernels and their ctypes mirror (Problem) disagree on a structure's layout."""


class Problem(ctypes.Structure):
    """lrc_problem of csrc/kernels.c: one attention call, every head (layouts in csrc/sweeps.h)."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "heads", "groups", "n_q", "n_k", "d", "e", "r", "r_lower", "chunk_size", "causal", "degree", "threads")] + [
        (name, ctypes.c_void_p) for name in (
            "rows", "keys", "weighted", "g_rows", "state", "out", "dq", "dk", "parent", "last",
            "phi_coefficients", "polynomial", "gemm")]


class Sweep:
    """The forward and backward sweeps of lrcompile.kernels.reference in C, one head per thread.

    Tensors are those of reference.Sweeps, flattened to (heads, rows, .) and contiguous; states
    and the (e, rows) outputs are transposed, as sweeps.h describes. Built by `sweep()` where
    `runs_c_sweep` says the C sweep runs.
    """

    def __init__(self, features: FeatureKernels, polynomial: torch.Tensor, chunk_size: int, causal: bool,
                 dtype: torch.dtype, threads: int):
        lib = library()
        self._forward = getattr(lib, f"lrc_forward_{SUFFIX[dtype]}")
        self._backward = getattr(lib, f"lrc_backward_{SUFFIX[dtype]}")
        self._features = features
        self._polynomial = polynomial.to(dtype).contiguous()  # kept alive: C sees the address
        self._fixed = dict(r=features.r, r_lower=features.lower_dim, chunk_size=chunk_size, causal=int(causal),
                           degree=self._polynomial.numel() - 1, threads=threads, parent=features.tables[0],
                           last=features.tables[1], phi_coefficients=features.tables[2],
                           polynomial=self._polynomial.data_ptr(), gemm=gemm_address(dtype))

    def forward(self, rows, keys, weighted, groups):
        """(O^ transposed (heads, e, N), S transposed (heads, e, r))."""
        heads, e = rows.shape[0], weighted.shape[-1]
        out_t = rows.new_empty(heads, e, rows.shape[1])
        state_t = rows.new_empty(heads, e, self._features.r)
        self._run(self._forward, rows, keys, weighted, groups, state=state_t, out=out_t)
        return out_t, state_t

    def backward(self, rows, keys, weighted, g_rows, state_t, groups):
        """(dq' (heads, N, d), dk' (heads, n_k, d), U transposed (heads, e, n_k))."""
        dq, dk = torch.empty_like(rows), torch.empty_like(keys)
        key_grads_t = keys.new_empty(keys.shape[0], weighted.shape[-1], keys.shape[1])
        self._run(self._backward, rows, keys, weighted, groups, g_rows=g_rows, state=state_t, out=key_grads_t,
                  dq=dq, dk=dk)
        return dq, dk, key_grads_t

    def _run(self, function, rows, keys, weighted, groups, **buffers):
        tensors = dict(rows=rows, keys=keys, weighted=weighted, **buffers)
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"native sweep: {name} must be contiguous, got strides {t.stride()}")
        problem = Problem(heads=rows.shape[0], groups=groups, n_q=rows.shape[1] // groups, n_k=keys.shape[1],
                          d=rows.shape[2], e=weighted.shape[2], **self._fixed,
                          **{name: t.data_ptr() for name, t in tensors.items()})
        if function(ctypes.addressof(problem)):
            raise MemoryError("lrcompile: a thread of the native sweep could not allocate its feature buffers")


def sweep(features: FeatureKernels, polynomial, chunk_size: int, causal: bool, rows: torch.Tensor) -> Sweep:
    """The C sweep for `rows` (heads, N, d): heads in parallel, one per thread, single-threaded products."""
    return Sweep(features, polynomial, chunk_size, causal, rows.dtype, torch.get_num_threads())


class DirectProblem(ctypes.Structure):
    """lrc_direct_problem of csrc/direct.h: one direct attention call, every head."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "heads", "groups", "n_q", "n_k", "d", "dv", "causal", "degree", "tile", "threads")] + [
        ("root_scale", ctypes.c_double)] + [(name, ctypes.c_void_p) for name in (
            "q", "k", "v", "weight", "grad_out", "out", "denominator", "dq", "dk", "dv_out", "dw", "polynomial",
            "gemm")]


# The C structs (csrc/) and their ctypes mirrors, checked against each other at load time.
_STRUCT_MIRRORS = {"problem": Problem, "direct_problem": DirectProblem}


class DirectKernels:
    """The fused direct attention (lrcompile.kernels.reference.Direct) in C (csrc/direct.h), one head per thread.

    Tensors in the kernel layout (lrcompile.kernels.interface), contiguous: q (B, H, G, n_q, d), k (B, H, n_k, d),
    v (B, H, n_k, d_v), key weights (B, H, n_k) or None. Built by `direct()`.
    """

    def __init__(self, polynomial: torch.Tensor, tile: int, causal: bool, scale: float, dtype: torch.dtype,
                 threads: int):
        lib = library()
        self._forward = getattr(lib, f"lrc_direct_forward_{SUFFIX[dtype]}")
        self._backward = getattr(lib, f"lrc_direct_backward_{SUFFIX[dtype]}")
        self._polynomial = polynomial.to(dtype).contiguous()  # kept alive: C sees the address
        self._fixed = dict(causal=int(causal), degree=self._polynomial.numel() - 1, tile=tile, threads=threads,
                           root_scale=scale**0.5, polynomial=self._polynomial.data_ptr(), gemm=gemm_address(dtype))

    def forward(self, q, k, v, key_weight):
        """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q))."""
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        denominator = q.new_empty(q.shape[:-1])
        self._run(self._forward, q, k, v, key_weight, out=out, denominator=denominator)
        return out, denominator

    def backward(self, grad_out, q, k, v, key_weight, out, denominator, key_weight_grad: bool):
        """(dq, dk, dv, d key_weight or None)."""
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dw = torch.empty_like(key_weight) if key_weight_grad else None
        self._run(self._backward, q, k, v, key_weight, grad_out=grad_out, out=out, denominator=denominator,
                  dq=dq, dk=dk, dv_out=dv, dw=dw)
        return dq, dk, dv, dw

    def _run(self, function, q, k, v, key_weight, **buffers):
        tensors = dict(q=q, k=k, v=v, weight=key_weight, **buffers)
        for name, t in tensors.items():
            if t is not None and not t.is_contiguous():
                raise ValueError(f"native direct kernel: {name} must be contiguous, got strides {t.stride()}")
        problem = DirectProblem(heads=k.shape[0] * k.shape[1], groups=q.shape[2], n_q=q.shape[3], n_k=k.shape[2],
                                d=q.shape[4], dv=v.shape[3], **self._fixed,
                                **{name: None if t is None else t.data_ptr() for name, t in tensors.items()})
        if function(ctypes.addressof(problem)):
            raise MemoryError("lrcompile: a thread of the native direct kernel could not allocate its score tiles")


def direct(polynomial: torch.Tensor, tile: int, causal: bool, scale: float, q: torch.Tensor) -> DirectKernels | None:
    """The C direct kernel for q (B, H, G, n_q, d) on the CPU in float32/float64, or None where the
    torch version should run: as for the C sweep (`runs_c_sweep`), heads go one per
    thread, so it needs enough (batch x key/value head) problems, and torch's BLAS."""
    threads = torch.get_num_threads()
    if threads > 1 and not fills_threads(q.shape[0] * q.shape[1], threads):
        return None
    if gemm_address(q.dtype) is None:
        return None
    return DirectKernels(polynomial, tile, causal, scale, q.dtype, threads)


def runs_c_sweep(heads: int, dtype: torch.dtype, threads: int | None = None) -> bool:
    """Whether the whole sweep runs in C for `heads` (batch x key/value heads) independent problems.

    Where there are enough heads to give each of torch's threads whole heads (or one thread), and
    the BLAS torch links is found; else the reference's sweeps run with the C feature maps, which
    split every product over the threads.
    """
    threads = torch.get_num_threads() if threads is None else threads
    if threads > 1 and not fills_threads(heads, threads):
        return False
    return gemm_address(dtype) is not None


# ---- the kernel interface (lrcompile.kernels.interface) -------------------------------------------


def forward(q, k, v, key_weight, config: KernelConfig, scale: float, causal: bool, direct: bool = False):
    """(out, denominator, state): the interface's forward, in C where it can run."""
    fused = direct_kernel(config, scale, causal, q, k) if direct else None
    if fused is not None:  # the direct algorithm, everything in one C call
        out, denominator = fused.forward(q.contiguous(), k.contiguous(), v.contiguous(), _contiguous(key_weight))
        return out, denominator, q.new_empty(k.shape[:-2] + (0, v.shape[-1] + 1))  # no state
    sweeps = CSweeps(q, config.coefficients, scale, causal, config.chunk_size, direct)
    return reference.sweep_forward(sweeps, q, k, v, key_weight)


def backward(grad_out, q, k, v, key_weight, out, denominator, state, config: KernelConfig, scale: float,
             causal: bool, direct: bool, key_weight_grad: bool):
    """(dq, dk, dv, d key_weight): the interface's backward, in C where it can run."""
    fused = direct_kernel(config, scale, causal, q, k) if direct else None  # as the forward chose
    if fused is not None:
        dq, dk, dv, dw = fused.backward(grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                        _contiguous(key_weight), out.contiguous(), denominator.contiguous(),
                                        key_weight_grad)
        return dq, dk, dv, (dw if key_weight_grad else q.new_empty(0))
    sweeps = CSweeps(q, config.coefficients, scale, causal, config.chunk_size, direct)
    return reference.sweep_backward(sweeps, grad_out, q, k, v, key_weight, out, denominator, state, key_weight_grad)


def direct_kernel(config: KernelConfig, scale: float, causal: bool, q, k) -> DirectKernels | None:
    """The fused C kernel for q (B, H, G, n_q, d) and k (B, H, n_k, d), or None where it does not apply."""
    rows, n_k = q.shape[2] * q.shape[3], k.shape[-2]
    tile = CAUSAL_TILE if causal else max(CAUSAL_TILE, NON_CAUSAL_TILE_ELEMENTS // max(n_k, 1))
    polynomial = torch.tensor(tuple(config.coefficients), dtype=q.dtype)
    return direct(polynomial, max(1, min(tile, rows)), causal, scale, q)


def _contiguous(t):
    return None if t is None else t.contiguous()


class CFeatureMap:
    """lrcompile.math.features.FeatureMap's interface, evaluated by the C kernels (same values)."""

    def __init__(self, table, coefficients: torch.Tensor | None, like: torch.Tensor):
        self.table = table
        self.coefficients = coefficients
        self.native = FeatureKernels(table, coefficients, like.dtype)

    def __call__(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, r, C) <- phi(rows) or psi(rows)."""
        self.native.features(rows, out)
        return out

    def backward(self, rows: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, C, d) <- dL/drows, given grad = dL/dfeatures (B, r, C)."""
        self.native.backward(rows, grad, out)
        return out


class CSweeps(reference.Sweeps):
    """The reference's chunked sweeps with their parts in C: the feature maps, the in-chunk
    polynomial, and the whole sweep where `runs_c_sweep` says so."""

    def __init__(self, q, coefficients, scale, causal, chunk_size, direct: bool = False):
        self.polynomial = torch.tensor(tuple(coefficients), dtype=q.dtype)  # c_0..c_g, for the C kernels
        super().__init__(q, coefficients, scale, causal, chunk_size, direct)

    @property
    def in_c(self) -> bool:
        # degree 0 has no parents for the C recursion to multiply: the torch evaluation is a constant
        return self.table.degree >= 1

    def feature_map(self, coefficients, like):
        return CFeatureMap(self.table, coefficients, like) if self.in_c else super().feature_map(coefficients, like)

    def whole_sweep(self, rows):
        if not self.in_c or not runs_c_sweep(rows.shape[0], rows.dtype):
            return None
        return sweep(self.phi.native, self.polynomial, self.chunk_size, self.causal, rows)

    def masked_polynomial(self, scores, d_block, offset, groups):
        if not self.in_c:
            return super().masked_polynomial(scores, d_block, offset, groups)
        causal_block(scores, d_block, offset, groups, self.polynomial)
        return scores


def gemm_address(dtype: torch.dtype) -> int | None:
    """Address of the Fortran ?gemm_ of the BLAS torch uses (MKL here), None where none is found."""
    key = ("gemm", dtype)
    if key not in _state:
        _state[key] = _find_gemm("sgemm_" if dtype == torch.float32 else "dgemm_")
    return _state[key]


def _find_gemm(name: str) -> int | None:
    # torch's BLAS is linked into libtorch_cpu (statically for MKL); a handle on the library
    # already loaded finds its symbols and those of its dependencies. MKL is LP64 in torch builds,
    # so the 32-bit integer arguments of sweeps.h are right; other BLAS are not trusted here.
    if not torch.backends.mkl.is_available():
        return None
    for candidate in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(str(candidate)), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _check_unit_stride(*tensors) -> None:
    # the kernels index with the strides they are given but need unit stride along the last axis
    for t in tensors:
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"native kernels take 3-d tensors with unit last stride, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")


_POINTER, _INT64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    # name: (return type, argument types), as in csrc/features.h and csrc/sweeps.h
    "lrc_features": (None, [_POINTER, *[_INT64] * 5, _POINTER, *[_INT64] * 4, _POINTER, _POINTER, _POINTER, _INT]),
    "lrc_features_vjp": (_INT, [_POINTER, *[_INT64] * 5, _POINTER, *[_INT64] * 3, _POINTER, *[_INT64] * 3,
                                _POINTER, _POINTER, _POINTER, _INT]),
    "lrc_causal_block": (None, [_POINTER, *[_INT64] * 5, _POINTER, *[_INT64] * 4, _POINTER, _INT64, _INT]),
    "lrc_forward": (_INT, [ctypes.c_void_p]),
    "lrc_backward": (_INT, [ctypes.c_void_p]),
    "lrc_direct_forward": (_INT, [ctypes.c_void_p]),
    "lrc_direct_backward": (_INT, [ctypes.c_void_p]),
}


def _load() -> tuple[ctypes.CDLL | None, str]:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        name = f"kernels-{_build_key(compiler, version)}.so"
        path = _cache_dir() / name
        if not path.exists():  # a read-only cache may still hold it; else build where we can write
            path = _writable(path.parent) / name
            if not path.exists():
                _build(compiler, path)
        library = ctypes.CDLL(str(path))
        for name, (result, arguments) in _SIGNATURES.items():
            for suffix in SUFFIX.values():
                function = getattr(library, f"{name}_{suffix}")
                function.restype, function.argtypes = result, arguments
        for name in _STRUCT_MIRRORS:
            getattr(library, f"lrc_sizeof_{name}").restype = _INT64
            getattr(library, f"lrc_sizeof_{name}").argtypes = []
    # Any failure (a missing symbol in a damaged cached .so is an AttributeError) means torch
    # operations instead: this runs inside a user's forward, which must not die of it.
    except Exception as error:  # noqa: BLE001
        return None, " ".join(f"{type(error).__name__}: {error}".split())[:500]
    # Not so a layout mismatch: it is a defect of this package, and running on would let C write
    # through pointers read from the wrong offsets.
    check_layout(library)
    return library, f"{version.splitlines()[0] if version else compiler}; {path}"


def check_layout(library) -> None:
    """NativeLayoutError unless each C struct has the size of its ctypes mirror (_STRUCT_MIRRORS)."""
    for name, mirror in _STRUCT_MIRRORS.items():
        c_size, mirror_size = getattr(library, f"lrc_sizeof_{name}")(), ctypes.sizeof(mirror)
        if c_size != mirror_size:
            raise NativeLayoutError(
                f"lrcompile: the C kernels' lrc_{name} is {c_size} bytes but its ctypes mirror cpu."
                f"{mirror.__name__} is {mirror_size}: lrcompile/kernels/csrc and lrcompile/kernels/cpu.py disagree on its "
                f"fields; refusing to call the kernels (they would read and write the wrong addresses). Set "
                f"LRCOMPILE_NATIVE=0 to run without them")


def _cache_dir() -> Path:
    """Where built kernels are kept: LRCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/lrcompile."""
    root = os.environ.get("LRCOMPILE_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrcompile"
    return Path(root)


def _writable(directory: Path) -> Path:
    """`directory`, created if needed; where it cannot be written, a directory of this user's own
    under the temporary directory, with a warning naming both."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK | os.X_OK):
            return directory
        problem = "no write permission"
    except OSError as error:
        problem = f"{type(error).__name__}: {error}"
    fallback = Path(tempfile.gettempdir()) / f"lrcompile-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if fallback.stat().st_uid != os.getuid() or fallback.stat().st_mode & 0o022:
        # another user's (or a shared-writable) directory could hold a planted library
        fallback = Path(tempfile.mkdtemp(prefix="lrcompile-"))
    warnings.warn(f"lrcompile: the kernel cache {directory} cannot be written ({problem}); building the C "
                  f"kernels in {fallback} instead (set LRCOMPILE_CACHE_DIR to a writable directory to keep them)",
                  stacklevel=2)
    return fallback


def _build_key(compiler: str, version: str) -> str:
    digest = hashlib.sha256()
    for source in sorted(SOURCES.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    for part in (compiler, version, " ".join(FLAGS), platform.machine(), _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    # -march=native code is only valid on a CPU with the same instruction sets
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, path: Path) -> None:
    # Build beside the target and rename: concurrent processes never load a half-written file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, str(MAIN_SOURCE), "-o", partial], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {MAIN_SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
