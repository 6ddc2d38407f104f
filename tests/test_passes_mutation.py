"""passes.mutation: a mask changed in place after it is built is never read from its inputs alone.

transformers 4.x builds Llama's mask as a causal matrix, then writes the padding into a slice of
it (`causal_mask[..., :m] = causal_mask[..., :m].masked_fill(padding, min)`). Read from its inputs
the mask is causal; its value is causal + key padding. Rewriting it as causal drops the padding.
"""

import pytest
import torch

from attention_corpus import BATCH, DIM, HEAD_DIM, SEQ, Heads, capture_one_graph, replacing_backend


class PaddingWrittenIntoACausalMask(Heads):
    """transformers 4.48's _prepare_4d_causal_attention_mask_with_cache_position, reduced."""

    def __init__(self, through_a_view: bool = False):
        super().__init__()
        self.through_a_view = through_a_view

    def attend(self, q, k, v, keep):
        b, n = keep.shape
        low = torch.finfo(q.dtype).min
        mask = torch.full((n, n), low, dtype=q.dtype).triu(1)[None, None].expand(b, 1, n, n).clone()
        padding = keep[:, None, None, :] == 0
        if self.through_a_view:
            mask[:, :, :, :].masked_fill_(padding, low)
        else:
            mask[:, :, :, :n] = mask[:, :, :, :n].masked_fill(padding, low)
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + mask
        return scores.softmax(-1) @ v


def inputs():
    x = torch.randn(BATCH, SEQ, DIM, dtype=torch.float64)
    keep = torch.ones(BATCH, SEQ, dtype=torch.long)
    keep[0, -3:] = 0
    return x, keep


@pytest.mark.parametrize("through_a_view", [False, True], ids=["setitem", "in-place op on a view"])
def test_a_mask_changed_in_place_is_general_and_kept_with_its_reason(through_a_view):
    module = PaddingWrittenIntoACausalMask(through_a_view).double().eval()
    (site,) = capture_one_graph(module, inputs()).sites
    assert site.mask == "general" and not site.supported
    assert "changed in place" in site.reason


def test_the_model_with_a_mask_changed_in_place_stays_exact_under_replacement():
    module = PaddingWrittenIntoACausalMask().double().eval()
    x, keep = inputs()
    replaced = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=replacing_backend(replaced=replaced))(x, keep)
        expected = module(x, keep)
    assert replaced == [0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_out_of_place_operators_spelled_with_an_underscore_are_not_mutations():
    """`a & b` is operator.and_: a window mask built from comparisons is proven as before."""
    from test_passes_masks import WindowOfEight, only_site, x

    assert only_site(WindowOfEight(), x(8)).mask == "causal"


class CheckpointedLayerWithAMaskChangedOutside(torch.nn.Module):
    """The mask is built and changed in place in the model, then passed into a checkpointed layer."""

    def __init__(self):
        super().__init__()
        self.layer = PaddingWrittenIntoACausalMask()

    def forward(self, x, keep):
        b, n = keep.shape
        low = torch.finfo(x.dtype).min
        mask = torch.full((n, n), low, dtype=x.dtype).triu(1)[None, None].expand(b, 1, n, n).clone()
        mask[:, :, :, :n] = mask[:, :, :, :n].masked_fill(keep[:, None, None, :] == 0, low)
        return torch.utils.checkpoint.checkpoint(self._attend, x, mask, use_reentrant=False)

    def _attend(self, x, mask):
        q, k, v = self.layer.split(x)
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + mask
        return scores.softmax(-1) @ v


def test_a_mask_changed_in_place_outside_a_checkpointed_layer_is_general_inside_it():
    module = CheckpointedLayerWithAMaskChangedOutside().double().eval()
    (site,) = capture_one_graph(module, inputs()).sites
    assert site.mask == "general" and "changed in place" in site.reason
