"""Context parallelism (lrcompile.ops.context_parallel): a sequence sharded over 2 and 4 gloo ranks gives the
outputs and every gradient of one process running lowrank_attention on the whole sequence.

Inputs are fresh random float64 tensors with scores in about [-3, 3] (entries of q, k ~ N(0, 1),
d = 8, scale 1/sqrt(d)); everything is float64, so the only difference from one process is the
order of summation: agreement to 1e-5 relative to each tensor's largest entry (at least 1) is
required. Every rank group runs with a process-group timeout of RANK_TIMEOUT_S and the parent
kills ranks still running after JOIN_TIMEOUT_S, so a hang fails a test instead of holding CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lrcompile
from lrcompile.ops.context_parallel import (ContextParallelError, collectives, context_parallel_attention,
                                            counting_payloads)

TOLERANCE = 1e-5
RANK_TIMEOUT_S = 20     # the process group's timeout: a collective waiting on a dead rank fails after it
JOIN_TIMEOUT_S = 240    # the parent's limit on a whole group of ranks
B, H, D, N_PER_RANK, CHUNK = 2, 4, 8, 6, 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ---- running ranks ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir, task, args):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
    try:
        result = task(rank, world_size, *args)
    except BaseException as error:  # noqa: BLE001 - reported to the parent as data
        result = {"error": f"{type(error).__name__}: {error}", "type": type(error).__name__,
                  "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Leave without destructors: a process group whose peer died can block in them (results are on disk).
    os._exit(0)


def run_ranks(task, world_size, tmp_path, *args) -> list[dict]:
    """task(rank, world_size, *args) -> dict on each of world_size gloo ranks; their results."""
    context = mp.start_processes(_rank_main, args=(world_size, _free_port(), str(tmp_path), task, args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} ranks did not finish within {JOIN_TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def several(rank, world_size, tasks):
    """Several tasks on one set of ranks, since starting ranks costs seconds: {name: result}."""
    results = {}
    for name, (task, args) in tasks.items():
        try:
            results[name] = task(rank, world_size, *args)
        except Exception as error:  # noqa: BLE001 - reported to the test of that task
            results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every test's work for two ranks, run once: {task name: [result of each rank]}."""
    tasks = {"numeric": (numeric_cases, ()), "payloads": (_payloads_at_lengths, ((8, 32),)),
             "gpt": (gpt_training, (1,)), "explain": (explain_sharded, ())}
    results = run_ranks(several, 2, tmp_path_factory.mktemp("two_ranks"), tasks)
    _no_errors(results)
    return {name: [result[name] for result in results] for name in tasks}


def _no_errors(results):
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('traceback', result.get('error'))}"


# ---- the cases --------------------------------------------------------------------------------
# Each case builds the whole sequence's inputs from a seed (the same on every rank and in the parent)
# and says how a rank slices them: ranks hold contiguous slices of the sequence axis.

CASES = {
    # name: (causal, query heads, key/value heads, mask kind, queries per rank (None: same as keys))
    "non_causal": (False, H, H, None, None),
    "causal": (True, H, H, None, None),
    "non_causal_key_padding": (False, H, H, "bool", None),
    "causal_float_key_padding": (True, H, H, "float", None),
    "non_causal_gqa": (False, H, 2, None, None),
    "causal_gqa_key_padding": (True, H, 2, "bool", None),
    "cross_attention": (False, H, H, "bool", 5),
    "causal_gqa_key_padding_torch_sweep": (True, H, 2, "float", None),
    # query, key, value (and mask) as DTensors sharded along the sequence, the group their mesh
    "causal_key_padding_dtensor": (True, H, H, "bool", None),
    "non_causal_gqa_dtensor": (False, H, 2, None, None),
}


def case_inputs(name, world_size):
    causal, q_heads, kv_heads, mask_kind, q_per_rank = CASES[name]
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + world_size)
    n_k = N_PER_RANK * world_size
    n_q = (q_per_rank or N_PER_RANK) * world_size
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)  # noqa: E731
    inputs = {"q": randn(B, q_heads, n_q, D), "k": randn(B, kv_heads, n_k, D), "v": randn(B, kv_heads, n_k, D),
              "weights": randn(B, q_heads, n_q, D)}  # the loss is sum(out * weights)
    if mask_kind is not None:
        keep = torch.rand(B, 1, 1, n_k, generator=generator) > 0.3
        keep[0, ..., :N_PER_RANK + 2] = False  # batch 0: rank 0 holds no valid key at all
        keep[..., -1] = True
        inputs["mask"] = keep if mask_kind == "bool" else torch.where(keep, randn(B, 1, 1, n_k), float("-inf"))
    return inputs


