"""The serving engine without HTTP: every registered decoder method, mixed in one batch, gives what it gives alone.

Parametrised from the METHODS registry like the contract test, so a newly registered method is served (and checked
for cross-prompt batch invariance) the moment it registers. A test-only method whose layer hook also acts on
decoding steps covers the path where a lane's decoding step splits into several passes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from prompttune.methods.base import SoftPromptMethod
from prompttune.registry import METHODS, _ensure_loaded
from prompttune.serve.config import ServeConfig
from prompttune.serve.decoding import Generation
from prompttune.serve.engine import Engine, Job, ScoreItem
from prompttune.serve.metrics import server_metrics
from prompttune.serve.prompts import LoadedPrompt
from prompttune.serve.protocol import Sampling
from prompttune.types import Example, PromptInputs, Row

_ensure_loaded()
TOL = 1e-4
TEMPLATE = "Review: {text}{soft} Sentiment:{answer}"
TEXTS = ["a great movie with a great cast .", "bad .", "the plot was bad and the ending was worse ."]
DECODER_METHODS = sorted(name for name, cls in METHODS.items() if "causal_lm" in cls.supports)


@dataclass
class _HookConfig:
    scale: float = 0.5


class _HookEveryStep(SoftPromptMethod):
    """Adds a learned vector to the input of every layer, prompt and decoding steps alike (not registered)."""

    name = "hook_every_step"
    config_cls = _HookConfig
    uses_layer_hook = True

    def __init__(self, config: _HookConfig, spec):
        super().__init__(config, spec)
        gen = torch.Generator().manual_seed(3)
        self.shift = nn.Parameter(torch.randn(spec.num_layers, spec.hidden_size, generator=gen) * config.scale)

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        return inputs.replace(layer_hook=self.layer_hook)

    def layer_hook(self, layer: int, hidden: Tensor, inputs: PromptInputs) -> Tensor:
        return hidden + self.shift[layer].to(hidden.dtype)  # (B, T, D)


def _prompts(make_model, backbone) -> list[LoadedPrompt]:
    out = []
    for i, method in enumerate(DECODER_METHODS):
        model = make_model(method, backbone, template=TEMPLATE, seed=i)
        out.append(LoadedPrompt(method, model.eval(), "soft"))
    base = make_model("manual", backbone, template=TEMPLATE)
    hooked = type(base)(backbone, _HookEveryStep(_HookConfig(), backbone.spec), base.head, base.template).eval()
    out.append(LoadedPrompt("hook_every_step", hooked, "soft"))
    return out


def _run(engine: Engine, make_items, paused: bool) -> list[list[tuple]]:
    """Submit every request (one job each), optionally as one batch; returns each job's events."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        if paused:
            engine.pause(True)
        for parts in make_items:
            job = Job(loop, 0)
            items = parts(job)
            job.parts = len(items)
            engine.submit(job, items)
            jobs.append((job, len(items)))
        engine.pause(False)
        out = []
        for job, n in jobs:
            events, done = [], 0
            while done < n:
                event = await asyncio.wait_for(job.events.get(), 60)
                events.append(event)
                assert event[0] != "error", event
                done += event[0] in ("scores", "done")
            out.append(events)
        return out

    return asyncio.run(main())


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(tiny_llama, ServeConfig(max_batch_size=64, batch_wait_ms=1), server_metrics())
    yield eng
    eng.close(30)


def _score_item(prompt: LoadedPrompt, text: str):
    encoded = prompt.encode(text, 256, "input")
    return lambda job: [ScoreItem(prompt, prompt.head.rows(encoded, 0), job, 0)]


def _gen_item(prompt: LoadedPrompt, text: str, n: int, eos: int):
    encoded = prompt.encode(text, 256, "prompt")
    row = Row(encoded.ids, encoded.soft, (len(encoded.ids) - 1,))
    sampling = Sampling(n, 0.0, 1.0, 1, [], None, 2, False, False)
    return lambda job: [Generation(prompt, row, job, 0, sampling, frozenset({eos}))]


def test_every_method_scores_the_same_mixed_as_alone(engine, tiny_llama, make_model):
    prompts = _prompts(make_model, tiny_llama)
    requests = [_score_item(p, t) for p in prompts for t in TEXTS]
    before = engine.metrics.value("prompttune_forward_passes_total", kind="classify")
    mixed = _run(engine, requests, paused=True)
    passes = engine.metrics.value("prompttune_forward_passes_total", kind="classify") - before
    k = 0
    for p in prompts:
        alone = p.model.scores([Example({"text": t}) for t in TEXTS])  # (N, C) the core's own path
        for i in range(len(TEXTS)):
            got = mixed[k][0][2]
            assert (got - alone[i]).abs().max() <= TOL, p.name
            k += 1
    # one pass for every method that edits inputs or keys/values, one more per method that hooks the layers
    assert 2 <= passes < len(prompts)


def test_every_method_generates_the_same_mixed_as_alone(engine, tiny_llama, make_model):
    prompts = _prompts(make_model, tiny_llama)
    eos = tiny_llama.tokenizer.eos_token_id
    lengths = [3 + (i % 4) * 2 for i in range(len(prompts))]  # rows finish at different steps and leave
    requests = [_gen_item(p, TEXTS[i % 3], n, eos) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    alone = [_run(engine, [r], paused=False)[0] for r in requests]
    mixed = _run(engine, requests, paused=True)
    for p, a, m, n, i in zip(prompts, alone, mixed, lengths, range(len(prompts)), strict=True):
        text_a = "".join(e[2] for e in a if e[0] == "delta")
        text_m = "".join(e[2] for e in m if e[0] == "delta")
        assert text_m == text_a, p.name
        lp_a = [x[1] for e in a if e[0] == "delta" for x in e[3]]
        lp_m = [x[1] for e in m if e[0] == "delta" for x in e[3]]
        assert len(lp_a) == len(lp_m) and max(abs(x - y) for x, y in zip(lp_a, lp_m, strict=True)) <= TOL
        want = p.model.generate([Example({"text": TEXTS[i % 3]})], max_new_tokens=n)[0]
        assert text_a == want, p.name  # the core's own greedy decoding


def test_a_failing_request_fails_alone_not_its_batch_or_the_engine(engine, tiny_llama, make_model):
    class _Broken(SoftPromptMethod):
        name = "broken"
        config_cls = _HookConfig

        def apply(self, inputs):
            raise RuntimeError("boom")

    base = make_model("manual", tiny_llama, template=TEMPLATE)
    model = type(base)(tiny_llama, _Broken(_HookConfig(), tiny_llama.spec), base.head, base.template)
    broken, good = LoadedPrompt("broken", model, "soft"), LoadedPrompt("manual", base, "soft")
    eos = tiny_llama.tokenizer.eos_token_id
    requests = [_score_item(good, "bad ."), _score_item(broken, "bad ."), _gen_item(broken, "bad .", 3, eos)]
    requests.append(_gen_item(good, "bad .", 3, eos))
    engine.pause(True)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, 1) for _ in requests]
        for job, make in zip(jobs, requests, strict=True):
            engine.submit(job, make(job))
        engine.pause(False)
        return [[await asyncio.wait_for(job.events.get(), 30)] for job in jobs]

    first = asyncio.run(main())
    assert [events[0][0] for events in first] == ["scores", "error", "error", "delta"]
    assert first[1][0][2].status == 500 and "boom" in first[1][0][2].message
    assert _run(engine, [_score_item(good, "bad .")], paused=False)[0][0][0] == "scores"
