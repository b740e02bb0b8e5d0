"""Every causal method on tiny random models of other Hugging Face architectures, built in-process from their configs:
the backbone reads its key/value layout from the model's own cache, scores do not depend on batch neighbours, and a
cached frozen prefix (longer than a sliding window, where the model has one) gives the uncached scores.

The contract test runs the full contract on tiny Llama and GPT-2; this one catches what differs between
architectures: config fields named differently or present but ignored (Falcon's `num_kv_heads` and multi-query,
a GPT-NeoX config carrying `num_key_value_heads`), sliding-window layers, ALiBi, learned positions."""

from __future__ import annotations

import pytest
import torch
from conftest import MULTI_WORDS
from transformers import AutoConfig, AutoModelForCausalLM

from prompttune.backbones.causal_lm import CausalLM
from prompttune.backbones.tiny import build_tokenizer
from prompttune.data.examples import load_examples
from prompttune.registry import METHODS, _ensure_loaded

_ensure_loaded()

TOL = 1e-4
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# model_type -> config fields beyond SIZES, and the key/value heads its attention really uses
ARCHS = {
    "qwen2": ({"num_key_value_heads": 2}, 2),
    # One sliding-window layer (window 4, far shorter than the prompts) and one global layer, as Gemma 3 mixes them.
    "gemma3_text": (
        {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4,
         "layer_types": ["sliding_attention", "full_attention"]},
        2,
    ),
    "gpt_neox": ({"num_key_value_heads": 2}, 4),  # a field GPT-NeoX ignores: it has no grouped-query attention
    "falcon": ({"multi_query": True, "new_decoder_architecture": False}, 1),  # one key/value head
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, 4),  # learned positions offset by the attention mask
    "bloom": ({"n_head": 4, "n_layer": 2}, 4),  # ALiBi, no position embeddings
}  # fmt: skip
INSTRUCTION = "Read the following movie review carefully and then decide whether the sentiment is good or bad."
TEMPLATES = {
    "middle": "Review: {text}{soft} Sentiment:{answer}",
    "after-instruction": INSTRUCTION + "{soft} Review: {text} Sentiment:{answer}",
}
TARGET = {"text": "the film was good , not great .", "label": "1"}
LONGER = {
    "text": "the story starts slowly , but the second half is very strong and the final scene is moving .",
    "label": "1",
}
SHORTER = {"text": "bad .", "label": "0"}


@pytest.fixture(scope="module")
def archs() -> dict[str, CausalLM]:
    tok = build_tokenizer("tiny-llama")
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = {}
    for name, (extra, _) in ARCHS.items():
        config = AutoConfig.for_model(name, vocab_size=len(tok), **SIZES, **special, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        out[name] = CausalLM(model, tok, f"tiny-{name}")
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_key_value_layout_comes_from_the_models_cache(arch, archs):
    spec = archs[arch].spec
    assert spec.num_kv_heads == ARCHS[arch][1]
    kv = archs[arch].encode_prefixes([[5, 6, 7]])[0]  # (layers, 2, kvh, L, hd)
    assert kv.shape == (spec.num_layers, 2, spec.num_kv_heads, 3, spec.head_dim)


def _cases() -> list:
    return [
        pytest.param(arch, method, where, id=f"{arch}-{method}-{where}")
        for arch in ARCHS
        for method in sorted(METHODS)
        if "causal_lm" in METHODS[method].supports
        for where in TEMPLATES
    ]


@pytest.mark.parametrize("arch,method,where", _cases())
def test_scores_are_batch_invariant_and_the_prefix_cache_exact(arch, method, where, archs, make_model):
    if arch == "gemma3_text" and method == "prefix_tuning":
        pytest.skip("known limit: left padding sits between the prefix and the text, so a sliding window is shorter")
    model = make_model(
        method, archs[arch], template=TEMPLATES[where], verbalizer={k: list(v) for k, v in MULTI_WORDS.items()}
    )
    examples = load_examples([LONGER, TARGET, SHORTER])
    alone = model.scores(load_examples([TARGET]))[0]  # (C,)
    mixed = model.scores(examples, batch_size=3)  # one left-padded batch of three
    assert torch.isfinite(mixed).all()
    assert (alone - mixed[1]).abs().max() <= TOL
    model.use_prefix_cache(True)
    cached = model.scores(examples, batch_size=3)
    model.use_prefix_cache(False)
    assert (cached - mixed).abs().max() <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_is_batch_invariant(arch, archs, make_tuner, gen_train):
    # Decoding runs on the backbone's own key/value cache, which must keep every key of a sliding-window layer too.
    tuner = make_tuner("prompt_tuning", archs[arch], head="generation", max_new_tokens=6, max_steps=1)
    tuner.fit(gen_train, quiet=True)
    texts = [LONGER["text"], TARGET["text"], SHORTER["text"]]
    assert tuner.generate(texts) == [tuner.generate([t])[0] for t in texts]