def _slice(t, rank, world_size):
    size = t.shape[-2] // world_size
    return t[..., rank * size:(rank + 1) * size, :]


def _mask_slice(mask, rank, world_size):
    size = mask.shape[-1] // world_size
    return mask[..., rank * size:(rank + 1) * size]


def _attention_and_grads(attention, inputs, causal, gqa):
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in ("q", "k", "v")}
    mask = inputs.get("mask")
    if mask is not None and mask.is_floating_point():
        leaves["mask"] = mask.clone().requires_grad_(True)
        mask = leaves["mask"]
    out = attention(leaves["q"], leaves["k"], leaves["v"], attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                    chunk_size=CHUNK)
    (out * inputs["weights"]).sum().backward()
    return {"out": out.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}


def numeric_cases(rank, world_size):
    group = dist.group.WORLD
    results = {}
    for name, (causal, q_heads, kv_heads, _, _) in CASES.items():
        # "torch_sweep" cases run the torch sweeps everywhere; the others the C sweep where it runs
        os.environ.pop("LRCOMPILE_KERNELS", None)
        if name.endswith("torch_sweep"):
            os.environ["LRCOMPILE_KERNELS"] = "torch"
        full = case_inputs(name, world_size)
        mine = {key: (_mask_slice(t, rank, world_size) if key == "mask" else _slice(t, rank, world_size))
                for key, t in full.items()}
        attention = lambda *a, **kw: context_parallel_attention(*a, group=group, **kw)  # noqa: E731
        if name.endswith("dtensor"):
            attention = _on_dtensors
        with counting_payloads() as payloads:
            results[name] = _attention_and_grads(attention, mine, causal, q_heads != kv_heads)
        results[name]["payloads"] = list(payloads)
    return results


def _on_dtensors(q, k, v, attn_mask=None, **kwargs):
    """context_parallel_attention called as torch shards a sequence: DTensors with Shard(seq) on a mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = [DTensor.from_local(t, mesh, [Shard(t.dim() - 2)]) for t in (q, k, v)]
    if attn_mask is not None:
        attn_mask = DTensor.from_local(attn_mask, mesh, [Shard(attn_mask.dim() - 1)])
    out = context_parallel_attention(*sharded, attn_mask=attn_mask, **kwargs)
    assert isinstance(out, DTensor) and tuple(out.placements) == (Shard(q.dim() - 2),)
    assert out.shape[-2] == q.shape[-2] * dist.get_world_size()
    return out.to_local()


def assert_close(actual, expected, what):
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE * scale, f"{what}: max error {error:.3g}"


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_attention_and_its_gradients_equal_one_process_on_the_whole_sequence(world_size, request):
    if world_size == 2:
        results = request.getfixturevalue("two_ranks")["numeric"]
    else:
        results = run_ranks(numeric_cases, world_size, request.getfixturevalue("tmp_path"))
    _no_errors(results)
    for name, (causal, q_heads, kv_heads, _, _) in CASES.items():
        full = case_inputs(name, world_size)
        expected = _attention_and_grads(lrcompile.lowrank_attention, full, causal, q_heads != kv_heads)
        for key, tensor in expected.items():
            pieces = [result[name][key] for result in results]
            cut = -1 if key == "dmask" else -2
            whole = torch.cat(pieces, dim=cut)
            assert whole.shape == tensor.shape, f"{name} {key}: {whole.shape} vs {tensor.shape}"
            assert_close(whole, tensor, f"{name}, {world_size} ranks, {key}")


def test_exchanged_state_does_not_grow_with_the_sequence(two_ranks):
    """The collectives' payloads are the states listed by `collectives`, whatever n (2 ranks)."""
    results = two_ranks["payloads"]
    _no_errors(results)
    short, long = results[0]["payloads_by_length"]
    assert short == long
    for causal, payloads in ((False, short[0]), (True, short[1])):
        listed = collectives(causal, B * H, D, D, 2, 2)
        assert [op for op, _ in payloads] == [c.op for c in listed]
        assert [size for _, size in payloads] == [c.elements * 8 for c in listed]


