"""The one training loop: data order, schedule, model selection, early stopping, checkpoints, parameter groups,
the frozen-prefix cache during training, calibration and the error paths."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prompttune import PromptTuneError, TrainConfig
from prompttune.data.examples import load_examples
from prompttune.train import CHECKPOINT, LOG, batch_indices, fit, schedule


# ---- data order and schedule --------------------------------------------------------------------------------------
def test_batch_indices_walk_seeded_epoch_permutations():
    n, bs = 7, 3
    stream = [i for step in range(7) for i in batch_indices(step, n, bs, seed=5)]  # 21 = 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # a fresh permutation each epoch
    assert batch_indices(4, n, bs, seed=5) == batch_indices(4, n, bs, seed=5)  # pure function of (seed, step)
    assert [batch_indices(s, n, bs, 5) for s in range(7)] != [batch_indices(s, n, bs, 6) for s in range(7)]
    assert batch_indices(0, 2, 8, seed=1) in ([0, 1], [1, 0])  # never more than the data set


def test_schedule_warmup_then_decay():
    lin = schedule(TrainConfig(max_steps=10, warmup_ratio=0.2, schedule="linear"))
    assert [lin(s) for s in range(2)] == pytest.approx([1 / 3, 2 / 3])  # warm-up: (step + 1) / (warmup + 1)
    assert lin(2) == pytest.approx(1.0)
    assert lin(6) == pytest.approx(0.5)
    assert lin(10) == pytest.approx(0.0)
    cos = schedule(TrainConfig(max_steps=10, warmup_ratio=0.0, schedule="cosine"))
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    const = schedule(TrainConfig(max_steps=10, warmup_ratio=0.0, schedule="constant"))
    assert {const(s) for s in range(10)} == {1.0}


# ---- config validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value", [("lr", 0.0), ("batch_size", 0), ("warmup_ratio", 1.0), ("schedule", "step"), ("eval_every", 0)]
)
def test_train_config_names_the_bad_field(field, value):
    with pytest.raises(PromptTuneError, match=f"'{field}'"):
        TrainConfig(**{field: value})


# ---- the loop -----------------------------------------------------------------------------------------------------
def _cfg(**kw):
    base = {"max_steps": 4, "batch_size": 4, "eval_every": 2, "lr": 0.05, "checkpoint": False}
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss(tiny_llama, make_model, sst_train):
    model = make_model("prompt_tuning", tiny_llama, noise=0.0)
    result = fit(model, load_examples(sst_train), None, _cfg(max_steps=20, batch_size=8, lr=0.1), quiet=True)
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result.steps == 20 and result.seconds_per_step > 0


def test_best_dev_state_is_kept(tiny_llama, make_model, sst_train, sst_dev):
    model = make_model("prompt_tuning", tiny_llama, noise=0.0)
    dev = load_examples(sst_dev)
    result = fit(
        model, load_examples(sst_train), dev, _cfg(max_steps=6, eval_every=2, lr=0.3), quiet=True, calibrate="none"
    )
    evals = [r for r in result.log if "dev" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]  # the starting prompt is a candidate too
    values = [r["dev"]["accuracy"] for r in evals]
    first_best = values.index(max(values))
    assert result.best_step == evals[first_best]["step"]
    assert result.best_dev == evals[first_best]["dev"]
    from prompttune.evaluation import evaluate

    assert evaluate(model, dev) == result.best_dev  # the model ends at the selected state


def test_early_stopping(tiny_llama, make_model, sst_train, sst_dev):
    model = make_model("prompt_tuning", tiny_llama, noise=0.0)
    # A learning rate too small to move the dev metric: every evaluation after step 0 is "no improvement".
    cfg = _cfg(max_steps=20, eval_every=1, lr=1e-12, patience=2)
    result = fit(model, load_examples(sst_train), load_examples(sst_dev), cfg, quiet=True, calibrate="none")
    assert result.steps == 2
    assert result.best_step == 0


def test_log_and_checkpoint_files(tiny_llama, make_model, sst_train, sst_dev, tmp_path):
    model = make_model("prompt_tuning", tiny_llama, noise=0.0)
    fit(model, load_examples(sst_train), load_examples(sst_dev), _cfg(checkpoint=True), out=tmp_path, quiet=True)
    lines = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "dev" in r] == [0, 2, 4]
    assert (tmp_path / CHECKPOINT).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOG, CHECKPOINT])  # no temporaries left behind

    other = tmp_path / "no_ckpt"
    fit(model, load_examples(sst_train), None, _cfg(checkpoint=False), out=other, quiet=True)
    assert (other / LOG).is_file() and not (other / CHECKPOINT).exists()


def test_resume_errors(tiny_llama, make_model, sst_train, tmp_path):
    train = load_examples(sst_train)
    model = make_model("prompt_tuning", tiny_llama, noise=0.0)
    with pytest.raises(PromptTuneError, match="no checkpoint to resume from"):
        fit(model, train, None, _cfg(), out=tmp_path, resume=True, quiet=True)
    with pytest.raises(PromptTuneError, match="output directory"):
        fit(model, train, None, _cfg(), resume=True, quiet=True)
    fit(model, train, None, _cfg(checkpoint=True, max_steps=2), out=tmp_path, quiet=True)
    with pytest.raises(PromptTuneError, match=r"lr=0\.05.*0\.1.*same settings"):
        fit(model, train, None, _cfg(checkpoint=True, max_steps=2, lr=0.1), out=tmp_path, resume=True, quiet=True)
    # Another method, other method options or another head: one line naming what differs, not torch's state_dict
    # error from inside `load_state_dict`.
    same = _cfg(checkpoint=True, max_steps=2)
    for other, message in (
        (make_model("prompt_tuning", tiny_llama, num_virtual_tokens=5), "num_virtual_tokens=4, this run has 5"),
        (make_model("prefix_tuning", tiny_llama), "method 'prompt_tuning', this run has 'prefix_tuning'"),
        (make_model("prompt_tuning", tiny_llama, head="classifier"), "head 'verbalizer', this run has 'classifier'"),
    ):
        with pytest.raises(PromptTuneError, match=message):
            fit(other, train, None, same, out=tmp_path, resume=True, quiet=True)
    with pytest.raises(PromptTuneError, match=r"other training data: \d+ examples \(sha256 \w+\), this run 3"):
        fit(model, train[:3], None, same, out=tmp_path, resume=True, quiet=True)
    other = make_model("prompt_tuning", tiny_llama, template="Text: {text}{soft} Label:{answer}")
    with pytest.raises(PromptTuneError, match="other template"):
        fit(other, train, None, same, out=tmp_path, resume=True, quiet=True)


def test_empty_training_data(tiny_llama, make_model):
    with pytest.raises(PromptTuneError, match="training data is empty"):
        fit(make_model("prompt_tuning", tiny_llama), [], None, _cfg(), quiet=True)


def test_dept_learning_rates_reach_the_optimizer(tiny_llama, make_model, sst_train):
    model = make_model("dept", tiny_llama, noise=0.0, lowrank_lr=1e-12)
    before = {k: v.clone() for k, v in model.method.state_dict().items()}
    fit(model, load_examples(sst_train), None, _cfg(lr=0.05), quiet=True)
    assert (model.method.prompt - before["prompt"]).abs().max() > 1e-3
    for name in ("lora_a", "lora_b"):
        assert (getattr(model.method, name) - before[name]).abs().max() < 1e-9, name


def test_manual_prompt_trains_nothing(tiny_llama, make_model, sst_train, sst_dev):
    model = make_model("manual", tiny_llama)
    result = fit(model, load_examples(sst_train), load_examples(sst_dev), _cfg(max_steps=5), quiet=True)
    assert result.steps == 0
    assert "calibrated" in result.tuned


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
@pytest.mark.parametrize(
    "template",
    ["Classify the review.{soft} Review: {text} Sentiment:{answer}", "Review: {text}{soft} Sentiment:{answer}"],
    ids=["after-instruction", "middle"],
)
def test_training_through_the_prefix_cache_matches_plain_training(method, template, tiny_llama, make_model, sst_train):
    train = load_examples(sst_train)
    runs, start = [], None
    for cache in (True, False):
        model = make_model(method, tiny_llama, template=template, noise=0.0)
        start = start or {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start)  # p-tuning's encoder is initialised from the global RNG
        result = fit(model, train, None, _cfg(cache_prefix=cache, max_steps=4), quiet=True)
        runs.append((model, [r["loss"] for r in result.log if "loss" in r]))
    (cached, cached_losses), (plain, plain_losses) = runs
    assert cached_losses == pytest.approx(plain_losses, abs=1e-4)
    for key, value in plain.method.state_dict().items():
        torch.testing.assert_close(cached.method.state_dict()[key], value, rtol=0, atol=1e-4)
    assert not cached.cache_prefix  # fit switches the cache off when it returns


def test_content_free_calibration(tiny_llama, make_model, sst_train, sst_dev):
    model = make_model("prompt_tuning", tiny_llama, noise=0.0)
    dev = load_examples(sst_dev)
    result = fit(model, load_examples(sst_train), dev, _cfg(), quiet=True, calibrate="content_free")
    assert result.tuned["calibrated"] is True
    prior = model.head.prior.clone()
    calibrated = model.scores(dev)
    raw_prior = model.content_free_prior()  # computed with the prior removed
    model.head.prior.copy_(prior)
    torch.testing.assert_close(prior, raw_prior)
    assert result.tuned["prior"] == pytest.approx(raw_prior.exp().tolist(), abs=1e-4)
    model.head.prior.zero_()
    torch.testing.assert_close(calibrated, model.scores(dev) - prior)
    model.head.prior.copy_(prior)


def test_multi_label_classifier_on_an_encoder(tiny_bert, make_tuner):
    records = [
        {"text": "good fun", "labels": ["pos", "fun"]},
        {"text": "bad and boring", "labels": ["neg"]},
        {"text": "great fun", "labels": ["pos", "fun"]},
        {"text": "terrible", "labels": ["neg"]},
    ]
    tuner = make_tuner("prompt_tuning", tiny_bert, multi_label=True, max_steps=4, eval_every=2)
    tuner.config.task.labels = ["fun", "neg", "pos"]
    result = tuner.fit(records, records, quiet=True)
    assert 0.05 <= result.tuned["threshold"] <= 0.95
    metrics = tuner.evaluate(records)
    assert metrics["primary_metric"] == "macro_f1"
    assert metrics["macro_f1"] == pytest.approx(result.tuned["dev_macro_f1"])
    assert all(isinstance(p, tuple) for p in tuner.predict(["good fun", "bad"]))
