"""PEFT interop: exported adapters load in PEFT 0.21.2 and give our next-token logits; PEFT adapters import."""

from __future__ import annotations

import json

import pytest
import torch

from prompttune import PromptTuneError, PromptTuner
from prompttune.backbones import tiny
from prompttune.peft_compat import export_peft, import_peft, soft_in_front
from prompttune.types import Example

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations raised inside PEFT

FRONT = "{soft}Review: {text} Sentiment:{answer}"
PLAIN = "Review: {text} Sentiment:{answer}"
VERBALIZER = "0= negative,1= positive"
ROWS = [{"text": "great movie", "label": "1"}, {"text": "bad film", "label": "0"}] * 4
TEXTS = ["great movie", "bad", "the film was very good and fun"]


def _train(backbone, tmp_path, method: str, template: str, **kwargs) -> PromptTuner:
    tuner = PromptTuner(
        backbone.spec.name, method, backbone=backbone, template=template, verbalizer=VERBALIZER, max_steps=2, **kwargs
    )
    tuner.fit(ROWS, quiet=True)
    tuner.save(tmp_path / method)
    return tuner


def _ours(tuner: PromptTuner, text: str) -> tuple[torch.Tensor, list[int]]:
    """Our next-token logits (V,) at the last position, and the input ids without soft slots (what PEFT gets)."""
    model = tuner.model
    row = model.encode([Example({"text": text})])[0][0]
    with torch.no_grad():
        hidden = model.backbone(model.method.apply(model.inputs(model.make_batch([row]))))  # (1, T, D)
        logits = model.backbone.lm_logits(hidden[0, -1])  # (V,)
    soft = set(row.soft)
    return logits, [t for i, t in enumerate(row.ids) if i not in soft]


def _peft_logits(peft_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0, -1]  # (V,)


def _assert_same_predictions(tuner: PromptTuner, peft_dir) -> None:
    base, _, _ = tiny.build(tuner.backbone.spec.name)  # a fresh copy: PEFT wraps it
    peft_model = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
    for text in TEXTS:
        ours, ids = _ours(tuner, text)
        torch.testing.assert_close(_peft_logits(peft_model, ids), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("model", "method", "template", "kwargs"),
    [
        ("tiny_llama", "prompt_tuning", FRONT, {"num_virtual_tokens": 4}),
        ("tiny_llama", "p_tuning", FRONT, {"num_virtual_tokens": 3, "encoder_hidden": 16}),
        ("tiny_llama", "prefix_tuning", PLAIN, {"num_virtual_tokens": 3}),  # grouped-query attention: 2 kv heads
        ("tiny_llama", "prefix_tuning", PLAIN, {"num_virtual_tokens": 3, "projection": True, "init": "random"}),
        ("tiny_gpt2", "prefix_tuning", PLAIN, {"num_virtual_tokens": 3}),  # plain multi-head attention
    ],
    ids=["prompt_tuning", "p_tuning", "prefix_tuning", "prefix_projection", "prefix_gpt2"],
)
def test_export_matches_peft(request, tmp_path, model, method, template, kwargs):
    backbone = request.getfixturevalue(model)
    tuner = _train(backbone, tmp_path, method, template, calibrate="none", **kwargs)
    assert export_peft(tmp_path / method, tmp_path / "peft") == []
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PREFIX_TUNING" if method == "prefix_tuning" else "PROMPT_TUNING")
    _assert_same_predictions(tuner, tmp_path / "peft")


def test_export_prefix_layout_matches_peft_save(tiny_llama, tmp_path):
    """Config keys and tensor shape equal what PEFT's own save_pretrained writes (GQA: kv sizes)."""
    _train(tiny_llama, tmp_path, "prefix_tuning", PLAIN, num_virtual_tokens=3)
    export_peft(tmp_path / "prefix_tuning", tmp_path / "ours")
    base, _, _ = tiny.build("tiny-llama")
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft.get_peft_model(base, cfg).save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    assert set(ours) == set(theirs)
    for key in ("num_attention_heads", "token_dim", "num_layers", "num_virtual_tokens", "encoder_hidden_size"):
        assert ours[key] == theirs[key], key
    from safetensors.torch import load_file

    shapes = [
        load_file(str(tmp_path / d / "adapter_model.safetensors"))["prompt_embeddings"].shape
        for d in ("ours", "theirs")
    ]
    assert shapes[0] == shapes[1]


def test_export_warns_when_soft_tokens_are_not_in_front(tiny_llama, tmp_path):
    _train(tiny_llama, tmp_path, "prompt_tuning", "Review: {text}{soft} Sentiment:{answer}", num_virtual_tokens=2)
    with pytest.warns(UserWarning, match="does not start with"):
        notes = export_peft(tmp_path / "prompt_tuning", tmp_path / "peft")
    assert any("{soft}" in n for n in notes)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_soft_in_front():
    assert soft_in_front(FRONT) and soft_in_front("{soft:4}{text}{answer}") and soft_in_front("{text}{answer}")
    assert not soft_in_front(PLAIN.replace("{text}", "{text}{soft}"))
    assert not soft_in_front(" {soft}{text}{answer}")
    assert not soft_in_front("{soft:2}{text}{soft:2}{answer}")


def test_export_dept_errors_clearly(tiny_llama, tmp_path):
    _train(tiny_llama, tmp_path, "dept", FRONT, num_virtual_tokens=2, rank=2, max_positions=32)
    with pytest.raises(PromptTuneError, match="'dept' has no PEFT equivalent"):
        export_peft(tmp_path / "dept", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_import_peft_prompt_tuning(tiny_llama, tmp_path):
    base, _, _ = tiny.build("tiny-llama")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    peft.get_peft_model(base, cfg).save_pretrained(str(tmp_path / "adapter"))
    out = import_peft(tmp_path / "adapter", "tiny-llama", FRONT, VERBALIZER, tmp_path / "art", backbone=tiny_llama)
    tuner = PromptTuner.load(out, backbone=tiny_llama)
    assert tuner.model.method.prompt.shape == (5, tiny_llama.spec.hidden_size)
    _assert_same_predictions(tuner, tmp_path / "adapter")
    scores = tuner.predict_scores(TEXTS)  # the verbalizer reads the same logits
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()


def test_import_refuses_other_adapters(tiny_llama, tmp_path):
    base, _, _ = tiny.build("tiny-llama")
    peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(
        str(tmp_path / "prefix")
    )
    with pytest.raises(PromptTuneError, match="peft_type 'PREFIX_TUNING' cannot be imported"):
        import_peft(tmp_path / "prefix", "tiny-llama", FRONT, VERBALIZER, tmp_path / "a", backbone=tiny_llama)


def test_import_refuses_pickle(tiny_llama, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}))
    (adapter / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PromptTuneError, match="pickle.*safetensors"):
        import_peft(adapter, "tiny-llama", FRONT, VERBALIZER, tmp_path / "a", backbone=tiny_llama)
