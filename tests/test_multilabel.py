"""Multi-label data and PTEC: 0/1 label columns and list-valued labels in the loader, multi-label metrics against hand
computations, the classifier head's dev-chosen threshold, and both PTEC forms (classifier head; trie-constrained
label generation) trained end to end on tiny-llama, saved and loaded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from prompttune import PromptTuner
from prompttune.cli import main
from prompttune.config import TaskConfig
from prompttune.data.examples import detect_label_columns, load_examples
from prompttune.errors import PromptTuneError
from prompttune.evaluation import metrics
from prompttune.heads.classifier import ClassifierHead
from prompttune.types import Example

LABELS = ["positive", "negative", "movie"]
TEMPLATE = "Text: {text}{soft} Topics:{answer}"
ROWS = [
    {"id": 11, "text": "a great movie with a great cast .", "kind": "post", "positive": 1, "negative": 0, "movie": 1},
    {"id": 12, "text": "the plot was bad .", "kind": "post", "positive": 0, "negative": 1, "movie": 0},
    {"id": 13, "text": "good fun .", "kind": "video", "positive": 1, "negative": 0, "movie": 0},
    {"id": 14, "text": "terrible film , bad acting .", "kind": "post", "positive": 0, "negative": 1, "movie": 1},
    {"id": 15, "text": "we watched it with friends .", "kind": "video", "positive": 0, "negative": 0, "movie": 1},
    {"id": 16, "text": "i hated it .", "kind": "post", "positive": 0, "negative": 1, "movie": 0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, rows in (("train", ROWS), ("dev", ROWS[:4]), ("test", ROWS[2:])):
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


# ---- loader -----------------------------------------------------------------------------------------------------
def test_binary_columns_all_and_by_name(data):
    loaded = load_examples(data / "train.jsonl", label_columns=["all"])
    assert detect_label_columns(data / "train.jsonl") == LABELS  # the int id and the text columns are not labels
    assert [e.label for e in loaded[:3]] == [("positive", "movie"), ("negative",), ("positive",)]
    assert loaded[0].fields == {"id": "11", "text": "a great movie with a great cast .", "kind": "post"}
    assert loaded[0].source.endswith("train.jsonl:1")
    named = load_examples(data / "train.jsonl", label_columns=["movie", "negative"])
    assert named[0].label == ("movie",) and named[0].fields["positive"] == "1"  # unnamed 0/1 columns stay fields
    assert named[3].label == ("movie", "negative")  # in the order the columns were named


def test_binary_columns_in_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text("text,a,b\nfirst,1,0\nsecond,0,0\nthird,1.0,1\n")
    (tmp_path / "d.tsv").write_text("text\ta\tb\nfirst\t1\t0\n")
    assert [e.label for e in load_examples(tmp_path / "d.csv", label_columns=["all"])] == [("a",), (), ("a", "b")]
    assert load_examples(tmp_path / "d.tsv", label_columns=["a", "b"])[0].label == ("a",)


@pytest.mark.parametrize(
    "rows,columns,match",
    [
        (
            [{"text": "x", "a": 1}, {"text": "y", "a": 2}],
            ["a"],
            r"d\.jsonl:2: label column 'a': expected 0 or 1, got 2",
        ),
        ([{"text": "x", "a": 1}, {"text": "y"}], ["a"], r"d\.jsonl:2: label column 'a' is missing"),
        ([{"text": "x", "a": 1}], ["a", "b"], r"d\.jsonl: label column\(s\) \['b'\] not found; columns are"),
        ([{"text": "x", "a": "yes"}], ["all"], r"d\.jsonl: label_columns 'all' found no column of 0/1 values"),
    ],
    ids=["bad-value", "missing-in-row", "missing-column", "nothing-binary"],
)
def test_binary_column_errors_name_file_line_and_column(tmp_path, rows, columns, match):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(PromptTuneError, match=match):
        load_examples(path, label_columns=columns)


def test_unlabelled_rows_with_label_columns(tmp_path):
    loaded = load_examples([{"text": "no labels here"}], require_label=False, label_columns=["a", "b"])
    assert loaded[0].label is None and loaded[0].fields == {"text": "no labels here"}
    assert load_examples(["plain"], require_label=False, label_columns=["all"])[0].label is None


def test_list_valued_label_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "tags": ["a", "b", "a"]}, {"text": "y", "tags": []}])
    assert [e.label for e in load_examples(path, label_field="tags")] == [("a", "b"), ()]
    (tmp_path / "d.tsv").write_text('text\tlabels\nx\t["a", "b"]\ny\t[oops\n')
    assert [e.label for e in load_examples(tmp_path / "d.tsv")] == [("a", "b"), "[oops"]  # not JSON: a plain label
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "labels": ["a"]}, {"text": "y", "labels": [{"a": 1}]}])
    with pytest.raises(PromptTuneError, match=r"bad\.jsonl:2: label column 'labels': expected a list of label names"):
        load_examples(tmp_path / "bad.jsonl")


def test_label_columns_config():
    assert TaskConfig(label_columns="all").label_columns == ["all"]
    assert TaskConfig(label_columns="a, b").label_columns == ["a", "b"]
    with pytest.raises(PromptTuneError, match="label_columns"):
        TaskConfig(label_columns=["a"], label_field="labels")


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_multilabel_metrics_by_hand():
    gold = [("a", "b"), ("b",), ("c",), ("a",)]
    pred = [("a",), ("b", "c"), ("c",), ()]
    got = metrics.multilabel(gold, pred, ["a", "b", "c", "d"])
    # per label (tp, fp, fn): a (1, 0, 1) F1 2/3; b (1, 0, 1) 2/3; c (1, 1, 0) 2/3; d never seen: 0
    assert got["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3 + 0) / 4)
    # pooled: tp 3, fp 1, fn 2 -> 2*3 / (2*3 + 1 + 2)
    assert got["micro_f1"] == pytest.approx(6 / 9)
    # per example |g & p| / |g | p|: 1/2, 1/2, 1, 0
    assert got["jaccard"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4)
    assert got["exact_match"] == pytest.approx(1 / 4)
    assert got["labels_per_example"] == pytest.approx(4 / 4)
    assert metrics.jaccard([(), ("a",)], [(), ("b",)]) == pytest.approx(0.5)  # both empty: a correct "no label"


def test_threshold_is_chosen_on_dev_macro_f1():
    """Global threshold over 0.05..0.95 maximising dev macro-F1; the head's scores are what the dev set gave."""
    head = ClassifierHead(["a", "b"], "causal_lm", hidden_size=4, multi_label=True)
    dev = [Example({"text": str(i)}, label=lab) for i, lab in enumerate([("a",), ("b",), ("a", "b"), ()])]
    probs = torch.tensor([[0.35, 0.1], [0.1, 0.4], [0.45, 0.33], [0.2, 0.25]])  # every gold label has p >= 0.33
    tuned = head.tune_on_dev(None, torch.logit(probs), dev, "none")
    assert tuned["threshold"] == 0.3 and tuned["dev_macro_f1"] == pytest.approx(1.0)
    assert head.decide(torch.logit(probs)) == [("a",), ("b",), ("a", "b"), ()]


