"""lrcompile.export: an ExportedProgram with the rewritten sites as lrcompile custom ops."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrcompile
from lrcompile.compile.export import export


class SelfAttention(nn.Module):
    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x, mask=None):
        batch, n, width = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, n, width)


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    x = 0.3 * torch.randn(2, 16, 32)  # scores within about 0.5: degree 4 is accurate to ~1e-6
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., 12:] = False
    return x, mask


@pytest.mark.parametrize("degree", [3, 4])  # 3 needs a score range measured on the inputs
def test_exported_program_runs_the_custom_op_and_matches_exact(inputs, degree):
    x, mask = inputs
    model = SelfAttention()
    program = export(model, (x,), {"mask": mask}, policy=lrcompile.Policy(cost_model=False, degree=degree))
    assert "torch.ops.lrcompile.factored_attention.default" in program.graph_module.code
    assert "aten.scaled_dot_product_attention" not in program.graph_module.code
    with torch.no_grad():
        got, expected = program.module()(x, mask=mask), model(x, mask)
    assert (got - expected).abs().max().item() < 1e-5


def test_exported_program_saves_and_loads(inputs):
    x, mask = inputs
    model = SelfAttention()
    program = export(model, (x,), {"mask": mask}, policy=lrcompile.Policy(cost_model=False, degree=4))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x, mask=mask), program.module()(x, mask=mask))


def test_default_policy_exports_exact_attention_where_it_would_compile_it(inputs):
    x, mask = inputs
    decisions = []
    program = export(SelfAttention(), (x,), {"mask": mask}, on_rewrite=lambda rewrite: decisions.extend(rewrite.decisions))
    (site, decision), = decisions
    assert not decision.rewrite and "exact attention is cheaper" in decision.reason
    assert "lrcompile" not in program.graph_module.code


def test_export_rejects_what_torch_export_rejects():
    with pytest.raises(TypeError, match="args must be a tuple"):
        export(SelfAttention(), torch.randn(1, 4, 32))
    with pytest.raises(TypeError, match="lrcompile.Policy"):
        export(SelfAttention(), (torch.randn(1, 4, 32),), policy={"degree": 2})


def test_export_with_dynamic_shapes_spanning_the_direct_factored_switch():
    """d = 16, degree 2: the direct algorithm below n = 1151, the factored one above. A Dim across
    that switch exports (the factored algorithm at every length) and runs at both ends."""
    from torch.export import Dim
    from lrcompile.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=2048, n_layer=1, n_head=2, n_embd=32)).eval()
    tokens = Dim("tokens", min=2, max=2047)
    program = export(model, (torch.randint(0, 256, (1, 16)),), policy=lrcompile.Policy(cost_model=False, degree=2),
                     dynamic_shapes=({1: tokens},))
    assert "torch.ops.lrcompile.factored_attention.default" in program.graph_module.code
    for n in (8, 1300):
        idx = torch.randint(0, 256, (1, n))
        with torch.no_grad():
            assert (program.module()(idx) - model(idx)).abs().max().item() < 1e-4


def test_a_saved_program_loads_with_lrcompile_load_and_names_lrcompile_without_it(inputs, tmp_path):
    """torch.export.load in a process that never imported lrcompile fails (torch gives no hook to
    import it), naming the lrcompile op; lrcompile.load registers the ops and loads."""
    import subprocess
    import sys

    x, mask = inputs
    model = SelfAttention()
    program = export(model, (x,), {"mask": mask}, policy=lrcompile.Policy(cost_model=False, degree=4))
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    bare = subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(path)!r})"],
                          capture_output=True, text=True)
    assert bare.returncode != 0 and "torch.ops.lrcompile.factored_attention" in bare.stderr
    loaded = lrcompile.load(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x, mask=mask), program.module()(x, mask=mask))
