"""CUDA checks (marker `gpu`, off by default; run with `pytest -m gpu` on a machine with a GPU).

Every registered method trains on a tiny backbone on the GPU; its scores stay batch-invariant there, match the same
prompt run on the CPU, and survive save -> load onto a CPU backbone; greedy generation is batch-invariant on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SINGLE_WORDS, SST_DEV, SST_TRAIN

from prompttune import PromptTuner
from prompttune.backbones import load_backbone
from prompttune.registry import METHODS, _ensure_loaded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
_ensure_loaded()
TEMPLATE = "Review: {text}\n{soft}Sentiment:{answer}"


@pytest.fixture(scope="module")
def gpu_llama():
    torch.backends.cuda.matmul.allow_tf32 = False  # compare with the CPU at fp32 precision
    torch.backends.cudnn.allow_tf32 = False
    return load_backbone("tiny-llama", device="cuda")


@pytest.fixture(scope="module")
def cpu_llama():
    return load_backbone("tiny-llama")


def _tuner(method: str, backbone, **extra) -> PromptTuner:
    options = {"num_virtual_tokens": 4} if method != "manual" else {}
    return PromptTuner(
        "tiny-llama",
        method,
        backbone=backbone,
        template=TEMPLATE,
        verbalizer=SINGLE_WORDS,
        max_steps=6,
        eval_every=3,
        batch_size=4,
        **options,
        **extra,
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_gpu_and_matches_cpu(method, gpu_llama, cpu_llama, tmp_path):
    tuner = _tuner(method, gpu_llama)
    tuner.fit(SST_TRAIN, SST_DEV, quiet=True)
    assert all(p.device.type == "cuda" for p in tuner.model.parameters())
    texts = [r["text"] for r in SST_TRAIN]
    together = tuner.predict_scores(texts)
    alone = torch.cat([tuner.predict_scores([t]) for t in texts])
    assert (together - alone).abs().max() <= 1e-4
    tuner.save(tmp_path / "art")
    on_cpu = PromptTuner.load(tmp_path / "art", backbone=cpu_llama)
    assert (on_cpu.predict_scores(texts) - together).abs().max() <= 1e-4


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "manual"))
def test_generation_on_gpu_is_batch_invariant(method, gpu_llama):
    rows = [{"text": r["text"], "label": "positive" if r["label"] == "1" else "negative"} for r in SST_TRAIN]
    tuner = _tuner(method, gpu_llama, head="generation", max_new_tokens=6)
    tuner.fit(rows, quiet=True)
    texts = [r["text"] for r in rows]
    assert tuner.generate(texts) == [tuner.generate([t])[0] for t in texts]