def test_threshold_metric_jaccard_picks_fewer_labels_than_macro_f1():
    """Sparse gold sets: macro-F1 rewards catching the rare label (low threshold), Jaccard the per-example overlap
    (high threshold); each option maximises its own dev metric over the same grid."""
    from prompttune.evaluation import score_metrics
    from prompttune.heads.base import ThresholdConfig

    labels = ["common", "rare"]
    gold = [("common",)] * 6 + [("rare",)] + [()] * 3
    dev = [Example({"text": str(i)}, label=lab) for i, lab in enumerate(gold)]
    # common: p = 0.9 on its 6 positives, 0.1 elsewhere. rare: 0.15 on its one positive, but 0.16-0.18 on three
    # common comments. t <= 0.15 catches it (rare F1 0.4: macro-F1 0.7 vs 0.5) at three half-right examples
    # (Jaccard 0.85 vs 0.9 without it).
    rare = [0.16, 0.17, 0.18, 0.05, 0.05, 0.05, 0.15, 0.05, 0.05, 0.05]
    probs = torch.tensor([[0.9 if i < 6 else 0.1, r] for i, r in enumerate(rare)])
    scores = torch.logit(probs)
    chosen = {}
    for metric in ("macro_f1", "jaccard"):
        head = ClassifierHead(labels, "causal_lm", 4, multi_label=True, config=ThresholdConfig(metric))
        tuned = head.tune_on_dev(None, scores, dev, "none")
        grid = [0.01, 0.02, 0.03, 0.04] + [i / 20 for i in range(1, 20)]
        best = max(score_metrics(_at(head, t), dev, scores)[metric] for t in grid)
        head.threshold.fill_(tuned["threshold"])
        assert tuned[f"dev_{metric}"] == pytest.approx(best)
        assert score_metrics(head, dev, scores)[metric] == pytest.approx(best)
        chosen[metric] = tuned["threshold"]
    assert chosen["macro_f1"] <= 0.15 and chosen["jaccard"] > 0.18  # macro-F1 keeps the rare label, Jaccard drops it
    assert (
        ClassifierHead(labels, "causal_lm", 4, True, config=ThresholdConfig("jaccard")).config()["threshold_metric"]
        == "jaccard"
    )
    with pytest.raises(PromptTuneError, match="threshold_metric"):
        ThresholdConfig("accuracy")


