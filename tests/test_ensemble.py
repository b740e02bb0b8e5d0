"""Prompt ensembles on tiny-llama: combined probabilities equal the hand-averaged members', votes are counted by
hand, members share one backbone, and the `ensemble` verb runs."""

from __future__ import annotations

import json

import pytest
import torch

from prompttune import PromptTuner
from prompttune.cli import main
from prompttune.data.examples import load_examples
from prompttune.ensemble import PromptEnsemble, combine
from prompttune.errors import PromptTuneError
from prompttune.evaluation import score_metrics

WORDS = {"0": [" negative"], "1": [" positive"]}


@pytest.fixture(scope="module")
def artifacts(tiny_llama, sst_train, sst_dev, tmp_path_factory):
    """Two learned prompts with different templates and one manual template, each saved."""
    root = tmp_path_factory.mktemp("ens")
    specs = [
        ("prompt_tuning", "Review: {text}{soft} Sentiment:{answer}", {"num_virtual_tokens": 2}),
        ("prompt_tuning", "{soft}Text: {text} Label:{answer}", {"num_virtual_tokens": 3}),
        ("manual", "Is it good? {text} Answer:{answer}", {}),
    ]
    dirs = []
    for i, (method, template, extra) in enumerate(specs):
        tuner = PromptTuner(
            "tiny-llama",
            method,
            backbone=tiny_llama,
            template=template,
            verbalizer=WORDS,
            max_steps=2,
            batch_size=4,
            eval_every=2,
            lr=0.05,
            calibrate="none",
            seed=i,
            **extra,
        )
        tuner.fit(sst_train, sst_dev, quiet=True)
        dirs.append(tuner.save(root / f"m{i}"))
    return dirs


def test_mean_equals_hand_averaged_probabilities(artifacts, tiny_llama, sst_dev):
    ens = PromptEnsemble.load(artifacts[:2], backbone=tiny_llama)
    assert all(m.backbone is tiny_llama for m in ens.members)
    texts = [r["text"] for r in sst_dev]
    by_hand = [PromptTuner.load(d, backbone=tiny_llama).predict_scores(texts).softmax(-1) for d in artifacts[:2]]
    expected = (by_hand[0] + by_hand[1]) / 2  # (N, C)
    torch.testing.assert_close(ens.predict_proba(sst_dev, "mean"), expected)
    assert ens.predict(sst_dev) == [ens.labels[i] for i in expected.argmax(-1).tolist()]
    metrics = ens.evaluate(sst_dev, "mean")
    gold = [r["label"] for r in sst_dev]
    pred = [ens.labels[i] for i in expected.argmax(-1).tolist()]
    assert metrics["accuracy"] == sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def test_vote_by_hand():
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]],
            [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]],
            [[0.1, 0.9], [0.45, 0.55], [0.3, 0.7]],
        ]
    )  # (M=3, N=3, C=2)
    votes = combine(probs, "vote")
    assert votes.argmax(-1).tolist() == [0, 1, 1]  # majorities 2:1, 1:2, 0:3
    fractions = torch.tensor([[2, 1], [1, 2], [0, 3]]) / 3
    torch.testing.assert_close(votes, fractions + probs.mean(0) / 6)  # vote share + the tie-break bonus mean / 2M
    torch.testing.assert_close(combine(probs, "mean"), probs.mean(0))
    tie = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])  # one vote each: the larger mean probability (0.65) wins
    assert combine(tie, "vote").argmax(-1).tolist() == [0]
    with pytest.raises(PromptTuneError, match="combine must be one of mean, vote"):
        combine(probs, "max")


def test_evaluate_all_reports_members_and_combiners(artifacts, tiny_llama, sst_dev):
    ens = PromptEnsemble.load(artifacts, backbone=tiny_llama)
    out = ens.evaluate_all(sst_dev)
    examples = load_examples(sst_dev)
    probs = ens.member_probabilities(examples)  # (3, N, C)
    head = ens.members[0].model.head
    for m, p in zip(out["members"], probs, strict=True):
        assert m == score_metrics(head, examples, p.log())
    assert out["vote"] == score_metrics(head, examples, combine(probs, "vote"))
    assert set(out) == {"members", "mean", "vote"}


def test_members_must_agree(artifacts, tiny_llama, sst_train, tmp_path):
    other = PromptTuner(
        "tiny-llama",
        "manual",
        backbone=tiny_llama,
        template="{text} Sentiment:{answer}",
        verbalizer={"a": [" negative"], "b": [" positive"]},
        calibrate="none",
        max_steps=0,
    )
    other.fit([{"text": r["text"], "label": "a" if r["label"] == "0" else "b"} for r in sst_train], quiet=True)
    other.save(tmp_path / "other")
    with pytest.raises(PromptTuneError, match="has labels \\['a', 'b'\\], the first member \\['0', '1'\\]"):
        PromptEnsemble.load([artifacts[0], tmp_path / "other"], backbone=tiny_llama)
    with pytest.raises(PromptTuneError, match="at least one artifact"):
        PromptEnsemble.load([])


def test_cli_ensemble(artifacts, sst_dev, tmp_path, capsys):
    data = tmp_path / "dev.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in sst_dev))
    assert main(["ensemble", *map(str, artifacts), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["members"]) == 3 and {"mean", "vote"} <= set(out)
    assert main(["ensemble", *map(str, artifacts[:2]), "--data", str(data), "--combine", "vote"]) == 0
    text = capsys.readouterr().out
    assert "ensemble (vote)" in text and "ensemble (mean)" not in text
