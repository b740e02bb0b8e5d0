"""The label trie and constrained decoding: only taxonomy labels, never a repeat, batch invariance, and the general
per-step constraint of `CausalLM.generate`."""

from __future__ import annotations

import pytest
import torch

from prompttune.data.examples import load_examples
from prompttune.errors import PromptTuneError
from prompttune.heads.trie import LabelTrie

# Label token sequences sharing prefixes; label 3 extends label 0 (a label may be a prefix of another).
SEQUENCES = [(1, 2), (1, 3), (4,), (1, 2, 5)]
SEP, END = (9,), 0
LABELS = ["sports", "politics", "music", "science"]
TEXTS = ["good fun .", "the plot was bad and the ending was worse .", "we watched the movie with friends ."]


def complete_answers(trie: LabelTrie, max_len: int = 20) -> list[tuple[int, ...]]:
    """Every token sequence the constraint lets a decoder emit, up to the end token (exhaustive search)."""
    done, stack = [], [()]
    while stack:
        prefix = stack.pop()
        for token in trie.allowed(prefix):
            seq = (*prefix, token)
            if token == trie.end:
                done.append(seq)
            elif len(seq) < max_len:
                stack.append(seq)
    return done


def split_labels(seq: tuple[int, ...], sep: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Cut an answer `a sep b sep c end` at the separators (works here: no label contains the separator)."""
    body, parts, current = seq[:-1], [], []
    i = 0
    while i < len(body):
        if body[i : i + len(sep)] == sep:
            parts.append(tuple(current))
            current, i = [], i + len(sep)
        else:
            current.append(body[i])
            i += 1
    return [*parts, tuple(current)]


@pytest.mark.parametrize("sep", [SEP, (9, 8)], ids=["one-token-separator", "two-token-separator"])
def test_every_allowed_answer_is_a_set_of_distinct_taxonomy_labels(sep):
    trie = LabelTrie(SEQUENCES, sep, END)
    answers = complete_answers(trie)
    found = set()
    for seq in answers:
        parts = split_labels(seq, sep)
        assert all(p in SEQUENCES for p in parts), seq  # only taxonomy strings
        assert len(set(parts)) == len(parts), seq  # no label twice
        labels = trie.parse(seq)
        assert [SEQUENCES[i] for i in labels] == parts
        found.add(frozenset(labels))
    # every non-empty subset of the 4 labels can be generated (in some order)
    assert len(found) == 2**4 - 1


def test_allowed_tokens_step_by_step():
    trie = LabelTrie(SEQUENCES, SEP, END)
    assert sorted(trie.allowed([])) == [1, 4]  # at least one label: no end token at the start
    assert sorted(trie.allowed([1])) == [2, 3]  # "1" alone is not a label
    assert sorted(trie.allowed([1, 2])) == sorted([5, SEP[0], END])  # label 0 ends here, or continues to label 3
    assert sorted(trie.allowed([1, 2, 9])) == [1, 4]
    assert sorted(trie.allowed([1, 2, 9, 1])) == [2, 3]  # label 0 is used, but label 3 still passes through 1 2
    assert sorted(trie.allowed([1, 2, 9, 1, 2])) == [5]  # ...and only label 3 may finish there
    assert sorted(trie.allowed([4, 9, 1, 3, 9, 1, 2])) == sorted([5, 9, END])
    assert trie.allowed([4, 9, 1, 3, 9, 1, 2, 5, 9, 1, 2]) == [END]  # every label used: only the end remains
    assert trie.allowed([4, END, 7, 7]) == [END]  # a finished answer stays finished
    assert trie.allowed([7]) == [END]  # a prefix outside the trie (only without the constraint) may only end


def test_max_labels_one_is_single_label():
    trie = LabelTrie(SEQUENCES, SEP, END, max_labels=1)
    assert trie.allowed([4]) == [END]
    assert all(len(trie.parse(seq)) == 1 for seq in complete_answers(trie))


def test_encode_is_canonical_and_parse_inverts_it():
    trie = LabelTrie(SEQUENCES, SEP, END)
    assert trie.encode([2, 0]) == (1, 2, 9, 4, END)  # label order, whatever order the set came in
    assert trie.encode([3, 0, 0]) == (1, 2, 9, 1, 2, 5, END)
    for labels in ([0], [2, 3], [0, 1, 2, 3]):
        assert trie.parse(trie.encode(labels)) == labels
    assert trie.parse([4, 9, 1]) == [2]  # cut off by the token limit: only complete labels count
    assert trie.parse([4, 9, 1, 2]) == [2, 0]


def test_the_constraint_masks_logits_row_by_row():
    trie = LabelTrie(SEQUENCES, SEP, END)
    logits = torch.zeros(2, 10)
    logits[:, 7] = 5.0  # the unconstrained argmax would leave the taxonomy
    out = trie(torch.tensor([[1, 2], [4, 9]]), logits)  # (B, V)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 5, 9]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [1]  # label 2 used: only label 0/1/3 paths
    assert out[1, 1] == 0.0  # allowed logits are unchanged


def test_stop_bias_moves_only_the_end_token_where_the_answer_could_go_on():
    trie = LabelTrie(SEQUENCES, SEP, END)
    logits = torch.zeros(3, 10)
    prefixes = torch.tensor([[1, 2], [4, 9], [1, 3]])  # end or go on | inside a separator | end or go on (label 1)
    out = trie(prefixes, logits, stop_bias=2.5)
    assert out[0, END] == 2.5 and out[0, 5] == 0.0 and out[0, 9] == 0.0  # label 0 may end, extend to 3, or go on
    assert out[1, 1] == 0.0 and torch.isinf(out[1, END])  # no choice there: the bias does nothing
    never = trie(prefixes, logits, stop_bias=-float("inf"))
    assert torch.isinf(never[0, END]) and torch.isinf(never[2, END])  # early ends forbidden
    first = trie(prefixes[:, :0], logits, stop_bias=2.5)
    assert first.isfinite().nonzero()[:, 1].tolist() == [1, 4] * 3  # the first token starts a label, never an end


def test_choices_and_stop_margins_by_hand():
    trie = LabelTrie(SEQUENCES, SEP, END)
    path = [1, 2, 5, 9, 4]  # "science, music": choices after (1, 2) = label 0 and after (1, 2, 5) = label 3
    assert trie.choices(path) == [2, 3]
    logits = torch.zeros(len(path), 10)
    logits[2, END], logits[2, 5], logits[2, 9] = 1.0, 3.0, 2.0  # end vs best of {extend to 5, separator}: 1 - 3
    logits[3, END], logits[3, 9] = 0.5, -1.0  # end vs separator: 0.5 + 1
    assert trie.stop_margins(path, logits) == [(2, pytest.approx(-2.0)), (3, pytest.approx(1.5))]


@pytest.mark.parametrize(
    "sequences,sep,match",
    [
        ([(1, 2), (1, 2)], SEP, "same tokens"),
        ([(1,), ()], SEP, "tokenises to nothing"),
        ([(1,), (1, 9)], SEP, "continues with the separator"),
        ([(1, END)], SEP, "end token"),
        ([(1,)], (), "separator"),
    ],
)
def test_ambiguous_label_sets_are_refused(sequences, sep, match):
    with pytest.raises(PromptTuneError, match=match):
        LabelTrie(sequences, sep, END)


# ---- decoding with a model ------------------------------------------------------------------------------------
def _label_model(make_model, backbone, multi_label=True, method="prompt_tuning"):
    model = make_model(method, backbone, head="classifier", template="Text: {text}{soft} Topics:{answer}", noise=0.3)
    from prompttune.heads.label_generation import LabelGenerationHead

    model.head = LabelGenerationHead(LABELS, backbone.kind, backbone.tokenizer, multi_label, max_new_tokens=12)
    return model


def _generated_ids(model, examples, batch_size):
    out = {}
    for idx, batch in model.batches(examples, batch_size):
        ids = model.backbone.generate(
            model.inputs(batch), model.method.apply, 12, [model.backbone.tokenizer.eos_token_id], model.head.constrain
        )
        out.update(zip(idx, ids, strict=True))
    return [out[i] for i in range(len(examples))]


@pytest.mark.parametrize("bb", ["tiny-llama", "tiny-gpt2"])
def test_constrained_decoding_only_emits_known_labels(bb, backbones, make_model):
    model = _label_model(make_model, backbones[bb])
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    trie = model.head.trie
    for ids in _generated_ids(model, examples, 3):
        eos = model.backbone.tokenizer.eos_token_id
        assert trie.walk([*ids, eos]).finished or len(ids) == 12  # a valid answer, or cut by the token limit
        labels = trie.parse(ids)
        assert labels and len(set(labels)) == len(labels)
    predictions = [model.head.parse(t) for t in model.generate(examples)]
    assert all(p and set(p) <= set(LABELS) and len(set(p)) == len(p) for p in predictions)
    # without the constraint this random model leaves the taxonomy: the constraint is doing the work
    assert any(trie.walk(ids).broken for ids in _free_ids(model, examples))


def _free_ids(model, examples):
    out = []
    for _, batch in model.batches(examples, len(examples)):
        out += model.backbone.generate(model.inputs(batch), model.method.apply, 6, [])
    return out


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_constrained_decoding_is_batch_invariant(method, tiny_llama, make_model):
    """Left padding, neighbours and batch size change nothing: each row's constraint reads only its own tokens."""
    model = _label_model(make_model, tiny_llama, method=method)
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    together = _generated_ids(model, examples, 3)
    alone = [_generated_ids(model, [ex], 1)[0] for ex in examples]
    assert together == alone
    assert model.generate(examples, batch_size=3) == [model.generate([ex])[0] for ex in examples]


def test_single_label_decoding_names_one_label(tiny_llama, make_model):
    model = _label_model(make_model, tiny_llama, multi_label=False)
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    assert all(model.head.parse(t) in LABELS for t in model.generate(examples))


def test_generate_applies_any_constraint(tiny_llama, make_model):
    """The decoding hook is general: a constraint that bans the free argmax changes exactly that choice."""
    model = make_model(
        "prompt_tuning", tiny_llama, head="generation", template="Review: {text}{soft} Sentiment:{answer}"
    )
    examples = load_examples([{"text": t} for t in TEXTS], require_label=False)
    ((_, batch),) = list(model.batches(examples, 3))
    free = model.backbone.generate(model.inputs(batch), model.method.apply, 1, [])
    banned = torch.tensor([ids[0] for ids in free])
    seen = []

    def ban(generated, logits):
        seen.append(generated.shape)
        logits = logits.clone()
        logits[torch.arange(len(banned)), banned] = -torch.inf
        return logits

    constrained = model.backbone.generate(model.inputs(batch), model.method.apply, 3, [], constrain=ban)
    assert all(ids[0] != b for ids, b in zip(constrained, banned.tolist(), strict=True))
    assert seen == [torch.Size([3, 0]), torch.Size([3, 1]), torch.Size([3, 2])]  # the tokens so far, per step


def test_errors_name_the_labels():
    with pytest.raises(PromptTuneError, match="labels 'sports' and 'news' have the same tokens"):
        LabelTrie([(1, 2), (1, 2)], SEP, END, names=["sports", "news"])