def _at(head, t):
    head.threshold.fill_(t)
    return head


# ---- PTEC: classifier head and trie-constrained label generation, end to end ------------------------------------
def _tuner(tiny_llama, head, **kw):
    options = {"num_virtual_tokens": 3, "max_steps": 4, "batch_size": 3, "eval_every": 2, "lr": 0.05}
    options.update(kw)
    return PromptTuner(
        "tiny-llama",
        "prompt_tuning",
        backbone=tiny_llama,
        template=TEMPLATE,
        head=head,
        multi_label=True,
        label_columns="all",
        **options,
    )


def test_ptec_classifier_trains_saves_and_loads(data, tiny_llama, tmp_path):
    tuner = _tuner(tiny_llama, "classifier")
    result = tuner.fit(data / "train.jsonl", data / "dev.jsonl", quiet=True)
    assert tuner.config.task.label_columns == LABELS  # `all` was fixed on the training file
    assert tuner.model.head.labels == LABELS and result.steps == 4
    assert result.best_dev["primary_metric"] == "macro_f1" and "threshold" in result.tuned
    test = tuner.evaluate(data / "test.jsonl")
    assert {"macro_f1", "micro_f1", "jaccard", "exact_match"} <= set(test)
    saved = tuner.save(tmp_path / "art")
    assert yaml.safe_load((saved / "run.yaml").read_text())["task"]["label_columns"] == LABELS
    loaded = PromptTuner.load(saved, backbone=tiny_llama)
    texts = [r["text"] for r in ROWS]
    assert loaded.predict(texts) == tuner.predict(texts)
    assert float(loaded.model.head.threshold) == pytest.approx(result.tuned["threshold"])
    assert loaded.evaluate(data / "test.jsonl") == test


def test_label_generation_targets_are_the_trie_paths(tiny_llama):
    tuner = _tuner(tiny_llama, "label_generation")
    from prompttune.api import build_model

    model = build_model(tuner.config, tiny_llama, LABELS)
    ex = load_examples(ROWS[:1], label_columns=LABELS)
    (row,) = model.encode(ex, with_targets=True)[0]
    trie = model.head.trie
    assert row.targets == trie.encode([0, 2]) and row.targets[-1] == tiny_llama.tokenizer.eos_token_id
    assert model.head.decode(row.targets[:-1], tiny_llama.tokenizer) == "positive, movie"
    assert model.head.parse("positive, movie") == ("positive", "movie")


def test_label_generation_trains_saves_and_loads(data, tiny_llama, tmp_path):
    tuner = _tuner(tiny_llama, "label_generation", max_new_tokens=8)
    result = tuner.fit(data / "train.jsonl", data / "dev.jsonl", quiet=True)
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.best_dev["primary_metric"] == "macro_f1" and "jaccard" in result.best_dev
    texts = [r["text"] for r in ROWS]
    predictions = tuner.predict(texts)
    assert all(isinstance(p, tuple) and p and set(p) <= set(LABELS) and len(set(p)) == len(p) for p in predictions)
    test = tuner.evaluate(data / "test.jsonl")
    loaded = PromptTuner.load(tuner.save(tmp_path / "art"), backbone=tiny_llama)
    assert loaded.model.head.labels == LABELS and loaded.model.head.trie.names
    assert loaded.predict(texts) == predictions
    assert loaded.evaluate(data / "test.jsonl") == test


