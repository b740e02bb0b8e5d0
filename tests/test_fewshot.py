"""Active few-shot selection: k-center and k-means on hand-made points, uncertainty on hand-made probabilities and on
tiny-llama's zero-shot scores, class balance, seeding, and the `select` verb."""

from __future__ import annotations

import json

import pytest
import torch

from prompttune.api import build_model, make_config
from prompttune.cli import main
from prompttune.data.examples import load_examples
from prompttune.data.fewshot import (
    SelectConfig,
    entropy,
    k_center_greedy,
    k_means,
    margin,
    quotas,
    sample_k_shot,
    select,
    select_indices,
)
from prompttune.errors import PromptTuneError

TEMPLATE = "Review: {text} Sentiment:{answer}"
WORDS = {"0": [" negative"], "1": [" positive"]}

# Three tight clusters in 2-D (indices 0-3, 4-6, 7-9).
CLUSTERS = torch.tensor(
    [
        [0.0, 0.0],
        [0.1, 0.0],
        [0.0, 0.1],
        [0.1, 0.1],
        [10.0, 0.0],
        [10.1, 0.0],
        [10.0, 0.1],
        [0.0, 10.0],
        [0.1, 10.0],
        [0.0, 10.1],
    ]
)


def cluster_of(i: int) -> int:
    return 0 if i < 4 else 1 if i < 7 else 2


def test_k_center_picks_far_apart_points():
    line = torch.tensor([[0.0], [0.1], [0.2], [5.0], [10.0], [10.1]])
    assert k_center_greedy(line, 3, first=0) == [0, 5, 3]  # farthest (10.1), then the middle (5.0)
    assert k_center_greedy(line, 2, first=4) == [4, 0]
    for first in range(10):
        assert sorted(cluster_of(i) for i in k_center_greedy(CLUSTERS, 3, first)) == [0, 1, 2]


def test_k_means_takes_one_point_per_cluster_and_is_seeded():
    picks = [k_means(CLUSTERS, 3, torch.Generator().manual_seed(s)) for s in range(5)]
    for p in picks:
        assert sorted(cluster_of(i) for i in p) == [0, 1, 2]
    assert picks[0] == k_means(CLUSTERS, 3, torch.Generator().manual_seed(0))
    assert picks[0][0] in (0, 1, 2, 3)  # the largest cluster first; its point nearest the centroid (0.05, 0.05)


def test_diversity_strategy_on_features_is_seeded():
    cfg = SelectConfig(k=3, strategy="diversity", seed=3)
    features = CLUSTERS + 1.0  # off the origin: the strategy compares directions (cosine), not raw positions
    a = select_indices(3, "diversity", cfg, features=features)
    assert a == select_indices(3, "diversity", cfg, features=features)
    assert len(set(a)) == 3


def test_uncertainty_picks_max_entropy_and_min_margin():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.55, 0.45], [0.99, 0.01]])
    torch.testing.assert_close(entropy(probs)[1], torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(margin(probs), torch.tensor([0.8, 0.0, 0.4, 0.1, 0.98]))
    assert select_indices(2, "uncertainty", probs=probs) == [1, 3]
    cfg = SelectConfig(k=3, strategy="uncertainty", uncertainty="margin")
    three = torch.tensor([[0.4, 0.4, 0.2], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33], [0.5, 0.45, 0.05]])
    assert select_indices(3, "uncertainty", cfg, probs=three) == [0, 2, 3]  # margins 0, .01, .05 (not .3)
    assert select_indices(2, "uncertainty", probs=three) == [2, 0]  # entropy: the near-uniform row first


def test_balance_and_random_are_seeded():
    assert quotas(5, [0, 0, 0, 0, 0, 1]) == {0: 4, 1: 1}  # the small class cannot give more than it has
    assert quotas(5, [0, 0, 0, 1]) == {0: 3, 1: 1}  # k above the pool: everything
    assert quotas(4, ["b", "a", "a", "b", "b"]) == {"a": 2, "b": 2}
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7]])
    groups = probs.argmax(-1).tolist()  # [0, 0, 0, 1, 1, 1]
    picked = select_indices(2, "uncertainty", probs=probs, groups=groups)
    assert picked == [1, 4]  # the most uncertain of each predicted class
    cfg = SelectConfig(k=4, strategy="random", seed=1)
    a = select_indices(4, "random", cfg, groups=groups)
    assert a == select_indices(4, "random", cfg, groups=groups) and sorted(groups[i] for i in a) == [0, 0, 1, 1]
    other = [select_indices(4, "random", SelectConfig(k=4, strategy="random", seed=s), groups=groups) for s in range(6)]
    assert len({tuple(o) for o in other}) > 1
    with pytest.raises(PromptTuneError, match="k=7 is larger than the pool"):
        select_indices(7, "random", groups=groups)


