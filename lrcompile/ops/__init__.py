"""The op: `lowrank_attention`, SDPA's semantics over the kernels, registered with torch.library.

Owns: the public op and its argument handling (attention), the custom ops
`lrcompile::factored_attention` and its backward with their fake kernels (factored_op), the
direct/factored choice (algorithm), the run-time accuracy guard with its counters (guard), and
context parallelism: the op over a sequence sharded across the ranks of a process group, with
its custom ops and collectives (context_parallel).
May import lrcompile.kernels and lrcompile.math. Entry point: `lrcompile.ops.attention.lowrank_attention`.
"""
