"""The llama.cpp backend on the real SmolLM2 GGUF (slow; skipped when llama-cpp-python is not installed — it is an
optional extra that compiles for ~10 minutes, never built by the default suite)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

from prompttune.llm.base import BackendConfig  # noqa: E402
from prompttune.llm.llama_cpp import LlamaCppBackend  # noqa: E402

PROMPTS = [
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "Review: the plot is a mess and the jokes fall flat.\nSentiment:",
    "Review: it is a film.\nSentiment:",
]
WORDS = [" negative", " positive", " superbly"]  # the last one is several tokens


@pytest.fixture(scope="module")
def llama():
    torch.set_num_threads(2)
    return LlamaCppBackend(BackendConfig(backend="llama_cpp", model="smollm2-135m", threads=2, n_ctx=512))


@pytest.fixture(scope="module")
def hf():
    from prompttune.llm.hf import HFBackend

    return HFBackend(BackendConfig(model="smollm2-135m"))


def test_label_logprobs_agree_with_the_dequantized_model(llama, hf):
    fast = llama.label_logprobs(PROMPTS, WORDS)  # (N, W)
    exact = hf.label_logprobs(PROMPTS, WORDS)
    assert fast.shape == (3, 3) and (fast < 0).all()
    # Q4_1 weights vs their fp32 dequantization: MODELS.md measured logits within ~0.25.
    assert (fast - exact).abs().max() < 0.5
    assert (fast[:, 1] - fast[:, 0]).argmax() == 0 and (fast[:, 1] - fast[:, 0]).argmin() == 1


def test_scores_do_not_depend_on_the_previous_prompt(llama):
    forward = llama.label_logprobs(PROMPTS, WORDS)
    backward = llama.label_logprobs(PROMPTS[::-1], WORDS).flip(0)
    torch.testing.assert_close(forward, backward, atol=0, rtol=0)
    assert llama.budget.by_kind["score"] >= 6


def test_generation_and_pieces(llama):
    [text] = llama.generate(["The capital of France is"], 5)
    assert isinstance(text, str) and text
    assert "".join(llama.pieces(" hello world")) == " hello world"
    assert len(llama.vocabulary()) > 40_000


def test_a_search_runs_on_llama_cpp_and_repeats_with_its_seed(llama, sst_train, sst_dev, tmp_path):
    from prompttune.discrete.api import search

    def run(out):
        return search(
            sst_train, sst_dev, sst_dev, optimizer="random", llm=llama, budget=40, select_top=1, per_step=2,
            template="Review: {text}\n{prompt}Sentiment:{answer}", verbalizer="0= negative,1= positive", out=out,
        )  # fmt: skip

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first.calls <= 40 and first.test["accuracy"] >= 0.5
    assert (first.best, first.dev, first.test) == (second.best, second.dev, second.test)
