"""Verbalizer families on tiny-llama: KPT expansion, refinement, calibration and weights pinned against hand
computations; the soft verbalizer's start equals the label words' output embeddings; save/load of each head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from prompttune import PromptTuner, TaskConfig
from prompttune.api import build_model, make_config
from prompttune.cli import main
from prompttune.data.examples import load_examples
from prompttune.errors import PromptTuneError
from prompttune.heads.knowledgeable import relevance
from prompttune.heads.label_words import expand_from_embeddings, read_related_words
from prompttune.types import PromptInputs

TEMPLATE = "Review: {text} Sentiment:{answer}"
WORDS = {"0": [" negative"], "1": [" positive"]}
RELATED = {"0": ["bad", "terrible"], "1": ["good", "great"]}


def kpt_model(backbone, **head_options):
    options = {"expand": 0, "related_words": RELATED, **head_options}
    cfg = make_config(backbone.spec.name, "manual", head="kpt", template=TEMPLATE, verbalizer=WORDS, **options)
    return build_model(cfg, backbone, ["0", "1"])


def hand_word_logprobs(model, examples, word_ids):
    """Per example, alone (no batching, no padding): log-softmax over the vocabulary at the answer, at `word_ids`."""
    backbone = model.backbone
    rows = []
    for ex in examples:
        ids = torch.tensor([model.template.encode(ex, backbone.tokenizer, 0, 512).ids])  # (1, T)
        pos = torch.arange(ids.shape[1])[None]
        inputs = PromptInputs(backbone.embed(ids), torch.ones_like(ids), pos, ids.new_zeros(1, 0), pos, pos[:, -1:])
        h = backbone(inputs)[0, -1]  # (D,)
        rows.append(F.log_softmax(backbone.lm_logits(h).float(), -1)[word_ids])
    return torch.stack(rows)  # (S, W)


# ---- expansion -------------------------------------------------------------------------------------------------
def test_expansion_from_embeddings_by_hand(tiny_llama):
    tok = tiny_llama.tokenizer
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(len(tok), 8, generator=gen) * 0.01  # everything else is far from the anchors' directions
    axis = torch.eye(8)

    def put(word, vec):
        (i,) = tok(word, add_special_tokens=False)["input_ids"]
        emb[i] = vec

    put(" positive", axis[0])
    put(" negative", axis[1])
    put(" great", axis[0] + 0.2 * axis[2])  # nearest to positive
    put(" good", axis[0] + 0.5 * axis[2])  # second nearest to positive
    put(" terrible", axis[1] + 0.2 * axis[3])
    put(" bad", 0.9 * axis[1] + 0.6 * axis[0])  # closer to negative than to positive
    out = expand_from_embeddings(emb, tok, {"0": [" negative"], "1": [" positive"]}, 2)
    assert out == {"0": [" terrible", " bad"], "1": [" great", " good"]}


def test_expansion_is_deterministic_and_excludes_other_labels_words(tiny_llama):
    tok = tiny_llama.tokenizer
    emb = tiny_llama.spec.embed_tokens(torch.arange(len(tok))).detach()
    taken = {"0": [" bad", " negative"], "1": [" good", " positive"]}
    first = expand_from_embeddings(emb, tok, taken, 6)
    assert first == expand_from_embeddings(emb, tok, taken, 6)
    forms = [w.strip().lower() for words in first.values() for w in words]
    assert len(forms) == len(set(forms))  # no word under two labels
    assert not {f.strip() for ws in taken.values() for f in ws} & set(forms)  # never an existing word again
    for words in first.values():
        assert len(words) == 6
        for w in words:  # whole-word tokens with a leading space, each one token
            assert w.startswith(" ") and w[1:].isalpha() and len(tok(w, add_special_tokens=False)["input_ids"]) == 1


def test_related_words_from_files(tmp_path):
    anchors = {"0": [" negative"], "1": [" positive"]}
    tsv = tmp_path / "words.txt"
    tsv.write_text("0\tbad, terrible\n1\tgood,great\n\n")
    assert read_related_words(str(tsv), anchors) == {"0": [" bad", " terrible"], "1": [" good", " great"]}
    js = tmp_path / "words.json"
    js.write_text(json.dumps({"1": ["good"], "0": "awful"}))
    assert read_related_words(str(js), anchors) == {"0": [" awful"], "1": [" good"]}
    with pytest.raises(PromptTuneError, match="'good' is given to labels '0' and '1'"):
        read_related_words({"0": ["good"], "1": ["good"]}, anchors)
    with pytest.raises(PromptTuneError, match=r"words\.txt:1: expected 'label<TAB>word"):
        tsv.write_text("0 bad\n")
        read_related_words(str(tsv), anchors)
    with pytest.raises(PromptTuneError, match="label '7' is not one of"):
        read_related_words({"7": ["x"]}, anchors)


# ---- KPT numerics --------------------------------------------------------------------------------------------------
def test_kpt_priors_refinement_and_scores_by_hand(tiny_llama, sst_train):
    model = kpt_model(tiny_llama, frequency_cutoff=0.0)
    head = model.head
    assert head.words == {"0": [" negative", " bad", " terrible"], "1": [" positive", " good", " great"]}
    support = load_examples(sst_train)
    head.prepare(model, support)
    ids = [ids[0] for _, ids in head.options]
    logp = hand_word_logprobs(model, support, ids)  # (S, W)
    probs = logp.exp()
    prior = probs.mean(0)
    torch.testing.assert_close(head.word_prior, prior.log(), atol=1e-5, rtol=1e-5)
    # Relevance by hand: cosine of each word's profile to each label's anchor profile, own / other.
    r = torch.zeros(6, 2)
    for v in range(6):
        for c, a in enumerate((0, 3)):
            r[v, c] = (probs[:, v] @ probs[:, a]) / (probs[:, v].norm() * probs[:, a].norm())
    own = torch.tensor([r[v, 0] / r[v, 1] if v < 3 else r[v, 1] / r[v, 0] for v in range(6)])
    word_class = torch.tensor([0, 0, 0, 1, 1, 1])
    anchor = torch.tensor([True, False, False, True, False, False])
    torch.testing.assert_close(relevance(probs, word_class, anchor), own, atol=1e-5, rtol=1e-5)
    assert head.keep.tolist() == ((own >= 1) | anchor).tolist()
    assert not head.keep.all()  # not vacuous: a word closer to the other label was dropped
    # Class scores: softmax-weighted mean of the kept words' calibrated log-probabilities.
    with torch.no_grad():
        head.word_weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5]))
    scores = model.scores(support)
    expected = torch.zeros(len(support), 2)
    for c in range(2):
        cols = [v for v in range(6) if word_class[v] == c and head.keep[v]]
        alpha = torch.softmax(head.word_weight.detach()[cols], -1)
        expected[:, c] = ((logp[:, cols] - prior.log()[cols]) * alpha).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_kpt_frequency_refinement_drops_unlikely_words(tiny_llama, sst_train):
    model = kpt_model(tiny_llama, frequency_cutoff=0.9, relevance=False, calibrate_words=False)
    support = load_examples(sst_train)
    word, vocab = model.head.support_statistics(model, support)
    floor = torch.quantile(vocab, 0.9)
    info = model.head.prepare(model, support)
    rare = (word.exp().mean(0) < floor) & ~model.head.is_anchor
    assert model.head.keep.tolist() == (~rare).tolist()
    assert 0 < int(rare.sum()) < 4  # not vacuous: some related words go, some stay
    assert set(info["kpt_dropped"]["frequency"]) == {
        w for w, r in zip(sum(model.head.words.values(), []), rare, strict=True) if r
    }
    assert torch.all(model.head.word_prior == 0)  # calibration off
    torch.testing.assert_close(vocab.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_kpt_multi_token_words_are_scored_exactly(tiny_llama, sst_train):
    model = kpt_model(
        tiny_llama,
        related_words={"0": ["awful"], "1": ["superb"]},
        max_word_tokens=8,
        relevance=False,
        frequency_cutoff=0.0,
        calibrate_words=False,
        learn_weights=False,
    )
    assert model.head.multi_token
    plain = make_config(
        "tiny-llama",
        "manual",
        template=TEMPLATE,
        verbalizer={"0": [" negative", " awful"], "1": [" positive", " superb"]},
    )
    reference = build_model(plain, tiny_llama, ["0", "1"])
    support = load_examples(sst_train)[:3]
    word, _ = model.head.support_statistics(model, support)
    ref_word = _plain_word_scores(reference, support)  # the plain verbalizer's exact multi-token scores
    torch.testing.assert_close(word, ref_word)
    torch.testing.assert_close(model.scores(support), torch.stack([word[:, :2].mean(1), word[:, 2:].mean(1)], 1))


def _plain_word_scores(model, examples):
    out = torch.zeros(len(examples), len(model.head.options))
    for idx, batch in model.batches(examples, 8):
        hidden, batch = model.hidden_states(batch)
        out[idx] = model.head.word_scores(hidden, batch, model.backbone, len(idx))
    return out


def test_kpt_max_word_tokens_drops_long_related_words(tiny_llama):
    model = kpt_model(tiny_llama, related_words={"0": ["awful", "bad"], "1": ["superb", "great"]})
    assert model.head.words == {"0": [" negative", " bad"], "1": [" positive", " great"]}


# ---- training, calibration, save/load -----------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["kpt", "soft_verbalizer"])
def test_head_trains_calibrates_saves_and_loads(tiny_llama, sst_train, sst_dev, tmp_path, head):
    options = {"expand": 3, "related_words": RELATED} if head == "kpt" else {}
    tuner = PromptTuner(
        "tiny-llama",
        "prompt_tuning",
        backbone=tiny_llama,
        head=head,
        template=TEMPLATE.replace("{text}", "{text}{soft}"),
        verbalizer=WORDS,
        num_virtual_tokens=2,
        max_steps=3,
        batch_size=4,
        eval_every=3,
        lr=0.05,
        calibrate="content_free",
        **options,
    )
    result = tuner.fit(sst_train, sst_dev, quiet=True)
    assert result.tuned["calibrated"] is True
    model = tuner.model
    torch.testing.assert_close(model.head.prior, model.content_free_prior())  # the shared calibration mechanism
    weights = [p for p in model.head.parameters()]
    assert weights and all(p.requires_grad for p in weights)
    tuner.save(tmp_path / "art")
    saved = json.loads((tmp_path / "art" / "head.json").read_text())
    assert saved["head"] == head and (tmp_path / "art" / "head.safetensors").is_file()
    loaded = PromptTuner.load(tmp_path / "art", backbone=tiny_llama)
    texts = [r["text"] for r in sst_dev]
    torch.testing.assert_close(loaded.predict_scores(texts), tuner.predict_scores(texts))
    if head == "kpt":
        assert saved["words"] == model.head.words and saved["anchors"] == {"0": 1, "1": 1}
        assert torch.equal(loaded.model.head.keep, model.head.keep)


def test_kpt_weights_learn_and_loaded_words_need_no_related_file(tiny_llama, sst_train, tmp_path):
    words = tmp_path / "related.txt"
    words.write_text("0\tbad,terrible\n1\tgood,great\n")
    tuner = PromptTuner(
        "tiny-llama",
        "manual",
        backbone=tiny_llama,
        head="kpt",
        template=TEMPLATE,
        verbalizer=WORDS,
        expand=0,
        related_words=str(words),
        relevance=False,
        frequency_cutoff=0.0,
        max_steps=4,
        batch_size=4,
        eval_every=4,
        lr=0.5,
        calibrate="none",
    )
    tuner.fit(sst_train, quiet=True)
    assert tuner.model.head.word_weight.abs().sum() > 0  # trained with the task loss (manual prompt: the only params)
    tuner.save(tmp_path / "art")
    words.unlink()  # the artifact holds the word list itself
    loaded = PromptTuner.load(tmp_path / "art", backbone=tiny_llama)
    assert loaded.model.head.words == tuner.model.head.words
    torch.testing.assert_close(loaded.model.head.word_weight, tuner.model.head.word_weight)


# ---- soft verbalizer -----------------------------------------------------------------------------------------------
def test_soft_verbalizer_starts_at_label_word_output_embeddings(tiny_llama, sst_dev):
    words = {"0": [" negative", " bad"], "1": [" positive"]}
    cfg = make_config("tiny-llama", "manual", head="soft_verbalizer", template=TEMPLATE, verbalizer=words)
    model = build_model(cfg, tiny_llama, ["0", "1"])
    out = tiny_llama.model.get_output_embeddings().weight  # (V, D) the LM head itself, read directly
    tok = tiny_llama.tokenizer
    ids = {w: tok(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " bad", " positive")}
    expected = torch.stack([(out[ids[" negative"]] + out[ids[" bad"]]) / 2, out[ids[" positive"]]])
    torch.testing.assert_close(model.head.class_embed.detach(), expected)
    assert torch.all(model.head.class_bias == 0)  # llama's LM head has no bias
    # One word per label: the class softmax equals the plain verbalizer's.
    single = make_config("tiny-llama", "manual", head="soft_verbalizer", template=TEMPLATE, verbalizer=WORDS)
    plain = make_config("tiny-llama", "manual", template=TEMPLATE, verbalizer=WORDS)
    examples = load_examples(sst_dev)
    soft_p = build_model(single, tiny_llama, ["0", "1"]).scores(examples).softmax(-1)
    plain_p = build_model(plain, tiny_llama, ["0", "1"]).scores(examples).softmax(-1)
    torch.testing.assert_close(soft_p, plain_p, atol=1e-5, rtol=1e-5)


def test_soft_verbalizer_on_gpt2_reads_the_tied_head(tiny_gpt2):
    cfg = make_config("tiny-gpt2", "manual", head="soft_verbalizer", template=TEMPLATE, verbalizer=WORDS)
    model = build_model(cfg, tiny_gpt2, ["0", "1"])
    ids = [tiny_gpt2.tokenizer(w[0], add_special_tokens=False)["input_ids"][0] for w in WORDS.values()]
    torch.testing.assert_close(model.head.class_embed.detach(), tiny_gpt2.model.get_output_embeddings().weight[ids])


def test_soft_verbalizer_label_embeddings_get_their_own_learning_rate(tiny_llama):
    from prompttune.train import _optimizer

    cfg = make_config(
        "tiny-llama",
        "prompt_tuning",
        head="soft_verbalizer",
        template=TEMPLATE,
        verbalizer=WORDS,
        lr=0.02,
        lr_scale=0.25,
        num_virtual_tokens=2,
    )
    model = build_model(cfg, tiny_llama, ["0", "1"])
    _, optimizer, _ = _optimizer(model, cfg.train)
    lrs = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # before warm-up
    assert lrs[id(model.head.class_embed)] == lrs[id(model.head.class_bias)] == pytest.approx(0.005)
    assert {lrs[id(p)] for p in model.method.parameters()} == {0.02}
    assert len(lrs) == sum(1 for p in model.parameters() if p.requires_grad)  # every trainable tensor, once
    with pytest.raises(PromptTuneError, match="head soft_verbalizer: field 'lr_scale'"):
        make_config("tiny-llama", "manual", head="soft_verbalizer", template=TEMPLATE, verbalizer=WORDS, lr_scale=0)


def test_head_options_are_checked():
    with pytest.raises(PromptTuneError, match="head kpt: field 'frequency_cutoff'"):
        make_config("tiny-llama", "manual", head="kpt", template=TEMPLATE, verbalizer=WORDS, frequency_cutoff=2.0)
    with pytest.raises(PromptTuneError, match="unknown option 'expand'"):
        make_config("tiny-llama", "manual", template=TEMPLATE, verbalizer=WORDS, expand=3)  # not a verbalizer option
    with pytest.raises(PromptTuneError, match="unknown head 'nope'; expected one of: .*kpt.*soft_verbalizer"):
        make_config("tiny-llama", "manual", head="nope", template=TEMPLATE, verbalizer=WORDS)
    with pytest.raises(PromptTuneError, match="config field 'head': expected one of"):
        TaskConfig(head="nope")
    with pytest.raises(PromptTuneError, match="config field 'head_config': expected nothing"):
        TaskConfig(head="verbalizer", head_config={"expand": 3})
    assert TaskConfig(head="kpt", head_config='{"expand": 3}').head_config == {"expand": 3}  # the CLI's JSON form


def test_cli_train_with_kpt_flags(tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\ngreat movie\t1\nbad film\t0\ngood fun\t1\nterrible plot\t0\n")
    args = [
        "train",
        "--model",
        "tiny-llama",
        "--method",
        "manual",
        "--head",
        "kpt",
        "--expand",
        "2",
        "--no-learn-weights",
        "--train",
        str(data),
        "--template",
        TEMPLATE,
        "--verbalizer",
        "0= negative,1= positive",
        "--calibrate",
        "none",
        "--out",
        str(tmp_path / "art"),
        "--quiet",
        "--json",
    ]
    assert main(args) == 0, capsys.readouterr().err
    head = json.loads((tmp_path / "art" / "head.json").read_text())
    assert head["kpt"]["expand"] == 2 and head["kpt"]["learn_weights"] is False
    assert all(len(words) == 3 for words in head["words"].values())
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "art"), "--data", str(data), "--json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("head", ["kpt", "soft_verbalizer"])
def test_resume_restores_the_heads_state(tiny_llama, sst_train, sst_dev, tmp_path, monkeypatch, head):
    from prompttune import train as train_mod

    def tuner():
        options = {"expand": 3, "related_words": RELATED} if head == "kpt" else {}
        return PromptTuner(
            "tiny-llama",
            "prompt_tuning",
            backbone=tiny_llama,
            head=head,
            template="Review: {text}{soft} Sentiment:{answer}",
            verbalizer=WORDS,
            num_virtual_tokens=2,
            max_steps=4,
            eval_every=2,
            batch_size=3,
            lr=0.1,
            calibrate="none",
            **options,
        )

    full = tuner()
    full_result = full.fit(sst_train, sst_dev, out=tmp_path / "full", quiet=True)
    saved = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            tuner().fit(sst_train, sst_dev, out=tmp_path / "run", quiet=True)
    resumed = tuner()
    result = resumed.fit(sst_train, sst_dev, out=tmp_path / "run", resume=True, quiet=True)
    assert result.log == full_result.log
    for key, value in full.model.state_dict().items():  # word priors and the refinement's mask included
        assert torch.equal(value, resumed.model.state_dict()[key]), key