def test_sample_k_shot_is_balanced(sst_train):
    examples = load_examples(sst_train)
    shot = sample_k_shot(examples, 2, seed=5)
    assert sorted(ex.label for ex in shot) == ["0", "0", "1", "1"]
    assert shot == sample_k_shot(examples, 2, seed=5)


def zero_shot(backbone):
    return build_model(make_config("tiny-llama", "manual", template=TEMPLATE, verbalizer=WORDS), backbone, ["0", "1"])


def test_select_uses_the_frozen_models_zero_shot_uncertainty(tiny_llama, sst_train, sst_dev):
    model = zero_shot(tiny_llama)
    pool = load_examples(sst_train + sst_dev, require_label=False)
    cfg = SelectConfig(k=3, strategy="uncertainty", calibrate=False)
    probs = model.scores(pool).softmax(-1)  # by hand: the verbalizer's class distribution
    expected = sorted(range(len(pool)), key=lambda i: -float(entropy(probs)[i]))[:3]
    chosen = select(model, pool, cfg)
    assert chosen.indices == expected and chosen.predicted == probs.argmax(-1).tolist()
    calibrated = select(model, pool, SelectConfig(k=3, strategy="uncertainty"))
    cal_probs = (model.scores(pool) - model.content_free_prior()).softmax(-1)
    assert calibrated.indices == sorted(range(len(pool)), key=lambda i: -float(entropy(cal_probs)[i]))[:3]
    diverse = select(model, pool, SelectConfig(k=4, strategy="diversity", balance="label", seed=0))
    assert sorted(pool[i].label for i in diverse.indices) == ["0", "0", "1", "1"]
    cache: dict = {}  # strategies compared on one pool share the forward passes
    again = select(model, pool, SelectConfig(k=4, strategy="diversity", balance="label", seed=0), cache)
    assert again.indices == diverse.indices and set(cache) == {"features"}
    assert select(model, pool, SelectConfig(k=3, strategy="uncertainty"), cache).indices == calibrated.indices
    assert set(cache) == {"features", "probs:calibrate=True"}
    with pytest.raises(PromptTuneError, match="balance=label needs a labelled pool"):
        select(
            model,
            load_examples([{"text": "a"}, {"text": "b"}], require_label=False),
            SelectConfig(k=1, strategy="random", balance="label"),
        )


def test_cli_select_writes_the_chosen_rows(tmp_path, capsys, sst_train):
    pool = tmp_path / "pool.tsv"
    pool.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in sst_train))
    out = tmp_path / "chosen.jsonl"
    args = [
        "select",
        "--model",
        "tiny-llama",
        "--pool",
        str(pool),
        "--k",
        "3",
        "--strategy",
        "uncertainty",
        "--template",
        "Review: {sentence} Sentiment:{answer}",
        "--verbalizer",
        "0= negative,1= positive",
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 == len(summary["indices"])
    assert [r["sentence"] for r in rows] == [sst_train[i]["text"] for i in summary["indices"]]
    assert summary["score"] == sorted(summary["score"], reverse=True)
    tsv = tmp_path / "div.tsv"
    args = [
        "select",
        "--model",
        "tiny-llama",
        "--pool",
        str(pool),
        "--k",
        "2",
        "--strategy",
        "diversity",
        "--diversity",
        "kmeans",
        "--template",
        "Review: {sentence}{answer}",
        "--out",
        str(tsv),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert len(load_examples(str(tsv))) == 2
    capsys.readouterr()
    assert main(["select", "--model", "tiny-llama", "--pool", str(pool), "--out", str(tsv)]) == 2
    assert "needs --verbalizer" in capsys.readouterr().err
