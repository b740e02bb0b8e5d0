"""The generation head and greedy decoding: text targets, the KV-cache decoding loop against a plain
teacher-forced forward, stopping, and decoding next to the frozen-prefix cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prompttune.data.collate import collate
from prompttune.data.examples import load_examples
from prompttune.registry import METHODS, _ensure_loaded
from prompttune.types import Row

_ensure_loaded()

DECODER_METHODS = sorted(name for name, cls in METHODS.items() if "causal_lm" in cls.supports)
INSTRUCTION_FIRST = "Answer with the sentiment.{soft} Review: {text} Sentiment:{answer}"
TEXTS = ["a great movie with a great cast .", "bad .", "the plot was bad and the ending was worse ."]


def _greedy_ids(model, examples, max_new_tokens, stop_ids=()):
    out = {}
    for idx, batch in model.batches(examples, len(examples)):
        ids = model.backbone.generate(model.inputs(batch), model.method.apply, max_new_tokens, list(stop_ids))
        out.update(zip(idx, ids, strict=True))
    return [out[i] for i in range(len(examples))]


@pytest.mark.parametrize("method", DECODER_METHODS)
@pytest.mark.parametrize("bb", ["tiny-llama", "tiny-gpt2"])
def test_cached_decoding_equals_teacher_forced_forward(method, bb, backbones, make_model):
    """Each greedy token (KV cache, one position per step, method applied with `decoding=True`) must be the argmax of
    a plain forward over prompt + the tokens generated before it: pins positions, DePT's token index and the prefix
    during decoding."""
    backbone = backbones[bb]
    model = make_model(
        method, backbone, head="generation", template="Review: {text}{soft} Sentiment:{answer}", noise=0.3
    )
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    generated = _greedy_ids(model, examples, 8)
    encoded = model.encode(examples)
    rows = []
    for n, (ex_rows, gen) in enumerate(zip(encoded, generated, strict=True)):
        assert len(gen) == 8
        prompt = ex_rows[0]
        end = len(prompt.ids) - 1
        rows.append(Row(prompt.ids + tuple(gen[:-1]), prompt.soft, tuple(range(end, end + len(gen))), (), n))
    with torch.no_grad():
        logits = model(collate(rows, backbone.pad_id), len(rows))  # (B, K, V)
    assert logits.argmax(-1).tolist() == generated


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_generate_ignores_the_prefix_cache(method, tiny_llama, make_model):
    """The frozen-prefix cache right-pads the text after the prefix; decoding must still see left-padded prompts.

    (fit() turns the cache on, and dev evaluation of a generation head decodes inside fit.)"""
    model = make_model(method, tiny_llama, head="generation", template=INSTRUCTION_FIRST, noise=0.3)
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    plain = model.generate(examples, max_new_tokens=6)
    model.use_prefix_cache(True)
    cached = model.generate(examples, max_new_tokens=6)
    assert model.cache_prefix == model.method.edits_only_soft_slots
    model.use_prefix_cache(False)
    assert cached == plain
    assert plain == [model.generate([ex], max_new_tokens=6)[0] for ex in examples]


def test_generation_rows_train_on_target_tokens_only(tiny_llama, make_model):
    model = make_model("manual", tiny_llama, head="generation", template="Review: {text} Sentiment:{answer}", noise=0)
    tok = tiny_llama.tokenizer
    example = load_examples([{"text": "good fun .", "label": "positive"}])
    (row,) = model.encode(example, with_targets=True)[0]
    prompt = tok("Review: good fun . Sentiment:", add_special_tokens=False)["input_ids"]
    target = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row.targets == tuple(target)
    assert row.ids == tuple(prompt + target[:-1])  # teacher forcing: the last target token is never an input
    assert row.read == tuple(range(len(prompt) - 1, len(prompt) - 1 + len(target)))

    batch = collate([row], tiny_llama.pad_id)
    with torch.no_grad():
        logits = model(batch, 1)  # (1, K, V): target positions only
        loss = model.head.loss(logits, None, batch)
        full = tiny_llama.model(torch.tensor([row.ids])).logits[0]  # (L, V) plain forward
    expected = F.cross_entropy(full[list(row.read)], torch.tensor(target))
    assert logits.shape == (1, len(target), tiny_llama.spec.vocab_size)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_stop_ids_end_a_row_without_ending_the_batch(tiny_llama, make_model):
    model = make_model(
        "prompt_tuning", tiny_llama, head="generation", template="Review: {text}{soft} Sentiment:{answer}"
    )
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    free = _greedy_ids(model, examples, 5)
    stop = free[1][2]  # row 1 stops before its third token
    stopped = _greedy_ids(model, examples, 5, [stop])
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert cut == expected
    assert stopped[1] == free[1][:2]


def test_max_new_tokens_and_text_output(tiny_llama, make_tuner, gen_train):
    tuner = make_tuner("prompt_tuning", tiny_llama, head="generation", max_new_tokens=4)
    tuner.fit(gen_train, quiet=True)
    model = tuner.model
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    ids = _greedy_ids(model, examples, 4, model.head.stop_ids)
    assert all(len(seq) <= 4 for seq in ids)
    texts = tuner.generate(TEXTS)
    assert texts == [tiny_llama.tokenizer.decode(seq, skip_special_tokens=True) for seq in ids]
    assert tuner.predict(TEXTS) == texts
    assert len(tuner.generate(TEXTS[:1], max_new_tokens=2)) == 1


def test_generation_training_lowers_the_target_loss(tiny_llama, make_tuner, gen_train):
    tuner = make_tuner("prompt_tuning", tiny_llama, head="generation", max_steps=12, lr=0.1, batch_size=8)
    result = tuner.fit(gen_train, quiet=True)
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
