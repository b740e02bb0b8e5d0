"""EPT numerics pinned against a hand computation (explicit loops in float64): prompt fusion, the gating network and
the multi-space projection; the starting prompt; learning-rate groups; PEFT export; config errors."""

from __future__ import annotations

import math

import pytest
import torch

from prompttune import PromptTuneError
from prompttune.data.collate import collate
from prompttune.methods.base import InitContext
from prompttune.methods.ept import EPT, EPTConfig
from prompttune.types import PromptInputs, Row


def _method(backbone, seed=0, **kw):
    cfg = EPTConfig(**{"num_virtual_tokens": 3, "rank": 2, "num_spaces": 2, "space_rank": 2, **kw})
    method = EPT(cfg, backbone.spec)
    method.initialize(InitContext(backbone.tokenizer, torch.Generator().manual_seed(seed), " "))
    return method


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _by_hand(method):
    """The documented equations, one token and one subspace at a time."""
    P, A, B = (t.detach().double() for t in (method.prompt, method.lora_a, method.lora_b))
    U, V, W = (t.detach().double() for t in (method.space_down, method.space_up, method.gate))
    m, D = P.shape
    K = U.shape[0]
    L = torch.stack([sum(A[i, j] * B[j] for j in range(A.shape[1])) for i in range(m)])  # (m, D)
    fused, gates, out = [], [], []
    for i in range(m):
        scores = [float(P[i] @ L[j]) / math.sqrt(D) for j in range(m)]
        att = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        fused.append(P[i] + L[i] + sum(att[j] * L[j] for j in range(m)))
    for i in range(m):
        logits = [float(fused[i] @ W[:, k]) for k in range(K)]
        g = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
        gates.append(g)
        out.append(fused[i] + sum(g[k] * ((fused[i] @ U[k]) @ V[k]) for k in range(K)))
    return torch.stack(fused), torch.tensor(gates, dtype=torch.float64), torch.stack(out)


def test_fusion_gating_and_projection_match_the_equations(tiny_llama):
    method = _method(tiny_llama)
    _randomise(method, 1)
    fused, gates, expected = _by_hand(method)
    with torch.no_grad():
        got_fused = method.fused()
        got_gates = method.gates(got_fused)
        got = method.vectors()
    torch.testing.assert_close(got_fused.double(), fused, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_gates.double(), gates, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_gates.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got_gates, torch.full_like(got_gates, 0.5)), "random gate weights give unequal gates"


def test_apply_writes_the_prompt_into_the_soft_slots_only(tiny_llama):
    method = _method(tiny_llama)
    _randomise(method, 2)
    rows = [
        Row(ids=(11, 0, 0, 0, 12, 13), soft=(1, 2, 3), read=(5,)),
        Row(ids=(0, 0, 0, 14), soft=(0, 1, 2), read=(3,)),
    ]
    batch = collate(rows, tiny_llama.pad_id)
    inputs = PromptInputs(
        inputs_embeds=tiny_llama.embed(batch.input_ids),
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        soft_positions=batch.soft_positions,
        token_index=batch.token_index,
        read_positions=batch.read_positions,
    )
    original = inputs.inputs_embeds.clone()
    with torch.no_grad():
        out = method.apply(inputs).inputs_embeds  # (2, T, D)
        prompt = method.vectors()  # (3, D)
    assert torch.equal(inputs.inputs_embeds, original), "apply must not mutate its input"
    soft = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for b in range(2):
        soft[b, batch.soft_positions[b]] = True
        torch.testing.assert_close(out[b, batch.soft_positions[b]], prompt, rtol=0, atol=0)
    assert torch.equal(out[~soft], original[~soft])


def test_training_starts_from_the_short_prompt(tiny_llama):
    method = _method(tiny_llama, num_spaces=3)
    with torch.no_grad():
        vectors, gates = method.vectors(), method.gates(method.fused())
    assert torch.equal(vectors, method.prompt.detach()), "zero B, V and gate: no change at the start"
    torch.testing.assert_close(gates, torch.full((3, 3), 1 / 3))
    assert method.lora_a.abs().sum() > 0 and method.space_down.abs().sum() > 0  # the other factor is random
    assert torch.equal(_method(tiny_llama, num_spaces=3).lora_a, method.lora_a), "seeded"
    D = tiny_llama.spec.hidden_size
    assert method.num_trainable() == 3 * D + 3 * 2 + 2 * D + 3 * (D * 2 + 2 * D) + D * 3


def test_every_part_receives_gradient_once_the_zero_factors_move(tiny_llama):
    method = _method(tiny_llama)
    _randomise(method, 3)
    (method.vectors() ** 2).sum().backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_learning_rate_groups_and_peft_export(tiny_llama):
    method = _method(tiny_llama)
    groups = method.param_groups(0.01)
    assert [g["lr"] for g in groups] == [0.01, 0.01]
    assert groups[0]["params"] == [method.prompt]
    assert _method(tiny_llama, lowrank_lr=1e-3).param_groups(0.01)[1]["lr"] == 1e-3
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in method.parameters()}
    _randomise(method, 4)
    kind, tensor = method.peft_export()
    assert kind == "PROMPT_TUNING" and torch.equal(tensor, method.vectors().detach())


@pytest.mark.parametrize(
    "field,value", [("num_spaces", 0), ("space_rank", -1), ("rank", 0), ("lowrank_lr", 0.0), ("init", "zeros")]
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(PromptTuneError, match=field):
        EPTConfig(**{field: value})