def _payloads_at_lengths(rank, world_size, lengths):
    out = []
    for n in lengths:
        per_length = []
        for causal in (False, True):
            q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
            with counting_payloads() as payloads:
                context_parallel_attention(q, k, v, is_causal=causal, group=dist.group.WORLD).sum().backward()
            per_length.append(list(payloads))
        out.append(per_length)
    return {"payloads_by_length": out}


# ---- a compiled GPT, trained with the sequence sharded ----------------------------------------

GPT_BATCH, GPT_SEQ, GPT_STEPS, GPT_LR = 2, 16, 3, 0.5


def gpt_policy(group=None):
    return lrcompile.Policy(degree=2, cost_model=False, on_inaccurate="allow", causal_chunk=4, context_parallel=group)


def make_gpt():
    from lrcompile.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=GPT_SEQ, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).double()


def gpt_data():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 32, (GPT_BATCH, GPT_SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_gpt(model, step_loss, all_reduce_grads=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=GPT_LR)
    for _ in range(GPT_STEPS):
        optimizer.zero_grad()
        step_loss().backward()
        if all_reduce_grads is not None:
            all_reduce_grads()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def gpt_training(rank, world_size, data_parallel):
    """Ranks (dp, cp) of a data_parallel x (world_size / data_parallel) mesh: each dp replica a
    share of the batch, each cp rank a contiguous slice of its sequence. Every shard has as many
    tokens, so the mean of the ranks' mean losses is the mean loss over the whole batch."""
    import lrcompile.compile.backend

    context = world_size // data_parallel
    if data_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.nn.parallel import DistributedDataParallel

        mesh = init_device_mesh("cpu", (data_parallel, context), mesh_dim_names=("dp", "cp"))
        group, dp_rank, cp_rank = mesh["cp"], mesh.get_local_rank("dp"), mesh.get_local_rank("cp")
    else:
        group, dp_rank, cp_rank = dist.group.WORLD, 0, rank
    sharded_sites = []
    original = lrcompile.compile.backend.rewrite_graph

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        sharded_sites.extend(d.context_parallel for _, d in result.decisions if d.context_parallel is not None)
        return result

    lrcompile.compile.backend.rewrite_graph = counting  # this child process only
    model = make_gpt()
    wrapped = DistributedDataParallel(model) if data_parallel > 1 else model
    compiled = torch.compile(wrapped, backend=lrcompile.backend(gpt_policy(group)))
    idx, targets = gpt_data()
    rows = GPT_BATCH // data_parallel
    n = GPT_SEQ // context
    mine = lambda t: t[dp_rank * rows:(dp_rank + 1) * rows, cp_rank * n:(cp_rank + 1) * n]  # noqa: E731

    def all_reduce_grads():  # DDP does this when data_parallel > 1
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size

    try:
        parameters = train_gpt(model, lambda: compiled(mine(idx), mine(targets), position_offset=cp_rank * n)[1],
                               None if data_parallel > 1 else all_reduce_grads)
    finally:
        lrcompile.compile.backend.rewrite_graph = original
    return {"parameters": parameters, "sharded_sites": len(sharded_sites)}


def _one_process_gpt():
    torch._dynamo.reset()
    model = make_gpt()
    compiled = torch.compile(model, backend=lrcompile.backend(gpt_policy()))
    idx, targets = gpt_data()
    parameters = train_gpt(model, lambda: compiled(idx, targets)[1])
    torch._dynamo.reset()
    return parameters


@pytest.mark.parametrize("world_size, data_parallel", [
    (2, 1),
    pytest.param(4, 2, marks=pytest.mark.slow),  # four processes compiling on two cores: about two minutes
], ids=["cp2", "ddp2xcp2"])
def test_compiled_gpt_trained_with_the_sequence_sharded_ends_as_one_process(world_size, data_parallel, request):
    if world_size == 2:
        results = request.getfixturevalue("two_ranks")["gpt"]
    else:
        results = run_ranks(gpt_training, world_size, request.getfixturevalue("tmp_path"), data_parallel)
    _no_errors(results)
    expected = _one_process_gpt()
    for rank, result in enumerate(results):
        assert result["sharded_sites"] >= 2, f"rank {rank}: the two attention sites were not rewritten sharded"
        for name, p in expected.items():
            assert_close(result["parameters"][name], p, f"rank {rank}, {name} after {GPT_STEPS} steps")


def explain_sharded(rank, world_size):
    """lrcompile.explain of the GPT under Policy(context_parallel=...), on every rank."""
    torch._dynamo.reset()
    model = make_gpt()
    idx, _ = gpt_data()
    n = GPT_SEQ // world_size
    report = lrcompile.explain(model, idx[:, rank * n:(rank + 1) * n], policy=gpt_policy(dist.group.WORLD),
                               position_offset=rank * n)
    return {"text": str(report), "sites": [s.context_parallel for s in report.sites],
            "forward": "\n".join(report.graphs["aot_forward"]), "backward": "\n".join(report.graphs["aot_backward"])}


def test_explain_shows_the_sharded_sites_and_their_collectives_in_the_graphs(two_ranks):
    results = two_ranks["explain"]
    _no_errors(results)
    for rank, result in enumerate(results):
        assert len(result["sites"]) == 2 and all(f"rank {rank} of 2" in s for s in result["sites"]), result["text"]
        assert "forward all_gather of key states" in result["sites"][0]
        assert "backward reduce_scatter of query states" in result["sites"][0]
        assert "context parallelism" in result["text"] and "outside the compiled graphs" in result["text"]
        # the collectives are functional collectives inside AOTAutograd's graphs, beside the sweeps
        assert "_c10d_functional.all_gather_into_tensor" in result["forward"]
        assert "lrcompile.context_causal_local" in result["forward"]
        assert "_c10d_functional.reduce_scatter_tensor" in result["backward"]
        assert "lrcompile.context_causal_local_backward" in result["backward"]


# ---- failures ---------------------------------------------------------------------------------

def mismatch_then_rank_failure(rank, world_size):
    """First the ranks disagree on the heads; then rank 1 dies and rank 0 calls again."""
    group = dist.group.WORLD
    heads = H if rank == 0 else H // 2
    q, k, v = (torch.randn(B, heads, N_PER_RANK, D, dtype=torch.float64) for _ in range(3))
    result = {}
    try:
        context_parallel_attention(q, k, v, group=group)
    except ValueError as error:
        result["mismatch"] = str(error)
    if rank == 1:
        os._exit(0)  # dies without a word: rank 0's next collective has no partner
    q, k, v = (torch.randn(B, H, N_PER_RANK, D, dtype=torch.float64) for _ in range(3))
    try:
        context_parallel_attention(q, k, v, is_causal=True, group=group)
    except ContextParallelError as error:
        result["failure"] = str(error)
    return result


def test_mismatched_shapes_and_a_dead_rank_raise_clear_errors_within_the_timeout(tmp_path):
    context = mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path), mismatch_then_rank_failure, ()),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"rank 0 still waited on its dead peer after {JOIN_TIMEOUT_S} s")
    result = torch.load(tmp_path / "rank0.pt")
    assert "error" not in result, result.get("traceback")
    assert "disagree on batch x key/value heads" in result["mismatch"]
    assert "rank failed" in result["failure"] and "rank 0 of 2" in result["failure"]


def test_policy_takes_a_group_only_where_the_polynomial_is_the_model():
    with pytest.raises(TypeError, match="ProcessGroup, a one-dimensional DeviceMesh or a group name"):
        lrcompile.Policy(context_parallel=object(), on_inaccurate="allow")
    with pytest.raises(ValueError, match="needs on_inaccurate='allow'"):
        lrcompile.Policy(context_parallel="some-group")
    assert lrcompile.Policy(context_parallel="some-group", on_inaccurate="allow").context_parallel == "some-group"


def test_a_site_kept_exact_under_context_parallelism_is_an_error_unless_excluded_by_pattern():
    from types import SimpleNamespace

    from lrcompile.compile.policy import Decision
    from lrcompile.ops.context_parallel import check_context_parallel_sites

    site = SimpleNamespace(name="softmax", module_path="h.0.attn")
    with pytest.raises(ValueError, match="would attend only to this rank's slice"):
        check_context_parallel_sites([(site, Decision(False, "attn_mask varies along the query axis"))])
    check_context_parallel_sites([(site, Decision(False, "excluded by pattern", chosen_by_user=True))])  # no error
