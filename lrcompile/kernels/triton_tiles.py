"""The Triton primitives every kernel of lrcompile.kernels.triton shares: the head's program id,
the tile product at the inputs' precision, and a row tile's load.

Notation of all the kernels: D >= d and DV >= d_v are the padded (power of two, >= 16 for
tl.dot) tile widths; Y is a (rows, d_v + 1) operand ([w V | w] or G^) whose first d_v columns are
loaded as a (rows, DV) tile and whose last column as a vector, so DV need not cover d_v + 1.
Padded columns and rows load as zero, so they add nothing to any product. A scalar condition in
a mask is broadcast to the vector first (`rows * 0 + a < d`): the interpreter rejects scalar &
vector masks.
"""

import triton
import triton.language as tl


@triton.jit
def head_id():
    """Program axis 0, the flattened (batch, head), as int64: head * stride_head passes 2^31 past
    ~1000 heads of a degree-3 (or d = 128) state, and int32 products would wrap."""
    return tl.program_id(0).to(tl.int64)


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr):
    """a b accumulated in float32. DOT_PRECISION "bf16" or "fp16": the operands are rounded to the
    inputs' half dtype, one tensor-core product; otherwise float32 operands at that input_precision."""
    if DOT_PRECISION == "bf16":
        product = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif DOT_PRECISION == "bf16_in_fp32":  # the same products, where tl.dot cannot take bfloat16 (_Launch.of)
        product = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif DOT_PRECISION == "fp16":
        product = tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        product = tl.dot(a, b, input_precision=DOT_PRECISION)
    return product


@triton.jit
def load_rows(ptr, rows, row_mask, width, WIDTH: tl.constexpr):
    """A (rows, WIDTH) float32 tile of a row-major matrix with `width` columns (row stride given in ptr math)."""
    columns = tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (columns[None, :] < width)
    return tl.load(ptr + columns[None, :], mask=mask, other=0.0).to(tl.float32)
