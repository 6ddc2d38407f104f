"""Sites and masks in real transformers models (tiny configs, random weights, no download).

transformers 5 builds its masks in `masking_utils.py` from position comparisons and the padding
`attention_mask`; the passes must prove them causal / key-padding from the Dynamo graph, and must
keep T5's relative position bias as general.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

from passes import find_attention_sites, replace_attention_site

transformers = pytest.importorskip("transformers")

BATCH, SEQ, VOCAB = 2, 8, 100


def padding_mask():
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # right padding keeps every causal query row non-empty
    return mask


def gpt2(implementation, **config):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
        attn_implementation=implementation, **config)
    return transformers.GPT2Model(config)


def bert(implementation):
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        attn_implementation=implementation), add_pooling_layer=False)


def llama(implementation, layers=2):
    return transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, attn_implementation=implementation))


def t5(implementation):
    return transformers.T5Model(transformers.T5Config(
        num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=VOCAB, decoder_start_token_id=0,
        attn_implementation=implementation))


def token_inputs(with_mask=True, decoder=False):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    inputs = {"input_ids": ids}
    if with_mask:
        inputs["attention_mask"] = padding_mask()
    if decoder:
        inputs["decoder_input_ids"] = ids
    return inputs


# encoder self-attention x 2, then (decoder self-attention, cross-attention) x 2
T5_MASKS = ["general", "general", "general", "key_padding", "general", "key_padding"]

MODELS = [
    # (model, attn_implementation, inputs, mask per site, gqa)
    ("gpt2", "eager", dict(), ["causal+key_padding"] * 2, False),
    ("gpt2", "sdpa", dict(), ["causal+key_padding"] * 2, False),
    ("gpt2", "eager", dict(with_mask=False), ["causal"] * 2, False),
    ("gpt2", "sdpa", dict(with_mask=False), ["causal"] * 2, False),
    ("bert", "eager", dict(), ["key_padding"] * 2, False),
    ("bert", "sdpa", dict(), ["key_padding"] * 2, False),
    ("llama", "eager", dict(), ["causal+key_padding"] * 2, True),
    ("llama", "sdpa", dict(), ["causal+key_padding"] * 2, True),
    ("llama", "sdpa", dict(with_mask=False), ["causal"] * 2, True),
    ("t5", "eager", dict(decoder=True), T5_MASKS, False),
    ("t5", "sdpa", dict(decoder=True), T5_MASKS, False),
]
BUILDERS = {"gpt2": gpt2, "bert": bert, "llama": llama, "t5": t5}


def compile_replacing(model, inputs, compile_with=None):
    """(output, sites) of the model compiled with every supported site replaced by SDPA."""
    found = []

    def backend(gm, example_inputs):
        sites = find_attention_sites(gm)
        found.extend(sites)
        for site in sites:
            if site.supported:
                replace_attention_site(gm, site, F.scaled_dot_product_attention)
        return gm.forward if compile_with is None else compile_with(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, backend=backend)(**inputs), found


def model_id(model):
    name, implementation, inputs, _, _ = model
    return f"{name}-{implementation}-{'padded' if inputs.get('with_mask', True) else 'unpadded'}"


@pytest.mark.parametrize("name, implementation, inputs, masks, gqa", MODELS, ids=map(model_id, MODELS))
def test_transformers_model_sites_masks_and_exact_replacement(name, implementation, inputs, masks, gqa):
    torch.manual_seed(0)
    model = BUILDERS[name](implementation).double().eval()
    inputs = token_inputs(**inputs)

    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        actual, sites = compile_replacing(model, inputs)

    assert [site.mask for site in sites] == masks
    assert [site.supported for site in sites] == [mask != "general" for mask in masks]
    assert all(site.replacement.enable_gqa == gqa for site in sites if site.supported)
    assert all("relative position" in site.reason for site in sites if not site.supported)  # T5's bias
    # Llama's eager path runs its softmax in float32 even in a float64 model.
    tolerance = 1e-6 if (name, implementation) == ("llama", "eager") else 1e-10
    torch.testing.assert_close(actual.last_hidden_state, expected, atol=tolerance, rtol=tolerance)


def test_gpt2_attention_dropout_in_training_mode_is_kept():
    model = gpt2("eager", attn_pdrop=0.1).train()

    _, sites = compile_replacing(model, token_inputs())

    assert [site.supported for site in sites] == [False, False]
    assert all("training mode" in site.reason for site in sites)
    assert [site.module_path for site in sites] == ["h.0.attn", "h.1.attn"]


@pytest.mark.slow
def test_llama_replaced_by_sdpa_trains_through_inductor_like_eager():
    torch.manual_seed(0)
    model = llama("eager", layers=1).train()
    inputs = token_inputs()
    model(**inputs).last_hidden_state.square().mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    actual, sites = compile_replacing(model, inputs, compile_with=compile_fx)
    actual.last_hidden_state.square().mean().backward()

    assert [site.supported for site in sites] == [True]
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Module paths: exactly the names model.named_modules() gives, whatever wraps the forward


def causal_lm(name, implementation):
    """A tiny *ForCausalLM. Several of these decorate `forward` with a `(*args, **kwargs)` wrapper,
    so Dynamo names the model `L['args'][0]` rather than `L['self']`."""
    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                  attn_implementation=implementation, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
            attn_implementation=implementation))
    if name == "falcon":
        return transformers.FalconForCausalLM(transformers.FalconConfig(**common))
    config, model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[name]
    return model(config(num_key_value_heads=2, intermediate_size=64, **common))


CAUSAL_LMS = [(name, implementation) for name in ("llama", "mistral", "qwen2", "phi3", "falcon", "gpt2")
              for implementation in ("eager", "sdpa")]
ATTENTION_PATHS = {  # layer 0's attention module in each model
    "llama": "model.layers.0.self_attn", "mistral": "model.layers.0.self_attn", "qwen2": "model.layers.0.self_attn",
    "phi3": "model.layers.0.self_attn", "falcon": "transformer.h.0.self_attention", "gpt2": "transformer.h.0.attn",
}


def compile_recording(model, inputs, backend_of_graph):
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend_of_graph)(**inputs)


@pytest.mark.parametrize("name, implementation", CAUSAL_LMS, ids=map("-".join, CAUSAL_LMS))
def test_site_paths_are_the_models_named_modules_and_select_sites(name, implementation):
    from lrcompile.compile.backend import rewrite_graph
    from lrcompile.compile.policy import Policy

    torch.manual_seed(0)
    model = causal_lm(name, implementation).eval()
    modules = dict(model.named_modules())
    first = ATTENTION_PATHS[name]
    second = first.replace(".0.", ".1.")
    layer_zero = first.rsplit(".", 1)[0] + ".*"
    policies = {"include": Policy(include=(layer_zero,), cost_model=False),
                "exclude": Policy(exclude=(layer_zero,), cost_model=False)}
    sites, rewritten = [], {key: [] for key in policies}

    def backend(gm, example_inputs):
        sites.extend(find_attention_sites(gm))
        for key, policy in policies.items():
            rewritten[key] += [site.module_path for site in rewrite_graph(gm, example_inputs, policy).rewritten]
        return gm.forward

    compile_recording(model, token_inputs(with_mask=False), backend)

    assert [site.module_path for site in sites] == [first, second]
    assert all(site.module_path in modules for site in sites)
    assert rewritten == {"include": [first], "exclude": [second]}
