"""The per-layer seam (`PromptInputs.layer_hook`): on every tiny backbone the hook runs once per layer per forward,
leaves nothing behind, changes nothing when it returns its input, reaches KV-cache decoding steps, stays in its own
thread, and an edit at a soft slot of a causal LM changes only that slot and what follows it."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import prompt_inputs

from prompttune.backbones.base import layer_hooks
from prompttune.data.examples import load_examples
from prompttune.methods.base import SoftPromptMethod, write_slots
from prompttune.registry import METHODS, _ensure_loaded
from prompttune.types import PromptInputs, Row

_ensure_loaded()

BACKBONES = ("tiny-llama", "tiny-gpt2", "tiny-bert")
DECODERS = ("tiny-llama", "tiny-gpt2")
# Two rows of different lengths (the second is left-padded), each with two soft slots.
ROWS = [
    Row(ids=(40, 41, 42, 1, 1, 43, 44, 45), soft=(3, 4), read=(7,)),
    Row(ids=(50, 1, 1, 51, 52), soft=(1, 2), read=(4,)),
]


def _inputs(backbone, rows=ROWS, hook=None) -> PromptInputs:
    return prompt_inputs(backbone, rows, hook)


def _pre_hooks(backbone) -> int:
    return sum(len(layer._forward_pre_hooks) for layer in backbone.layers)


@pytest.mark.parametrize("name", BACKBONES)
def test_layers_are_found_by_shape(name, backbones):
    backbone = backbones[name]
    layers = backbone.layers
    assert len(layers) == backbone.spec.num_layers == 2
    assert len({type(layer) for layer in layers}) == 1
    assert all(layer in list(backbone.model.modules()) for layer in layers)


@pytest.mark.parametrize("name", BACKBONES)
def test_hook_runs_once_per_layer_and_identity_is_bit_identical(name, backbones):
    backbone = backbones[name]
    plain = backbone(_inputs(backbone))  # (B, T, D)
    calls = []

    def identity(layer, hidden, inputs):
        calls.append((layer, tuple(hidden.shape), inputs.soft_positions.tolist()))
        return hidden

    inputs = _inputs(backbone, hook=identity)
    hooked = backbone(inputs)
    B, T = inputs.attention_mask.shape
    D = backbone.spec.hidden_size
    assert calls == [(layer, (B, T, D), [[3, 4], [4, 5]]) for layer in range(backbone.spec.num_layers)]
    assert torch.equal(hooked, plain)
    assert _pre_hooks(backbone) == 0, "hooks must be removed after the call"
    calls.clear()
    assert torch.equal(backbone(_inputs(backbone)), plain)  # a later call without a hook sees nothing of it
    assert calls == []


@pytest.mark.parametrize("name", BACKBONES)
def test_hooks_are_removed_when_the_hook_raises(name, backbones):
    backbone = backbones[name]

    def broken(layer, hidden, inputs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        backbone(_inputs(backbone, hook=broken))
    assert _pre_hooks(backbone) == 0


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("layer", [0, 1])
def test_an_edit_at_a_soft_slot_changes_only_that_slot_and_what_follows(name, layer, backbones):
    backbone = backbones[name]
    plain = backbone(_inputs(backbone))  # (B, T, D)
    vector = torch.full((backbone.spec.hidden_size,), 0.7)

    def edit_first_slot(index, hidden, inputs):
        return write_slots(hidden, inputs.soft_positions[:, :1], vector) if index == layer else hidden

    edited = backbone(_inputs(backbone, hook=edit_first_slot))
    # Each row's first slot and first real column (the second row is left-padded by 3; pads are never read).
    for b, (first, start) in enumerate(((3, 0), (4, 3))):
        assert torch.equal(edited[b, start:first], plain[b, start:first]), "text before the slot must not change"
        assert not torch.allclose(edited[b, first:], plain[b, first:]), "the slot and what follows must change"
        assert (edited[b, first + 1 :] - plain[b, first + 1 :]).abs().amax(-1).min() > 0  # every later position


@pytest.mark.parametrize("name", DECODERS)
def test_hooks_reach_kv_cache_decoding_steps(name, backbones):
    backbone = backbones[name]
    seen = []

    def record(layer, hidden, inputs):
        seen.append((inputs.decoding, layer, hidden.shape[1]))
        return hidden

    def prepare(inputs):
        return inputs.replace(layer_hook=record)

    inputs = _inputs(backbone)
    T = inputs.attention_mask.shape[1]
    hooked = backbone.generate(inputs, prepare, max_new_tokens=3, stop_ids=[])
    assert backbone.generate(_inputs(backbone), lambda x: x, max_new_tokens=3, stop_ids=[]) == hooked
    layers = range(backbone.spec.num_layers)
    prefill, step = [(False, layer, T) for layer in layers], [(True, layer, 1) for layer in layers]
    steps = (len(seen) - len(prefill)) // len(step)
    assert steps >= 2 and seen == prefill + step * steps  # the prompt once, then every decoding step
    assert _pre_hooks(backbone) == 0


def test_hooks_act_only_in_the_thread_that_installed_them(tiny_llama):
    plain = tiny_llama(_inputs(tiny_llama))
    results = {}

    def other_thread():
        results["other"] = tiny_llama(_inputs(tiny_llama))

    with layer_hooks(tiny_llama.layers, lambda layer, hidden: hidden + 1.0):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        results["own"] = tiny_llama(_inputs(tiny_llama))
    assert torch.equal(results["other"], plain)
    assert not torch.allclose(results["own"], plain)
    assert _pre_hooks(tiny_llama) == 0


@pytest.mark.parametrize("name", BACKBONES)
def test_layer_inputs_are_the_states_each_layer_receives(name, backbones):
    backbone = backbones[name]
    ids = torch.tensor([40, 41, 42, 43])
    states = backbone.spec.layer_inputs(ids)  # (layers, 4, D)
    assert states.shape == (backbone.spec.num_layers, 4, backbone.spec.hidden_size)
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].clone()))
        for layer in backbone.layers
    ]
    try:
        pos = torch.arange(4)[None]
        backbone(
            PromptInputs(backbone.embed(ids[None]), torch.ones(1, 4, dtype=torch.long), pos, ids[None, :0], pos, pos)
        )
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(states, torch.stack(seen))
    if name == "tiny-llama":  # rotary positions: layer 0 receives the embeddings themselves
        assert torch.equal(states[0], backbone.embed(ids))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_uses_layer_hook_says_whether_apply_attaches_the_hook(method, backbones, make_model):
    cls = METHODS[method]
    backbone = backbones["tiny-llama" if "causal_lm" in cls.supports else "tiny-bert"]
    model = make_model(method, backbone)
    rows = [r for rs in model.encode(load_examples([{"text": "a good film .", "label": "1"}])) for r in rs]
    inputs = model.method.apply(model.inputs(model.make_batch(rows)))
    assert (inputs.layer_hook is not None) == cls.uses_layer_hook
    assert (cls.layer_hook is not SoftPromptMethod.layer_hook) == cls.uses_layer_hook
