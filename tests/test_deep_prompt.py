"""Deep prompts (P-tuning v2 style): the state every layer receives at a soft slot is that layer's learned vector,
and initialisation follows the text's embeddings (layer 0) and the frozen model's own states of it (deeper layers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import prompt_inputs

from prompttune.methods.base import InitContext
from prompttune.methods.deep_prompt import DeepPrompt, DeepPromptConfig
from prompttune.types import PromptInputs, Row

ROWS = [
    Row(ids=(40, 41, 42, 1, 1, 1, 43, 44, 45), soft=(3, 4, 5), read=(8,)),
    Row(ids=(50, 1, 1, 1, 51, 52), soft=(1, 2, 3), read=(5,)),  # left-padded by 3 next to the first row
]
INIT_TEXT = "Label: negative. Label: positive."


def _inputs(backbone, rows=ROWS) -> PromptInputs:
    return prompt_inputs(backbone, rows)


def received(backbone, inputs):
    """What each layer actually received (after the seam's rewrite), and the final hidden states."""
    seen = []

    def record(module, args, kwargs, output):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in backbone.layers]
    try:
        out = backbone(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _method(backbone, n=3, seed=0) -> DeepPrompt:
    method = DeepPrompt(DeepPromptConfig(num_virtual_tokens=n), backbone.spec)
    with torch.no_grad():
        method.prompt.copy_(torch.randn(method.prompt.shape, generator=torch.Generator().manual_seed(seed)))
    return method


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_every_layer_receives_its_learned_vector_at_the_slots(name, backbones):
    backbone = backbones[name]
    method = _method(backbone)
    inputs = method.apply(_inputs(backbone))
    seen, _ = received(backbone, inputs)
    assert len(seen) == backbone.spec.num_layers
    slots = inputs.soft_positions  # (B, 3)
    for b in range(2):
        # Layer 0: the vectors are the slots' input embeddings (the model may add positions to them).
        assert torch.equal(inputs.inputs_embeds[b, slots[b]], method.prompt[0].detach())
        for layer in range(1, backbone.spec.num_layers):
            assert torch.equal(seen[layer][b, slots[b]], method.prompt[layer].detach())
    if name == "tiny-llama":  # rotary positions: layer 0 receives the embeddings themselves
        assert torch.equal(seen[0][0, slots[0]], method.prompt[0].detach())


def test_only_the_slots_change_and_text_states_are_untouched(tiny_llama):
    method = _method(tiny_llama)
    inputs = method.apply(_inputs(tiny_llama))
    seen, _ = received(tiny_llama, inputs)
    plain = [s for s in received(tiny_llama, _inputs(tiny_llama))[0]]
    # Layer 1's input: the text before the first slot is what the frozen model computes without any prompt.
    assert torch.equal(seen[1][0, :3], plain[1][0, :3])
    assert not torch.allclose(seen[1][0, 6:], plain[1][0, 6:])


def test_decoding_steps_pass_through(tiny_llama):
    method = _method(tiny_llama)
    step = _inputs(tiny_llama).replace(decoding=True)
    assert method.apply(step) is step


def test_text_init_uses_embeddings_then_the_frozen_states_of_the_same_text(tiny_llama):
    n = 5
    method = DeepPrompt(DeepPromptConfig(num_virtual_tokens=n, init_text=INIT_TEXT), tiny_llama.spec)
    method.initialize(InitContext(tiny_llama.tokenizer, torch.Generator().manual_seed(0), "unused"))
    ids = torch.tensor(tiny_llama.tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"])
    ids = ids.repeat(n)[:n]  # the text cycled to fill the slots
    prompt = method.prompt.detach()  # (layers, n, D)
    assert torch.equal(prompt[0], tiny_llama.embed(ids))
    # Deeper layers: the text run after one copy of itself (no attention-sink position), second copy kept.
    pos = torch.arange(2 * n)[None]
    seen, _ = received(
        tiny_llama,
        PromptInputs(
            tiny_llama.embed(torch.cat([ids, ids])[None]),
            torch.ones(1, 2 * n, dtype=torch.long),
            pos,
            pos[:, :0],
            pos,
            pos,
        ),
    )
    for layer in range(1, tiny_llama.spec.num_layers):
        assert torch.allclose(prompt[layer], seen[layer][0, n:], atol=1e-6)
    assert method.num_trainable() == tiny_llama.spec.num_layers * n * tiny_llama.spec.hidden_size


def test_without_layer_states_every_layer_starts_from_the_embeddings(tiny_llama):
    spec = dataclasses.replace(tiny_llama.spec, layer_inputs=None)
    method = DeepPrompt(DeepPromptConfig(num_virtual_tokens=4, init_text=INIT_TEXT), spec)
    method.initialize(InitContext(tiny_llama.tokenizer, torch.Generator().manual_seed(0), "unused"))
    prompt = method.prompt.detach()
    assert all(torch.equal(prompt[layer], prompt[0]) for layer in range(spec.num_layers))


def test_random_init_draws_each_layer(tiny_llama):
    method = DeepPrompt(DeepPromptConfig(num_virtual_tokens=4, init="random"), tiny_llama.spec)
    method.initialize(InitContext(tiny_llama.tokenizer, torch.Generator().manual_seed(0), "unused"))
    prompt = method.prompt.detach()
    assert not torch.equal(prompt[0], prompt[1]) and torch.isfinite(prompt).all()
