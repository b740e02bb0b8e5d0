"""Numbers pinned by hand computation or by a plain Hugging Face forward: method injections, verbalizer scores,
initialisation scale, multi-label threshold tuning and the metric functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prompttune.data.collate import collate
from prompttune.data.examples import load_examples
from prompttune.evaluation import metrics
from prompttune.heads.classifier import ClassifierHead
from prompttune.methods.base import InitContext
from prompttune.methods.dept import DePT, DePTConfig
from prompttune.methods.init import init_vectors
from prompttune.methods.p_tuning import PTuning, PTuningConfig
from prompttune.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from prompttune.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from prompttune.types import Example, PromptInputs, Row


def _inputs(backbone, rows):
    batch = collate(rows, backbone.pad_id)
    inputs = PromptInputs(
        inputs_embeds=backbone.embed(batch.input_ids),
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        soft_positions=batch.soft_positions,
        token_index=batch.token_index,
        read_positions=batch.read_positions,
    )
    return batch, inputs


def _ctx(backbone, seed=0, text="Label: negative. Label: positive."):
    return InitContext(backbone.tokenizer, torch.Generator().manual_seed(seed), text)


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


# Row A: 2 text tokens, 3 soft slots, 9 text tokens (11 text tokens: the last ones pass max_positions below).
ROW_A = Row(ids=(11, 12, 0, 0, 0, 13, 14, 15, 16, 17, 18, 19, 20, 21), soft=(2, 3, 4), read=(13,))
ROW_B = Row(ids=(30, 0, 0, 0, 31), soft=(1, 2, 3), read=(4,))  # shorter: left-padded next to ROW_A


# ---- DePT ---------------------------------------------------------------------------------------------------------
def test_dept_update_is_a_times_b_on_real_tokens_only(tiny_llama):
    cfg = DePTConfig(num_virtual_tokens=3, rank=2, max_positions=8)
    method = DePT(cfg, tiny_llama.spec)
    _randomise(method, 0)
    A, B = method.lora_a.detach(), method.lora_b.detach()  # (8, 2), (2, D)

    batch, inputs = _inputs(tiny_llama, [ROW_A, ROW_B])
    original = inputs.inputs_embeds.clone()
    with torch.no_grad():
        out = method.apply(inputs).inputs_embeds  # (2, T, D)
    assert torch.equal(inputs.inputs_embeds, original), "apply must not mutate its input"

    T = batch.input_ids.shape[1]
    for b, row in enumerate([ROW_A, ROW_B]):
        shift = T - len(row.ids)
        text_rank = 0  # the k-th non-soft token of the row's own text gets row k of A
        for col in range(T):
            i = col - shift
            if i < 0:  # padding: untouched
                assert torch.equal(out[b, col], original[b, col])
            elif i in row.soft:  # soft slot: exactly the prompt vector
                assert torch.equal(out[b, col], method.prompt[row.soft.index(i)].detach())
            else:
                expected = A[text_rank] @ B if text_rank < cfg.max_positions else torch.zeros_like(B[0])
                torch.testing.assert_close(out[b, col] - original[b, col], expected, rtol=0, atol=1e-6)
                text_rank += 1
    assert text_rank == 2  # ROW_B checked last: 2 text tokens

    # The same example under different left padding (alone, or next to a longer row) gets the same vectors.
    _, alone_inputs = _inputs(tiny_llama, [ROW_B])
    with torch.no_grad():
        alone = method.apply(alone_inputs).inputs_embeds[0]  # (5, D)
    torch.testing.assert_close(alone, out[1, T - len(ROW_B.ids) :], rtol=0, atol=1e-6)


def test_dept_starts_with_no_update_and_declares_two_learning_rates(tiny_llama):
    method = DePT(DePTConfig(num_virtual_tokens=3, rank=2, max_positions=8, lowrank_lr=1e-3), tiny_llama.spec)
    method.initialize(_ctx(tiny_llama))
    assert torch.count_nonzero(method.lora_b) == 0 and torch.count_nonzero(method.lora_a) > 0
    _, inputs = _inputs(tiny_llama, [ROW_A])
    with torch.no_grad():
        out = method.apply(inputs).inputs_embeds
    text = [c for c in range(len(ROW_A.ids)) if c not in ROW_A.soft]
    assert torch.equal(out[0, text], inputs.inputs_embeds[0, text])
    groups = method.param_groups(0.3)
    assert [g["lr"] for g in groups] == [0.3, 1e-3]
    assert groups[0]["params"] == [method.prompt]
    assert groups[1]["params"] == [method.lora_a, method.lora_b]


# ---- prompt tuning ------------------------------------------------------------------------------------------------
def test_prompt_tuning_writes_exactly_its_vectors_into_soft_slots(tiny_llama):
    method = PromptTuning(PromptTuningConfig(num_virtual_tokens=3), tiny_llama.spec)
    _randomise(method, 1)
    batch, inputs = _inputs(tiny_llama, [ROW_A, ROW_B])
    original = inputs.inputs_embeds.clone()
    with torch.no_grad():
        out = method.apply(inputs)
    assert torch.equal(inputs.inputs_embeds, original)
    is_soft = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for b in range(2):
        assert torch.equal(out.inputs_embeds[b, batch.soft_positions[b]], method.prompt.detach())
        is_soft[b, batch.soft_positions[b]] = True
    assert torch.equal(out.inputs_embeds[~is_soft], original[~is_soft])
    for name in ("attention_mask", "position_ids", "token_index", "read_positions"):
        assert torch.equal(getattr(out, name), getattr(inputs, name))
    assert out.past_key_values is None


def test_prompt_tuning_text_init_embeds_the_text_cycled(tiny_llama):
    method = PromptTuning(PromptTuningConfig(num_virtual_tokens=5, init="text", init_text=" good bad"), tiny_llama.spec)
    method.initialize(_ctx(tiny_llama))
    ids = tiny_llama.tokenizer(" good bad", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    expected = tiny_llama.embed(torch.tensor((ids * 3)[:5]))
    assert torch.equal(method.prompt.detach(), expected)


# ---- prefix tuning ------------------------------------------------------------------------------------------------
def test_prefix_tuning_shifts_positions_and_unmasks_its_prefix(tiny_llama):
    P = 5
    method = PrefixTuning(PrefixTuningConfig(num_virtual_tokens=P, init="random"), tiny_llama.spec)
    _randomise(method, 2)
    rows = [Row(ids=(11, 12, 13, 14), soft=(), read=(3,)), Row(ids=(21, 22), soft=(), read=(1,))]
    _, inputs = _inputs(tiny_llama, rows)
    with torch.no_grad():
        out = method.apply(inputs)
    assert torch.equal(out.position_ids, inputs.position_ids + P)
    assert torch.equal(inputs.position_ids, torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1]]))  # input untouched
    assert torch.equal(out.past_attention_mask, torch.ones(2, P, dtype=out.past_attention_mask.dtype))
    assert torch.equal(out.attention_mask, inputs.attention_mask)
    assert torch.equal(out.inputs_embeds, inputs.inputs_embeds)
    spec = tiny_llama.spec
    assert len(out.past_key_values) == spec.num_layers
    for layer, (k, v) in enumerate(out.past_key_values):
        assert k.shape == v.shape == (2, spec.num_kv_heads, P, spec.head_dim)
        for b in range(2):
            assert torch.equal(k[b], method.kv[layer, 0].detach())
            assert torch.equal(v[b], method.kv[layer, 1].detach())
    # During decoding the prefix already sits in the cache: nothing is added twice.
    step = inputs.replace(decoding=True)
    assert method.apply(step) is step


def test_prefix_tuning_projection_shapes(tiny_llama):
    method = PrefixTuning(
        PrefixTuningConfig(num_virtual_tokens=3, projection=True, projection_hidden=16, init="random"), tiny_llama.spec
    )
    spec = tiny_llama.spec
    assert method.prefix().shape == (spec.num_layers, 2, spec.num_kv_heads, 3, spec.head_dim)


@pytest.mark.parametrize("bb", ["tiny-llama", "tiny-gpt2"])
def test_prefix_from_text_equals_the_text_in_the_prompt(bb, backbones, make_model):
    """A prefix initialised from a text's frozen keys/values must act exactly like that text written in front of the
    prompt: this pins both the key/value layout and the position shift (rotary and learned absolute positions)."""
    backbone = backbones[bb]
    prefix = "Label: negative. Label: positive."
    n = len(backbone.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    template = "Review: {text} Sentiment:{answer}"
    tuned = make_model("prefix_tuning", backbone, template=template, noise=0.0, num_virtual_tokens=n, init_text=prefix)
    manual = make_model("manual", backbone, template=prefix + template, noise=0.0)
    examples = load_examples(
        [{"text": "good fun ."}, {"text": "the plot was bad and the ending was worse ."}], require_label=False
    )
    torch.testing.assert_close(tuned.scores(examples), manual.scores(examples), rtol=0, atol=1e-4)


# ---- p-tuning -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_with_residual_starts_at_its_embedding(encoder, tiny_llama):
    cfg = PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden=16, init="text", init_text=" good")
    method = PTuning(cfg, tiny_llama.spec)
    method.initialize(_ctx(tiny_llama))
    good = tiny_llama.tokenizer(" good", add_special_tokens=False)["input_ids"]
    assert torch.equal(method.embedding.detach(), tiny_llama.embed(torch.tensor(good * 3)))
    with torch.no_grad():
        assert torch.equal(method.prompt(), method.embedding)
        _, inputs = _inputs(tiny_llama, [ROW_A])
        out = method.apply(inputs).inputs_embeds
    assert torch.equal(out[0, list(ROW_A.soft)], method.embedding.detach())


def test_p_tuning_without_residual_is_the_encoder_output(tiny_llama):
    method = PTuning(PTuningConfig(num_virtual_tokens=4, encoder_hidden=16, residual=False), tiny_llama.spec)
    method.initialize(_ctx(tiny_llama))
    with torch.no_grad():
        torch.testing.assert_close(method.prompt(), method.mlp(method.embedding), rtol=0, atol=0)


# ---- verbalizer ---------------------------------------------------------------------------------------------------
def _reference_word_logprob(hf_model, embeds, word_ids):
    """Sum of log p(word token k | prompt, word tokens < k) from one plain forward of prompt + word."""
    word = torch.tensor(word_ids)
    full = torch.cat([embeds, hf_model.get_input_embeddings()(word)])  # (L + W, D)
    logits = hf_model(inputs_embeds=full[None]).logits[0]  # (L + W, V)
    logp = F.log_softmax(logits.float(), -1)
    L = embeds.shape[0]
    return sum(logp[L - 1 + k, tok].item() for k, tok in enumerate(word_ids))


@pytest.mark.parametrize("method", ["manual", "prompt_tuning"])
@pytest.mark.parametrize("bb", ["tiny-llama", "tiny-gpt2"])
def test_multi_token_verbalizer_score_is_the_sum_of_token_logprobs(method, bb, backbones, make_model):
    backbone = backbones[bb]
    tok = backbone.tokenizer
    words = {"0": [" awful", " bad"], "1": [" superb"]}
    assert len(tok(" awful", add_special_tokens=False)["input_ids"]) > 1
    template = "Review: {text}{soft} Sentiment:{answer}"
    model = make_model(method, backbone, template=template, verbalizer=words, noise=0.3)
    records = [{"text": "a great movie ."}, {"text": "the plot was bad and the ending was worse ."}]
    examples = load_examples(records, require_label=False)
    scores = model.scores(examples)  # (2, 2)

    with torch.no_grad():
        for n, ex in enumerate(examples):
            prompt = model.template.encode(ex, tok, model.method.num_soft_slots, 512, placeholder=backbone.pad_id)
            embeds = backbone.model.get_input_embeddings()(torch.tensor(prompt.ids))  # (L, D)
            if prompt.soft:
                embeds[list(prompt.soft)] = model.method.prompt.detach()
            per_word = {
                w: _reference_word_logprob(backbone.model, embeds, tok(w, add_special_tokens=False)["input_ids"])
                for ws in words.values()
                for w in ws
            }
            # A label with several words scores log(mean of the words' probabilities).
            negative = math.log((math.exp(per_word[" awful"]) + math.exp(per_word[" bad"])) / 2)
            assert scores[n, 0].item() == pytest.approx(negative, abs=1e-4)
            assert scores[n, 1].item() == pytest.approx(per_word[" superb"], abs=1e-4)


def test_single_token_verbalizer_is_the_next_token_logprob(tiny_llama, make_model):
    model = make_model("manual", tiny_llama, template="Review: {text} Sentiment:{answer}", noise=0.0)
    ex = load_examples([{"text": "good fun ."}], require_label=False)
    scores = model.scores(ex)[0]
    ids = tiny_llama.tokenizer("Review: good fun . Sentiment:", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(tiny_llama.model(torch.tensor([ids])).logits[0, -1], -1)
    neg, pos = (tiny_llama.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive"))
    torch.testing.assert_close(scores, logp[[neg, pos]], rtol=0, atol=1e-5)


# ---- initialisation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bb", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_random_init_matches_the_vocabulary_scale(bb, backbones):
    backbone = backbones[bb]
    vectors = init_vectors("random", 4000, backbone.spec, _ctx(backbone), None)  # (4000, D)
    assert vectors.shape == (4000, backbone.spec.hidden_size)
    special = set(backbone.tokenizer.all_special_ids)
    ids = torch.tensor([i for i in range(backbone.spec.vocab_size) if i not in special])
    with torch.no_grad():
        vocab = backbone.embed(ids)  # (V', D)
    ratio = vectors.std(0) / vocab.std(0)  # (D,)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.15)
    assert ((ratio > 0.6) & (ratio < 1.5)).all()
    assert (vectors.mean(0) - vocab.mean(0)).abs().max() < 0.5 * vocab.std(0).mean()
    assert vectors.std() < 0.5  # the vocabulary's scale (~0.2 here), far from N(0, 1)


def test_init_is_seeded(tiny_llama):
    a = init_vectors("random", 4, tiny_llama.spec, _ctx(tiny_llama, seed=3), None)
    b = init_vectors("random", 4, tiny_llama.spec, _ctx(tiny_llama, seed=3), None)
    c = init_vectors("random", 4, tiny_llama.spec, _ctx(tiny_llama, seed=4), None)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_vocab_init_uses_real_non_special_embeddings(tiny_llama):
    vectors = init_vectors("sample_vocab", 16, tiny_llama.spec, _ctx(tiny_llama), None)
    table = tiny_llama.model.get_input_embeddings().weight
    special = set(tiny_llama.tokenizer.all_special_ids)
    for v in vectors:
        matches = torch.nonzero((table == v).all(-1)).flatten().tolist()
        assert matches and not set(matches) & special


# ---- classifier head: multi-label threshold ----------------------------------------------------------------------
def test_multilabel_threshold_maximises_dev_macro_f1():
    head = ClassifierHead(["a", "b", "c"], "causal_lm", hidden_size=4, multi_label=True)
    gold = [("a",), ("a", "b"), ("b",), ("c",), ("a", "c")]
    probs = torch.tensor(
        [
            [0.90, 0.20, 0.10],
            [0.80, 0.62, 0.30],
            [0.58, 0.75, 0.20],
            [0.10, 0.40, 0.66],
            [0.70, 0.10, 0.64],
        ]
    )
    # Every class separates perfectly for thresholds in (0.58, 0.62]; on the 0.05 grid that is 0.60 alone.
    dev = [Example({"text": str(i)}, g, f"dev:{i}") for i, g in enumerate(gold)]
    scores = torch.logit(probs)
    chosen = head.tune_on_dev(None, scores, dev, "auto")
    assert chosen["threshold"] == pytest.approx(0.60)
    assert chosen["dev_macro_f1"] == pytest.approx(1.0)
    assert head.decide(scores) == gold

    def macro_f1_at(t):
        pred = [tuple(label for label, p in zip("abc", row, strict=True) if p >= t) for row in probs.tolist()]
        return metrics.multilabel(gold, pred, ["a", "b", "c"])["macro_f1"]

    grid = [i / 20 for i in range(1, 20)]
    assert max(macro_f1_at(t) for t in grid) == pytest.approx(macro_f1_at(0.60))
    assert macro_f1_at(0.5) < 1.0  # the default threshold would have been worse


def test_single_label_classifier_starts_uniform_and_tunes_nothing():
    head = ClassifierHead(["x", "y"], "encoder", hidden_size=4)
    assert head.tune_on_dev(None, torch.zeros(1, 2), [Example({"text": "t"}, "x")], "auto") == {}
    assert torch.count_nonzero(head.linear.weight) == 0 and torch.count_nonzero(head.linear.bias) == 0


# ---- metrics ------------------------------------------------------------------------------------------------------
def test_accuracy_and_macro_f1_by_hand():
    gold, pred = ["a", "b", "a", "c"], ["a", "a", "a", "c"]
    assert metrics.accuracy(gold, pred) == pytest.approx(0.75)
    # a: tp 2, fp 1, fn 0 -> F1 0.8; b: tp 0 -> 0; c: tp 1 -> 1.
    assert metrics.macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx(0.6)
    assert metrics.macro_f1(gold, pred, ["a", "b", "c", "d"]) == pytest.approx(1.8 / 4)
    assert metrics.accuracy([], []) == 0.0


def test_multilabel_metrics_by_hand():
    gold = [("a", "b"), ("c",), ()]
    pred = [("a",), ("c", "b"), ()]
    out = metrics.multilabel(gold, pred, ["a", "b", "c"])
    assert out["jaccard"] == pytest.approx((1 / 2 + 1 / 2 + 1.0) / 3)  # an empty pair counts as a perfect match
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1 (b in #2), fn 1 (b in #1)
    assert out["macro_f1"] == pytest.approx((1 + 0 + 1) / 3)


def test_text_metrics_by_hand():
    out = metrics.text_metrics(["The cat!", "a b c"], ["the cat", "a d"])
    assert out["exact_match"] == pytest.approx(0.5)
    assert out["token_f1"] == pytest.approx((1.0 + 2 * 1 / (3 + 2)) / 2)
