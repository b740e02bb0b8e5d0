"""The soft-method contract, parametrised from the registry: a method is tested the moment it registers.

For every method x backbone the method supports (decoders with the verbalizer head, the encoder with the classifier
head): scores do not depend on batch neighbours or on the frozen-prefix cache, training touches only the method and
head, artifacts round-trip, an interrupted run resumes to the same result, and greedy generation is batch-invariant.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import prompttune.train as train_mod
from prompttune import PromptTuneError, PromptTuner, TrainConfig
from prompttune.data.examples import load_examples
from prompttune.registry import METHODS, _ensure_loaded
from prompttune.train import CHECKPOINT, fit

_ensure_loaded()

TOL = 1e-4
DECODERS = ("tiny-llama", "tiny-gpt2")


def _combos() -> list:
    out = []
    for name in sorted(METHODS):
        supports = METHODS[name].supports
        for bb in DECODERS:
            if "causal_lm" in supports:
                out.append(pytest.param(name, bb, id=f"{name}-{bb}"))
        if "encoder" in supports:
            out.append(pytest.param(name, "tiny-bert", id=f"{name}-tiny-bert-classifier"))
    return out


def _decoder_combos() -> list:
    return [
        pytest.param(name, bb, id=f"{name}-{bb}")
        for name in sorted(METHODS)
        if "causal_lm" in METHODS[name].supports
        for bb in DECODERS
    ]


DECODER_TEMPLATES = {
    "front": "{soft}Review: {text} Sentiment:{answer}",
    "after-instruction": "Classify the review as positive or negative.{soft} Review: {text} Sentiment:{answer}",
    "middle": "Review: {text}{soft} Sentiment:{answer}",
}
ENCODER_TEMPLATES = {
    "front": "{soft}Review: {text}",
    "after-instruction": "Classify the review as positive or negative.{soft} Review: {text}",
    "middle": "Review: {text}{soft} It was",
}

TARGET = {"text": "the film was good , not great .", "label": "1"}
LONGER = {
    "text": "the story starts slowly , but the second half is very strong and the final scene is moving .",
    "label": "1",
}
SHORTER = {"text": "bad .", "label": "0"}


def _ex(*records):
    return load_examples(list(records))


# ---- batch-composition invariance ---------------------------------------------------------------------------------
def _invariance_cases() -> list:
    cases = []
    for combo in _combos():
        method, bb = combo.values
        for where in DECODER_TEMPLATES:
            # Label words belong to the verbalizer (decoders); encoders use the classifier head.
            for words in ("single-token", "multi-token") if bb in DECODERS else ("classifier",):
                cases.append(pytest.param(method, bb, where, words, id=f"{combo.id}-{where}-{words}"))
    return cases


@pytest.mark.parametrize("method,bb,where,words", _invariance_cases())
def test_scores_do_not_depend_on_batch_neighbours_or_prefix_cache(
    method, bb, where, words, backbones, make_model, multi_words
):
    backbone = backbones[bb]
    encoder = backbone.kind == "encoder"
    template = (ENCODER_TEMPLATES if encoder else DECODER_TEMPLATES)[where]
    verbalizer = multi_words if words == "multi-token" else None
    try:
        model = make_model(method, backbone, template=template, verbalizer=verbalizer)
    except PromptTuneError as err:
        # A method may refuse a layout it cannot serve, but only when the model is built and with a message naming
        # {soft}: IAPT in a causal LM generates its tokens from the text before them, so `{soft}` first is refused.
        assert where == "front" and not encoder and "{soft}" in str(err), err
        return
    if any(True for _ in model.method.parameters()):
        assert any(p.abs().sum() > 0 for p in model.method.parameters()), "perturbed prompt must not be zero"
    if words == "multi-token":
        assert model.head.multi_token

    alone = model.scores(_ex(TARGET))[0]  # (C,)
    mixed = model.scores(_ex(LONGER, TARGET, SHORTER), batch_size=3)  # one left-padded batch of three
    reordered = model.scores(_ex(SHORTER, LONGER, TARGET), batch_size=8)
    assert torch.isfinite(alone).all()
    assert (alone - mixed[1]).abs().max() <= TOL
    assert (alone - reordered[2]).abs().max() <= TOL
    assert (mixed[0] - reordered[1]).abs().max() <= TOL
    assert (mixed[2] - reordered[0]).abs().max() <= TOL
    assert not torch.allclose(mixed[0], mixed[2]), "scores must depend on the input (the check is not vacuous)"

    model.use_prefix_cache(True)
    expect_cache = model.method.edits_only_soft_slots and backbone.supports_prefix_cache
    assert model.cache_prefix == expect_cache
    cached = model.scores(_ex(LONGER, TARGET, SHORTER), batch_size=3)
    cached_alone = model.scores(_ex(TARGET))[0]
    if expect_cache and where != "front" and model.method.num_soft_slots:
        rows = [r for rows in model.encode(_ex(LONGER, TARGET, SHORTER)) for r in rows]
        assert model.make_batch(rows).past is not None, "the cached-prefix path must actually be taken"
    model.use_prefix_cache(False)
    assert (cached - mixed).abs().max() <= TOL
    assert (cached_alone - alone).abs().max() <= TOL


# ---- only the method and head train -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,bb", _combos())
def test_training_updates_only_method_and_head(method, bb, backbones, make_model, sst_train):
    backbone = backbones[bb]
    model = make_model(method, backbone, noise=0.0)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method_before = {k: v.clone() for k, v in model.method.state_dict().items()}
    head_before = {k: p.clone() for k, p in model.head.named_parameters()}
    own = {id(p) for p in model.parameters()}
    assert not own & {id(p) for p in backbone.parameters()}, "the backbone must not be a trainable submodule"

    cfg = TrainConfig(max_steps=3, batch_size=4, eval_every=3, lr=0.05, checkpoint=False)
    fit(model, load_examples(sst_train), None, cfg, quiet=True)

    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"backbone tensor {key} changed"
    for p in backbone.parameters():
        assert not p.requires_grad
        assert p.grad is None
    for name, p in model.method.named_parameters():
        assert p.requires_grad
        assert not torch.equal(p.detach(), method_before[name]), f"method parameter {name} did not train"
    for name, p in model.head.named_parameters():
        assert not torch.equal(p.detach(), head_before[name]), f"head parameter {name} did not train"


# ---- artifacts ----------------------------------------------------------------------------------------------------
OTHER = {"tiny-llama": "tiny-gpt2", "tiny-gpt2": "tiny-llama", "tiny-bert": "tiny-llama"}


@pytest.mark.parametrize("method,bb", _combos())
def test_save_load_round_trip_and_size_check(method, bb, backbones, make_tuner, sst_train, sst_dev, tmp_path):
    backbone = backbones[bb]
    tuner = make_tuner(method, backbone, calibrate="content_free")
    tuner.fit(sst_train, sst_dev, quiet=True)
    texts = [r["text"] for r in sst_dev] + ["bad .", "a great film , great fun ."]
    expected = tuner.predict_scores(texts)
    path = tuner.save(tmp_path / "art")

    loaded = PromptTuner.load(path, backbone=backbone)
    got = loaded.predict_scores(texts)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-6
    assert loaded.predict(texts) == tuner.predict(texts)
    for key, value in tuner.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key

    other = backbones[OTHER[bb]]
    with pytest.raises(PromptTuneError) as err:
        PromptTuner.load(path, backbone=other)
    assert bb in str(err.value) and other.spec.name in str(err.value)


# ---- resume -------------------------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def _checkpoint_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(("model.", "best."))}


@pytest.mark.parametrize("method,bb", _combos())
def test_resume_reproduces_uninterrupted_run(
    method, bb, backbones, make_tuner, sst_train, sst_dev, tmp_path, monkeypatch
):
    backbone = backbones[bb]
    opts = {"max_steps": 6, "eval_every": 3, "checkpoint": True, "lr": 0.1, "batch_size": 3}
    full = make_tuner(method, backbone, **opts)
    full_result = full.fit(sst_train, sst_dev, out=tmp_path / "full", quiet=True)
    trainable = any(True for _ in full.model.parameters())

    saved = train_mod.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(1)
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "save_checkpoint", save_then_die)
        killed = make_tuner(method, backbone, **opts)
        if trainable:
            with pytest.raises(_Killed):
                killed.fit(sst_train, sst_dev, out=tmp_path / "run", quiet=True)
            assert calls == [1]
        else:  # nothing to train: no checkpoint is written, so there is nothing to resume
            killed.fit(sst_train, sst_dev, out=tmp_path / "run", quiet=True)
            assert calls == []
            return
    with safe_open(str(tmp_path / "run" / CHECKPOINT), "pt") as f:
        assert json.loads(f.metadata()["prompttune"])["state"]["step"] == 3

    # A new process starts with no frozen-prefix cache: values recomputed then must equal those of the first run.
    getattr(backbone, "prefix_store", {}).clear()
    resumed = make_tuner(method, backbone, **opts)
    result = resumed.fit(sst_train, sst_dev, out=tmp_path / "run", resume=True, quiet=True)

    assert result.steps == full_result.steps == 6
    assert result.best_step == full_result.best_step
    assert result.best_dev == full_result.best_dev
    assert result.log == full_result.log  # same losses, learning rates and dev metrics at every step
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    final_full = _checkpoint_tensors(tmp_path / "full" / CHECKPOINT)
    final_resumed = _checkpoint_tensors(tmp_path / "run" / CHECKPOINT)
    assert final_full.keys() == final_resumed.keys()
    for key, value in final_full.items():
        assert torch.equal(value, final_resumed[key]), key
    assert full.evaluate(sst_dev) == resumed.evaluate(sst_dev)


# ---- generation ---------------------------------------------------------------------------------------------------
def _generated_ids(model, records, batch_size, stop_ids):
    out = {}
    for idx, batch in model.batches(_ex(*records), batch_size):
        ids = model.backbone.generate(model.inputs(batch), model.method.apply, 6, stop_ids)
        out.update(zip(idx, ids, strict=True))
    return [out[i] for i in range(len(records))]


@pytest.mark.parametrize("method,bb", _decoder_combos())
def test_greedy_generation_is_batch_invariant(method, bb, backbones, make_tuner, gen_train):
    backbone = backbones[bb]
    tuner = make_tuner(method, backbone, head="generation", max_new_tokens=6)
    tuner.fit(gen_train, quiet=True)
    model = tuner.model
    stops = model.head.stop_ids
    for stop_ids in (stops, []):  # with EOS, and forced to run all 6 decoding steps
        alone = _generated_ids(model, [TARGET], 1, stop_ids)[0]
        batch = _generated_ids(model, [LONGER, TARGET, SHORTER], 3, stop_ids)
        assert batch[1] == alone
        assert _generated_ids(model, [LONGER], 1, stop_ids)[0] == batch[0]
        assert _generated_ids(model, [SHORTER], 1, stop_ids)[0] == batch[2]
    assert len(alone) == 6
    texts = [TARGET["text"], LONGER["text"], SHORTER["text"]]
    assert tuner.generate(texts) == [tuner.generate([t])[0] for t in texts]
