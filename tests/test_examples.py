"""The examples a user runs first, at small sizes, checked on what they print and return.

Each example's main(argv) is called in this process (one torch import, one Inductor warm-up for
all of them); one is also run as `python examples/NAME.py`, as a user runs it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrcompile
from lrcompile.models import BUILT_IN, GPT, GPTConfig, nanogpt

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def example(name):
    """examples/NAME.py as a module (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def graph_sections(text):
    """{header: code} for the '# ==== header ====' blocks that Report.graph_code() prints."""
    sections = {}
    for block in text.split("# ==== ")[1:]:
        header, _, code = block.partition(" ====\n")
        sections[header] = code
    return sections


def test_both_attention_spellings_are_one_function():
    torch.manual_seed(0)
    matmul = GPT(GPTConfig(block_size=32, n_layer=2, n_embd=32, attention="matmul"))
    sdpa = GPT(GPTConfig(block_size=32, n_layer=2, n_embd=32, attention="sdpa"))
    loaded = sdpa.load_state_dict(matmul.state_dict(), strict=False)
    assert not loaded.missing_keys and all(key.endswith("attn.bias") for key in loaded.unexpected_keys)  # tril buffers
    tokens = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(sdpa(tokens), matmul(tokens))
    logits, loss = matmul(tokens, tokens)
    assert logits.shape == (2, 32, 256) and loss.ndim == 0
    with pytest.raises(ValueError, match="attention must be one of"):
        GPT(GPTConfig(attention="flash"))


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_attention_dropout_in_training_keeps_the_site_exact_and_says_why(attention):
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_embd=32, dropout=0.1, attention=attention)).train()
    report = lrcompile.explain(model, torch.randint(0, 256, (1, 16)), policy=lrcompile.Policy(cost_model=False))
    (site,) = report.sites
    assert not site.rewritten and "drop" in site.reason


def test_the_nanogpt_built_in_is_the_matmul_spelling_and_returns_logits():
    model, (tokens,) = nanogpt(n=16, n_layer=1)
    assert BUILT_IN["nanogpt"] is nanogpt
    assert model.config.attention == "matmul" and not model.training
    assert model(*(tokens,)).shape == (1, 16, 256)


def test_quickstart_rewrites_every_site_and_reports_error_and_guard(capsys):
    result = example("quickstart").main(["--n", "32", "--n-layer", "1"])
    out = capsys.readouterr().out
    # the default policy keeps n = 32 exact, and the example says why before forcing the rewrite
    assert "default policy, n = 32: 0 of 1 sites rewritten" in out and "exact attention is cheaper" in out
    assert "1 attention site(s), 1 rewritten" in out and "transformer.h.0.attn" in out
    # random weights keep scores near 0.1, where degree 2 is close to exp
    assert result["error"] < 1e-3 and f"max |lrcompile - exact| / max |exact| = {result['error']:.1e}" in out
    (site,) = result["stats"].values()
    assert (site.calls, site.fallbacks) == (1, 0) and 0 < site.largest_error < 0.01
    assert "1 call(s), 0 sent to exact attention" in out


def test_inspect_graphs_runs_as_a_script_and_prints_the_four_graphs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(EXAMPLES / "inspect_graphs.py"), "--n", "16"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "1 attention site(s), 1 rewritten" in run.stdout
    graphs = graph_sections(run.stdout)
    assert "softmax(" in graphs["Dynamo graph, before rewriting, graph 0"]
    assert "lowrank_attention" in graphs["Dynamo graph, after rewriting, graph 0"]
    forward = graphs["AOTAutograd forward graph (what Inductor compiles), graph 0"]
    backward = graphs["AOTAutograd backward graph (what Inductor compiles), graph 0"]
    assert "lrcompile.factored_attention.default" in forward
    assert "factored_attention_backward" in backward and "_softmax_backward_data" not in backward


def test_inspect_graphs_prints_the_chosen_graphs_of_the_sdpa_spelling(capsys):
    report = example("inspect_graphs").main(["--attention", "sdpa", "--n", "16",
                                             "--graph", "dynamo_before", "--graph", "dynamo_after"])
    graphs = graph_sections(capsys.readouterr().out)
    assert list(graphs) == ["dynamo_before, graph 0", "dynamo_after, graph 0"]
    assert "scaled_dot_product_attention" in graphs["dynamo_before, graph 0"]
    assert "lowrank_attention" in graphs["dynamo_after, graph 0"]
    assert report.sites[0].spelling == "sdpa" and report.sites[0].rewritten


