import pytest
import torch

from lrcompile.cli import main
from lrcompile.models import load_model


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_explain_prints_the_site_table(capsys):
    assert main(["explain", "nanogpt", "--n", "32", "--no-cost-model"]) == 0
    out = capsys.readouterr().out
    assert "4 attention site(s), 4 rewritten" in out and "h.3.attn" in out


def test_explain_graph_prints_the_graphs(capsys):
    main(["explain", "nanogpt", "--n", "16", "--no-cost-model", "--graph"])
    out = capsys.readouterr().out
    assert "Dynamo graph, after rewriting" in out and "lowrank_attention" in out


def test_check_reports_error_falling_with_degree(capsys):
    assert main(["check", "nanogpt", "--n", "32", "--degree", "4", "--compiler", "aot_eager"]) == 0
    lines = capsys.readouterr().out.splitlines()
    errors = {int(line.split()[0]): float(line.split()[1]) for line in lines
              if line.strip()[:1].isdigit() and "no site" not in line and "|" in line}
    assert errors[2] > errors[4] > 0


def test_model_from_a_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("import torch\ndef make():\n    return torch.nn.Linear(3, 3), torch.randn(2, 3)\n")
    model, inputs = load_model(f"{path}:make")
    assert isinstance(model, torch.nn.Linear) and inputs[0].shape == (2, 3)


@pytest.mark.parametrize("spec, message", [("gpt5", "MODEL must be one of"), ("nothere.py:make", "no such file")])
def test_bad_model_spec_says_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message):
        load_model(spec)


def test_bench_runs_through_the_command_line(capsys):
    assert main(["bench", "--n", "32", "--repeats", "1", "--methods", "sdpa", "lowrank", "--causal", "no",
                 "--matmul-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "| 32 | non-causal | lowrank |" in out and "cost model's calibration:" in out
