"""The Triton kernels of one call, compiled for a GPU without one: what they launch, how Inductor
types them, and what the compiler makes of them (registers, spills, tensor-core products).

A lent GPU is rare; the compiler is not. `launches_of_one_call` records every kernel launch of one
forward and one backward of lrcompile.kernels.triton at a CUDA call's tiles, on meta tensors
(sizes only: nothing runs). `inductor_signature` types each launch's arguments as Inductor does
when a compiled graph holds the kernel, `compile_for_gpu` compiles it down to a cubin for an
architecture (sm_90: H100/H200), and `ptxas_report` reads back its registers and spills from
ptxas, with the tensor-core products in its PTX. tests/test_triton_kernels.py holds every launch to
compiling under Inductor's types; benchmarks/kernel_registers.py tabulates the rest.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import torch

# launch options, not kernel arguments: Inductor turns them into the kernel's Config
LAUNCH_OPTIONS = ("num_warps", "num_stages")
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class _RecordedKernel:
    """Stands in for wrap_triton(kernel): `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


@contextlib.contextmanager
def _recording(launches):
    from lrcompile.kernels import triton as triton_kernels

    original = triton_kernels.wrap_triton
    triton_kernels.wrap_triton = lambda kernel: _RecordedKernel(kernel, launches)
    try:
        yield triton_kernels
    finally:
        triton_kernels.wrap_triton = original


def launches_of_one_call(dtype, degree: int, causal: bool, groups: int = 2, head_dim: int = 64, value_dim: int = 64,
                         n: int = 300) -> list[tuple]:
    """Every kernel launch (kernel, args, kwargs) of one forward and one backward of a GQA call
    (2 key heads of `groups` query heads, key padding) at the row tile a CUDA call takes."""
    launches = []
    with _recording(launches) as triton_kernels:
        q = torch.empty(1, 2, groups, n, head_dim, device="meta", dtype=dtype)
        k = torch.empty(1, 2, n, head_dim, device="meta", dtype=dtype)
        v = torch.empty(1, 2, n, value_dim, device="meta", dtype=dtype)
        key_weight = torch.empty(1, 2, n, device="meta", dtype=dtype)
        block = triton_kernels._block_size(torch.device("cuda"), head_dim, value_dim)
        coefficients = [1.0, 1.0, 0.5, 0.1][:degree + 1]
        scale = head_dim ** -0.5
        out, denominator, state = triton_kernels.forward(q, k, v, key_weight, coefficients, scale, causal, 64, block)
        triton_kernels.backward(torch.empty_like(out), q, k, v, key_weight, out, denominator, state, coefficients,
                                scale, causal, 64, True, block)
    return launches


def inductor_signature(kernel, args, kwargs) -> tuple[dict, dict]:
    """(signature, constexprs) as Inductor types a user-defined kernel's arguments when it compiles
    a graph holding it (torch._inductor.codegen.triton_utils.signature_of): tensors as pointers to
    their dtype, Python floats as fp64, bools as i1, an int equal to 1 as a constexpr, other ints
    as i32, and the launch's keyword constants as constexprs."""
    signature, constexprs = {}, {}
    kwargs = {name: value for name, value in kwargs.items() if name not in LAUNCH_OPTIONS}
    for name, value in inspect.signature(kernel.fn).bind(*args, **kwargs).arguments.items():
        if name in kwargs:
            signature[name], constexprs[name] = "constexpr", kwargs[name]
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, float):
            signature[name] = "fp64"
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {name} = {value!r}")
    return signature, constexprs


def compile_for_gpu(kernel, args, kwargs, arch: int = 90):
    """The launch compiled to a cubin for sm_<arch> with Inductor's argument types and the launch's options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = inductor_signature(kernel, args, kwargs)
    options = {name: value for name, value in kwargs.items() if name in LAUNCH_OPTIONS}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def tensor_core_products(ptx: str, dtype) -> dict:
    """Hopper's wgmma and mma.sync instructions on the inputs' half dtype in the PTX."""
    name = TRITON_TYPES[dtype]
    return {"wgmma": len(re.findall(rf"wgmma\.mma_async[\w.]*\.{name}", ptx)),
            "mma": len(re.findall(rf"\bmma\.sync[\w.]*\.{name}", ptx))}


def ptxas_report(compiled, arch: int = 90) -> dict:
    """Registers a thread and spill bytes a thread, from `ptxas -v` on the kernel's PTX, with the
    ptxas that Triton itself uses for the architecture."""
    from triton.backends.nvidia import compiler as nvidia

    ptxas = nvidia.get_ptxas(arch).path if hasattr(nvidia, "get_ptxas") else nvidia._path_to_binary("ptxas")[0]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(compiled.asm["ptx"])
        result = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(source), "-o", str(Path(folder) / "k.cubin")],
                                capture_output=True, text=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if result.returncode or not registers or not spills:
        raise RuntimeError(f"ptxas -v gave no register count: {text[-500:]}")
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "warps": compiled.metadata.num_warps}
