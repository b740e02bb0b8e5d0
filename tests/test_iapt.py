"""IAPT numerics by hand: the safe Padé activation, its least-squares init, attention pooling over the instruction
only (pads, soft slots and, in a causal LM, text after the slots ignored), and that what each layer receives at the
soft slots is the generator's output for that layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import prompt_inputs

from prompttune import PromptTuneError
from prompttune.data.examples import load_examples
from prompttune.methods.base import InitContext
from prompttune.methods.iapt import FIT_RANGE, IAPT, IAPTConfig, fit_rational, rational
from prompttune.types import PromptInputs, Row

ROWS = [
    Row(ids=(40, 41, 42, 1, 1, 43, 44, 45), soft=(3, 4), read=(7,)),
    Row(ids=(50, 51, 1, 1, 52), soft=(2, 3), read=(4,)),  # left-padded by 3 next to the first row
]


def _inputs(backbone, rows=ROWS) -> PromptInputs:
    return prompt_inputs(backbone, rows)


def _method(backbone, seed=0, **config) -> IAPT:
    method = IAPT(IAPTConfig(**{"num_virtual_tokens": 2, "bottleneck": 3, **config}), backbone.spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return method


# ---- the rational activation -----------------------------------------------------------------------------------------
def test_rational_activation_by_hand():
    numerator = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])  # 1 + 2x + 3x^2
    denominator = torch.tensor([0.5, -1.0, 0.0, 0.0])  # Q(x) = 0.5x - x^2
    x = torch.tensor([2.0, -1.0, 0.5, 0.0])
    # x=2: 17 / (1 + |1 - 4|) = 4.25; x=-1: 2 / (1 + |-0.5 - 1|) = 0.8; x=0.5: 2.75 / (1 + |0.25 - 0.25|); x=0: 1
    assert torch.allclose(rational(x, numerator, denominator), torch.tensor([4.25, 0.8, 2.75, 1.0]))


@pytest.mark.parametrize("activation,tol", [("gelu", 1e-2), ("silu", 1e-3), ("tanh", 1e-3), ("identity", 1e-9)])
def test_least_squares_init_approximates_the_activation(activation, tol):
    a, b = fit_rational(activation)
    assert len(a) == 6 and len(b) == 4
    x = torch.linspace(-FIT_RANGE, FIT_RANGE, 777, dtype=torch.float64)
    target = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda v: v}[activation](x)
    got = rational(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert (got - target).abs().max() < tol


def test_relu_fit_is_close_and_every_layer_starts_from_the_fit(tiny_llama):
    a, b = fit_rational("relu")
    x = torch.linspace(-FIT_RANGE, FIT_RANGE, 777, dtype=torch.float64)
    assert (
        rational(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) - x.relu()
    ).abs().max() < 0.15
    method = IAPT(IAPTConfig(activation="relu"), tiny_llama.spec)
    method.initialize(InitContext(tiny_llama.tokenizer, torch.Generator().manual_seed(0), " "))
    for layer in range(tiny_llama.spec.num_layers):
        assert torch.allclose(method.numerator[layer].double(), torch.tensor(a, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(method.denominator[layer].double(), torch.tensor(b, dtype=torch.float64), atol=1e-6)
    assert torch.equal(method.up.detach(), torch.zeros_like(method.up))  # training starts at the bias prompt


# ---- the generator --------------------------------------------------------------------------------------------------
def test_generator_by_hand(tiny_llama):
    method = _method(tiny_llama)
    D, m, P = tiny_llama.spec.hidden_size, 3, 2
    hidden = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, True, False, True]])
    layer = 1
    got = method.generate(layer, hidden, mask)  # (1, P, D)
    assert got.shape == (1, P, D)
    W, q = method.down[layer].detach(), method.query[layer].detach()
    a, b = method.numerator[layer].detach(), method.denominator[layer].detach()
    expected = []
    keep = [0, 1, 3]
    for p in range(P):
        z = [hidden[0, t] / math.sqrt(float((hidden[0, t] ** 2).mean()) + 1e-6) @ W for t in keep]  # m-vectors
        scores = torch.tensor([float(q[p] @ zt) / math.sqrt(m) for zt in z])
        weights = scores.softmax(0)
        pooled = sum(w * zt for w, zt in zip(weights, z, strict=True))
        act = torch.stack(
            [sum(a[j] * v**j for j in range(6)) / (1 + abs(sum(b[k - 1] * v**k for k in range(1, 5)))) for v in pooled]
        )
        expected.append(act @ method.up[layer].detach() + method.bias[layer, p].detach())
    assert torch.allclose(got[0], torch.stack(expected), atol=1e-5)


def test_pooling_ignores_pads_whatever_they_hold(tiny_llama):
    method = _method(tiny_llama)
    D = tiny_llama.spec.hidden_size
    text = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(2))
    alone = method.generate(1, text, torch.ones(1, 3, dtype=torch.bool))
    junk = torch.full((1, 2, D), 1e4)
    junk[0, 1, 0] = float("nan")
    padded = method.generate(1, torch.cat([junk, text], 1), torch.tensor([[False, False, True, True, True]]))
    assert torch.allclose(alone, padded, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_each_layer_receives_the_generator_output_at_the_slots(name, backbones):
    backbone = backbones[name]
    method = _method(backbone)
    inputs = method.apply(_inputs(backbone))
    before, after = [], []
    handles = []
    for layer in backbone.layers:  # registered before the call, so they run around the seam's own hook
        handles.append(layer.register_forward_pre_hook(lambda mod, args: before.append(args[0].detach().clone())))
        handles.append(
            layer.register_forward_hook(
                lambda mod, args, kw, out: after.append(args[0].detach().clone()), with_kwargs=True
            )
        )
    try:
        backbone(inputs)
    finally:
        for handle in handles:
            handle.remove()
    mask = method.instruction_mask(inputs)
    slots = inputs.soft_positions
    rows = torch.arange(2)[:, None]
    with torch.no_grad():
        assert torch.equal(inputs.inputs_embeds[rows, slots], method.generate(0, _inputs(backbone).inputs_embeds, mask))
        for layer in range(1, backbone.spec.num_layers):
            assert torch.allclose(after[layer][rows, slots], method.generate(layer, before[layer], mask), atol=1e-6)
    if backbone.kind == "causal_lm":  # only the text before the slots: row 0 pools columns 0-2, row 1 columns 3-4
        assert mask.tolist() == [[True] * 3 + [False] * 5, [False] * 3 + [True] * 2 + [False] * 3]
    else:  # an encoder reads the whole input
        assert mask.tolist() == [[True] * 3 + [False] * 2 + [True] * 3, [False] * 3 + [True] * 2 + [False] * 2 + [True]]


def _received(backbone, inputs) -> list[torch.Tensor]:
    """What each layer received (after the seam's rewrite)."""
    seen = []

    def record(module, args, kwargs, output):
        seen.append(args[0].detach().clone())

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in backbone.layers]
    try:
        backbone(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_causal_prompt_does_not_see_text_after_the_slots(tiny_llama):
    method = _method(tiny_llama)
    one = Row(ids=(40, 41, 42, 1, 1, 43, 44, 45), soft=(3, 4), read=(7,))
    other = Row(ids=(40, 41, 42, 1, 1, 60, 61, 62), soft=(3, 4), read=(7,))
    states = [
        torch.stack(_received(tiny_llama, method.apply(_inputs(tiny_llama, [row]))))[:, 0, 3:5] for row in (one, other)
    ]
    assert torch.equal(states[0], states[1])


# ---- the contract around it -----------------------------------------------------------------------------------------
def test_a_causal_template_must_put_the_text_before_the_slots(make_model, backbones):
    for template in ("{soft}Review: {text} Sentiment:{answer}", "Review: {text} Sentiment:{answer}"):
        with pytest.raises(PromptTuneError, match=r"\{soft\} after the input"):
            make_model("iapt", backbones["tiny-llama"], template=template)
    make_model("iapt", backbones["tiny-bert"], template="{soft}Review: {text}")  # an encoder reads both ways


def test_an_empty_instruction_is_refused_at_run_time(make_model, tiny_llama):
    model = make_model("iapt", tiny_llama, template="{text}{soft} Sentiment:{answer}")
    with pytest.raises(PromptTuneError, match="no text before its soft slots"):
        model.scores(load_examples([{"text": "", "label": "1"}]))


def test_decoding_passes_through_and_a_cached_prefix_is_refused(tiny_llama):
    method = _method(tiny_llama)
    step = _inputs(tiny_llama).replace(decoding=True)
    assert method.apply(step) is step
    assert not IAPT.edits_only_soft_slots
    past = tuple((torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8)) for _ in range(2))
    with pytest.raises(PromptTuneError, match="cached prefix"):
        method.apply(_inputs(tiny_llama).replace(past_key_values=past))


def test_at_init_iapt_scores_equal_a_deep_prompt_with_the_same_start(make_model, tiny_llama, sst_dev):
    # W_up starts at zero, so every layer's soft tokens are the per-token bias, initialised like deep_prompt's prompt.
    iapt = make_model("iapt", tiny_llama, noise=0.0)
    deep = make_model("deep_prompt", tiny_llama, noise=0.0)
    assert torch.equal(iapt.method.bias.detach(), deep.method.prompt.detach())
    examples = load_examples(sst_dev)
    assert torch.allclose(iapt.scores(examples), deep.scores(examples), atol=1e-6)