def test_policies_prints_each_decision(capsys):
    results = example("policies").main(["--n", "32", "--n-layer", "1"])  # one site: half the compiling
    out = capsys.readouterr().out

    rewritten = {label: [site.rewritten for site in report.sites]
                 for label, report in results["include_exclude"].items()}
    assert rewritten == {"include='transformer.h.0.attn'": [True], "exclude='*.h.0.*'": [False],
                         "include='h.*.attn'": [False]}
    assert "include='transformer.h.0.attn': transformer.h.0.attn rewritten, degree 2" in out
    assert "exclude='*.h.0.*': transformer.h.0.attn kept exact (module transformer.h.0.attn excluded by pattern" in out
    assert "pattern 'h.*.attn' matches no module path of this model" in out

    short, full = results["min_seq_len"][16], results["min_seq_len"][32]
    assert not short.sites[0].rewritten and full.sites[0].rewritten
    assert "min_seq_len=32, n = 16: transformer.h.0.attn kept exact (key length 16 < min_seq_len 32)" in out

    degrees = {label: report.sites[0].degree if report.sites[0].rewritten else None
               for label, report in results["auto_degree"].items()}
    assert degrees["tolerance=1e-2"] < degrees["tolerance=1e-4"]
    assert degrees["tolerance=1e-3, bound=1.0"] == 6  # lrcompile.degree_for(1e-3, 1.0)
    assert degrees["tolerance=1e-3, bound=4.0"] is None and "score range 4 too wide" in out

    exact, allow = results["guard"]["exact"], results["guard"]["allow"]
    (exact_stats,), (allow_stats,) = exact["stats"].values(), allow["stats"].values()
    assert exact_stats.calls == exact_stats.fallbacks == 1 and exact_stats.largest_error > 0.01
    assert exact["error"] < 1e-5  # the call returned exact attention
    assert (allow_stats.calls, allow_stats.fallbacks) == (1, 0)
    assert allow["error"] > 1e-2  # the polynomial, unchecked, at scores it cannot follow
    assert "on_inaccurate='exact': 1 of 1 calls sent to exact attention" in out
    assert "on_inaccurate='allow': 0 of 1 calls sent to exact attention (nothing checked)" in out


def test_gpt_trains_the_rewritten_model_like_the_exact_one(capsys):
    result = example("gpt").main(["--n", "16", "--n-layer", "1", "--steps", "2", "--batch", "2"])
    out = capsys.readouterr().out
    exact, ours = result["losses"]["exact"], result["losses"]["lrcompile"]
    assert len(exact) == len(ours) == 2
    assert ours[1] < ours[0]  # it learns
    assert max(abs(a - b) for a, b in zip(exact, ours)) < 1e-3
    assert result["sites_rewritten"] == 1 and "attention sites running the low-rank op: 1 of 1" in out


def test_train_char_gpt_learns_shakespeare_with_every_site_rewritten_and_cross_evaluates(tmp_path, capsys):
    result = example("train_char_gpt").main([
        "--block-size", "32", "--batch", "4", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--degrees", "2", "--steps", "12", "--warmup", "2", "--lr", "1e-2", "--eval-every", "6",
        "--eval-batches", "2", "--results", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert result["sites"]["degree 2"] == {"sites": 1, "rewritten": 1, "feature_dim": [153], "reasons_kept": []}
    assert "degree 2: 1 of 1 attention sites rewritten" in out
    assert "12 steps is a smoke run" in out and "--steps 4000" in out  # says where the comparison is
    assert sum(result["site_calls"].values()) >= 12  # the training steps really ran the low-rank op
    for run in result["runs"].values():
        curve = [point["val_bits_per_char"] for point in run["curve"]]
        assert run["steps"] == 12 and [point["step"] for point in run["curve"]] == [0, 6, 12]
        assert curve[-1] < curve[0] - 0.5  # it learns (6.2 bits/char at the start: 73 characters)
        assert run["train_losses"][-1] < run["train_losses"][0]
    cross = result["cross_evaluation"]
    assert set(cross) == {"exact weights, degree 2 attention", "degree 2 weights, exact attention"}
    assert all(0 < bits < 7 for bits in cross.values())
    assert set(result["gaps"]) == {"degree 2"}
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["runs"]["exact"]["final_val_bits_per_char"] == result["runs"]["exact"]["final_val_bits_per_char"]
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_train_char_gpt_learnable_temperature_starts_as_the_plain_model_and_keeps_the_site_rewritten():
    module = example("train_char_gpt")
    config = GPTConfig(block_size=16, vocab_size=73, n_layer=1, n_embd=32, n_head=2)
    torch.manual_seed(0)
    plain = module.ModelSpec(config).build()
    torch.manual_seed(0)
    tempered = module.ModelSpec(config, learnable_temperature=True).build()
    tokens = torch.randint(0, 73, (2, 16))
    torch.testing.assert_close(tempered(tokens), plain(tokens))  # temperature 1 at the start
    with torch.no_grad():
        tempered.h[0].attn.c_attn.log_temperature.fill_(1.0)
    assert not torch.allclose(tempered(tokens), plain(tokens))
    sites = module.rewritten_sites(module.ModelSpec(config, learnable_temperature=True), 2, (tokens,))
    assert (sites["sites"], sites["rewritten"]) == (1, 1)


def test_train_char_gpt_initial_temperature_scales_the_queries_from_the_start():
    module = example("train_char_gpt")
    projection = torch.nn.Linear(8, 24)
    x = torch.randn(2, 5, 8)
    q, k, v = projection(x).split(8, dim=-1)
    tempered = module.QueryTemperature(projection, n_head=2, initial=4.0)(x)
    torch.testing.assert_close(tempered, torch.cat([4.0 * q, k, v], dim=-1))