@pytest.mark.parametrize("metric", ["macro_f1", "jaccard"])
def test_label_generation_stop_bias_is_tuned_on_dev_and_matches_decoding(metric, data, tiny_llama, tmp_path):
    """dev_metrics reads every bias's predictions off one decoding; they must equal really decoding with the chosen
    bias, the tuned dev macro-F1 is at least that of bias 0, and the bias is saved with the artifact."""
    from prompttune.evaluation import evaluate

    tuner = _tuner(
        tiny_llama, "label_generation", max_new_tokens=12, max_steps=2, eval_every=2, threshold_metric=metric
    )
    tuner.fit(data / "train.jsonl", data / "dev.jsonl", quiet=True)
    model, head = tuner.model, tuner.model.head
    dev = load_examples(data / "test.jsonl", label_columns=LABELS) * 2
    assert head.options.threshold_metric == metric and head.config()["threshold_metric"] == metric
    head.stop_bias.fill_(0.0)
    at_zero = evaluate(model, dev)[metric]
    tuned = head.dev_metrics(model, dev, batch_size=3)
    bias = float(head.stop_bias)
    decoded = evaluate(model, dev)  # real greedy decoding with the chosen bias
    for key in ("macro_f1", "micro_f1", "jaccard", "labels_per_example"):
        assert tuned[key] == pytest.approx(decoded[key]), key
    assert tuned[metric] >= at_zero - 1e-9
    head.stop_bias.fill_(1e4)  # always end at the first choice: one label per answer (no label extends another)
    assert evaluate(model, dev)["labels_per_example"] == pytest.approx(1.0)
    head.stop_bias.fill_(bias)
    loaded = PromptTuner.load(tuner.save(tmp_path / "art"), backbone=tiny_llama)
    assert float(loaded.model.head.stop_bias) == pytest.approx(bias)
    assert loaded.evaluate(dev) == evaluate(model, dev)


def test_cli_trains_the_ptec_classifier(data, tmp_path, capsys):
    out = tmp_path / "art"
    argv = [
        "train", "--model", "tiny-llama", "--method", "prompt_tuning", "--head", "classifier", "--multi-label",
        "--label-columns", "all", "--train", str(data), "--template", TEMPLATE, "--num-virtual-tokens", "2",
        "--max-steps", "2", "--eval-every", "1", "--out", str(out), "--quiet", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test"]["primary_metric"] == "macro_f1" and "jaccard" in summary["test"]
    assert main(["predict", str(out), "good fun .", "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)["predictions"]
    assert isinstance(item["label"], list) and set(item["label"]) <= set(LABELS) and set(item["scores"]) == set(LABELS)


def test_truncation_cutting_an_emoji_still_shortens(tiny_llama):
    """Long comments carry emoji; a cut inside one must not stop truncation (a regression found on this data)."""
    from prompttune.data.templates import Template

    template = Template("Message: {message}\nTopics:{answer}")
    example = Example({"message": "go back where you came from " + "\U0001f621" * 12 + " the end"})
    for limit in range(16, 90, 3):  # the template alone is 16 tokens, the untruncated prompt 89
        prompt = template.encode(example, tiny_llama.tokenizer, 0, limit, truncate=True)
        assert len(prompt.ids) <= limit


def test_multilabel_head_starts_from_the_label_base_rates():
    head = ClassifierHead(["a", "b", "c"], "causal_lm", hidden_size=4, multi_label=True)
    train = [Example({"text": str(i)}, label=lab) for i, lab in enumerate([("a",), ("a", "b"), ("a",), ()])]
    head.prepare(None, train)
    # rates 3/4, 1/4 and 0 (clamped to 0.5/4: never an infinite logit)
    assert torch.sigmoid(head.linear.bias).tolist() == pytest.approx([0.75, 0.25, 0.125])
    assert head.decide(head.linear(torch.zeros(1, 4))) == [("a",)]  # only a label most examples carry
