"""lrcompile.kernels.threads: heads on separate cores give the single-threaded result."""

import pytest
import torch

from conftest import attention_inputs
from lrcompile import lowrank_attention
from lrcompile.kernels import cpu, threads


@pytest.mark.parametrize("is_causal", [False, True])
def test_heads_split_across_threads_give_the_single_thread_result(is_causal, monkeypatch):
    q, k, v = attention_inputs(2, 4, 150, 150, 8)
    grad_out = torch.randn(2, 4, 150, 8, dtype=torch.float64)

    def run():
        out = lowrank_attention(q, k, v, is_causal=is_causal, chunk_size=32)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    monkeypatch.setattr(cpu, "sweep", lambda *args, **kwargs: None)  # the torch sweep, which splits here
    monkeypatch.setenv("LRCOMPILE_ALGORITHM", "factored")  # n = 150 would be computed directly
    calls = []
    split = threads.split_heads
    monkeypatch.setattr(threads, "split_heads", lambda fn, *t: calls.append(torch.get_num_threads()) or split(fn, *t))
    monkeypatch.setattr("lrcompile.kernels.reference.split_heads", threads.split_heads)
    torch.set_num_threads(2)
    together = run()
    torch.set_num_threads(1)
    alone = run()
    torch.set_num_threads(2)
    assert calls == [2, 2, 1, 1]  # forward and backward went through the split both times
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_split_runs_each_head_group_once_and_restores_the_thread_count():
    torch.set_num_threads(2)
    seen = []

    def per_group(x, y):
        seen.append((x.shape[0], torch.get_num_threads(), torch.is_grad_enabled()))
        return x * 2, y.sum(-1)

    x, y = torch.randn(6, 3), torch.randn(6, 3, 5)
    doubled, summed = threads.split_heads(per_group, x, y)
    torch.testing.assert_close(doubled, x * 2)
    torch.testing.assert_close(summed, y.sum(-1))
    assert sorted(seen) == [(3, 1, False), (3, 1, False)]
    assert torch.get_num_threads() == 2


def test_an_error_in_a_head_group_propagates_and_restores_the_thread_count():
    torch.set_num_threads(2)

    def fails(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        threads.split_heads(fails, torch.randn(4, 2))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("heads, expected", [(1, False), (3, False), (4, True), (9, True)])
def test_only_enough_heads_are_split(heads, expected):
    assert threads.worth_splitting(torch.empty(heads), heads, 2) is expected
    assert not threads.worth_splitting(torch.empty(heads, device="meta"), heads, 2)
