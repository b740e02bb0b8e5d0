"""Every method on tiny random models of other Hugging Face architectures, built in-process from their configs.

The contract test runs the full contract on tiny Llama, GPT-2 and BERT; this one catches what differs between
architectures: config fields named differently or present but ignored (Falcon's multi-query, a GPT-NeoX config
carrying `num_key_value_heads`), sliding-window layers, ALiBi, learned positions, RoBERTa-style position numbering
after the padding index, and embeddings narrower than the layers (OPT-350m, ELECTRA, ALBERT). Checked: the backbone
runs a text exactly as the model's own forward does, reads its key/value layout from the model's cache, scores do not
depend on batch neighbours, a cached frozen prefix (longer than a sliding window) gives the uncached scores, and
greedy generation does not depend on the batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MULTI_WORDS
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from prompttune import PromptTuneError
from prompttune.backbones.causal_lm import CausalLM
from prompttune.backbones.encoder import Encoder
from prompttune.backbones.tiny import build_tokenizer
from prompttune.data.examples import load_examples
from prompttune.registry import METHODS, _ensure_loaded
from prompttune.types import PromptInputs

_ensure_loaded()

TOL = 1e-4
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# model_type -> config fields beyond SIZES, and the key/value heads its attention really uses
DECODERS = {
    "qwen2": ({"num_key_value_heads": 2}, 2),
    # One sliding-window layer (window 4, far shorter than the prompts) and one global layer, as Gemma 3 mixes them.
    "gemma3_text": (
        {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4,
         "layer_types": ["sliding_attention", "full_attention"]},
        2,
    ),
    "gpt_neox": ({"num_key_value_heads": 2}, 4),  # a field GPT-NeoX ignores: it has no grouped-query attention
    "falcon": ({"multi_query": True, "new_decoder_architecture": False}, 1),  # one key/value head
    # Learned positions offset by 2, and (as OPT-350m) 16-wide embeddings projected to the 32-wide layers and back.
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 16}, 4),
    "bloom": ({"n_head": 4, "n_layer": 2}, 4),  # ALiBi, no position embeddings
}  # fmt: skip
ENCODERS = {
    "roberta": {},  # positions numbered from the padding index + 1
    "mpnet": {},  # the same, with a padding index of 1 whatever the pad id
    "electra": {"embedding_size": 16},  # embeddings projected up to the layers' width
    "albert": {"embedding_size": 16},  # one layer shared by all: no per-layer prompts
}
INSTRUCTION = "Read the following movie review carefully and then decide whether the sentiment is good or bad."
TEMPLATES = {
    "middle": "Review: {text}{soft} Sentiment:{answer}",
    "after-instruction": INSTRUCTION + "{soft} Review: {text} Sentiment:{answer}",
}
ENCODER_TEMPLATE = INSTRUCTION + "{soft} Review: {text}"
TARGET = {"text": "the film was good , not great .", "label": "1"}
LONGER = {
    "text": "the story starts slowly , but the second half is very strong and the final scene is moving .",
    "label": "1",
}
SHORTER = {"text": "bad .", "label": "0"}


def _build(cls: Any, name: str, tok: Any, **fields: Any) -> Any:
    config = AutoConfig.for_model(name, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **SIZES, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls.from_config(config, attn_implementation="eager", dtype=torch.float32)


@pytest.fixture(scope="module")
def archs() -> dict[str, Any]:
    tok = build_tokenizer("tiny-llama")
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out: dict[str, Any] = {}
    for name, (extra, _) in DECODERS.items():
        out[name] = CausalLM(_build(AutoModelForCausalLM, name, tok, **special, **extra), tok, f"tiny-{name}")
    wordpiece = build_tokenizer("tiny-bert")
    for name, extra in ENCODERS.items():
        out[name] = Encoder(_build(AutoModel, name, wordpiece, **extra), wordpiece, f"tiny-{name}")
    return out


@pytest.mark.parametrize("arch", list(DECODERS) + list(ENCODERS))
def test_a_text_runs_as_in_the_models_own_forward(arch, archs):
    backbone = archs[arch]
    ids = torch.tensor([[40, 41, 42, 43, 44, 45, 46]])  # ordinary tokens of both tiny vocabularies
    model = backbone.model if arch in ENCODERS else backbone.model.base_model  # no LM head: compare hidden states
    own = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # (1, T, D)
    pos = torch.arange(ids.shape[1])[None]
    ours = backbone(PromptInputs(backbone.embed(ids), torch.ones_like(ids), pos, ids[:, :0], pos, pos[:, -1:]))
    assert ours.shape[-1] == backbone.spec.output_size
    assert (ours - own).abs().max() <= TOL


@pytest.mark.parametrize("arch", list(DECODERS))
def test_key_value_layout_comes_from_the_models_cache(arch, archs):
    spec = archs[arch].spec
    assert spec.num_kv_heads == DECODERS[arch][1]
    kv = archs[arch].encode_prefixes([[5, 6, 7]])[0]  # (layers, 2, kvh, L, hd)
    assert kv.shape == (spec.num_layers, 2, spec.num_kv_heads, 3, spec.head_dim)


def _cases() -> list:
    cases = [
        pytest.param(arch, method, where, id=f"{arch}-{method}-{where}")
        for arch in DECODERS
        for method in sorted(METHODS)
        if "causal_lm" in METHODS[method].supports
        for where in TEMPLATES
    ]
    return cases + [
        pytest.param(arch, method, "encoder", id=f"{arch}-{method}")
        for arch in ENCODERS
        for method in sorted(METHODS)
        if "encoder" in METHODS[method].supports
    ]


@pytest.mark.parametrize("arch,method,where", _cases())
def test_scores_are_batch_invariant_and_the_prefix_cache_exact(arch, method, where, archs, make_model):
    backbone = archs[arch]
    if arch == "gemma3_text" and method == "prefix_tuning":
        pytest.skip("known limit: left padding sits between the prefix and the text, so a sliding window is shorter")
    if where == "encoder":
        options: dict[str, Any] = {"template": ENCODER_TEMPLATE}
        if method == "bayesprompt":
            options["features"] = "embedding"  # `final` states are wider than these encoders' embeddings: refused
    else:
        options = {"template": TEMPLATES[where], "verbalizer": {k: list(v) for k, v in MULTI_WORDS.items()}}
    try:
        model = make_model(method, backbone, **options)
    except PromptTuneError as err:
        # ALBERT shares one layer across the stack: per-layer prompts are refused with a message, not a traceback.
        assert arch == "albert" and "no list of 2 transformer layers" in str(err), err
        return
    examples = load_examples([LONGER, TARGET, SHORTER])
    alone = model.scores(load_examples([TARGET]))[0]  # (C,)
    mixed = model.scores(examples, batch_size=3)  # one left-padded batch of three
    assert torch.isfinite(mixed).all()
    assert (alone - mixed[1]).abs().max() <= TOL
    model.use_prefix_cache(True)
    cached = model.scores(examples, batch_size=3)
    model.use_prefix_cache(False)
    assert (cached - mixed).abs().max() <= TOL


def test_bayesprompt_refuses_final_features_wider_than_the_embeddings(archs, make_model):
    with pytest.raises(PromptTuneError, match="features: embedding"):
        make_model("bayesprompt", archs["electra"], template=ENCODER_TEMPLATE)


@pytest.mark.parametrize("arch", list(DECODERS))
def test_greedy_generation_is_batch_invariant(arch, archs, make_tuner, gen_train):
    # Decoding runs on the backbone's own key/value cache, which must keep every key of a sliding-window layer too.
    tuner = make_tuner("prompt_tuning", archs[arch], head="generation", max_new_tokens=6, max_steps=1)
    tuner.fit(gen_train, quiet=True)
    texts = [LONGER["text"], TARGET["text"], SHORTER["text"]]
    assert tuner.generate(texts) == [tuner.generate([t])[0] for t in texts]


def test_a_model_directory_loads_or_says_what_is_missing(tmp_path):
    # A new user's local models: one that loads, and two prompttune cannot run, each refused with one line that names
    # the directory (before: a ValueError from transformers, and a torch error from inside T5's forward).
    from transformers import AutoModelForSeq2SeqLM

    from prompttune.backbones import load_backbone

    tok = build_tokenizer("tiny-llama")
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    _build(AutoModelForCausalLM, "llama", tok, **special).save_pretrained(tmp_path / "llama")
    _build(AutoModelForCausalLM, "llama", tok, **special).save_pretrained(tmp_path / "no-tokenizer")
    tok.save_pretrained(tmp_path / "llama")
    t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=tok.pad_token_id)
    config = AutoConfig.for_model("t5", vocab_size=len(tok), pad_token_id=tok.pad_token_id, **t5)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")

    backbone = load_backbone(str(tmp_path / "llama"))
    assert backbone.kind == "causal_lm" and backbone.spec.num_layers == SIZES["num_hidden_layers"]
    with pytest.raises(PromptTuneError, match=r"no-tokenizer: no tokenizer could be loaded"):
        load_backbone(str(tmp_path / "no-tokenizer"))
    with pytest.raises(PromptTuneError, match=r"t5: T5ForConditionalGeneration is an encoder-decoder model"):
        load_backbone(str(tmp_path / "t5"))
