"""The RL-style discrete optimisers (RLPrompt, unsupervised prompt learning, directional stimulus) on tiny-llama:
reward functions against hand-computed values, seeded policies, state round trips, learning, budgets and artifacts.

(Same seed same result and kill/resume equality run for every registered optimiser in `test_discrete_loop.py`.)
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from prompttune import PromptTuneError
from prompttune.cli import main
from prompttune.config import TaskConfig
from prompttune.data.examples import load_examples
from prompttune.discrete.api import search
from prompttune.discrete.base import Candidate, example_key
from prompttune.discrete.directional_stimulus import DirectionalStimulus, DirectionalStimulusConfig
from prompttune.discrete.hints import input_words, pl_log_prob, pl_sample, tfidf_targets, without_word, word_features
from prompttune.discrete.loop import CHECKPOINT, SearchConfig, make_context
from prompttune.discrete.loop import search as run_loop
from prompttune.discrete.rl import gap, gap_reward, policy_backbone, vr_policy_gradient_weights, zscore
from prompttune.discrete.rlprompt import PromptPolicy, RLPrompt, RLPromptConfig, pg_loss, sql_loss
from prompttune.discrete.unsupervised import pseudo_label_loss, reliable_pseudo_labels
from prompttune.llm.base import BackendConfig
from prompttune.llm.hf import HFBackend

TEMPLATE = "Review: {text}\n{prompt}Sentiment:{answer}"
VERBALIZER = "0= negative,1= positive"
NAMES = ("rlprompt", "unsupervised", "directional_stimulus")
CHEAP = {
    "rlprompt": {"mlp_hidden": 32, "prompts_per_step": 4, "examples_per_step": 4, "eval_every": 2},
    "unsupervised": {"samples_per_step": 4, "examples_per_step": 4, "reliable_per_class": 2, "eval_every": 2},
    "directional_stimulus": {"pseudo_targets": "tfidf", "samples": 2, "examples_per_step": 4, "sft_steps": 10},
}


def llm(tiny_llama) -> HFBackend:
    return HFBackend(BackendConfig(model="tiny-llama", batch_size=8), backbone=tiny_llama)


def context(tiny_llama, sst_train, sst_dev, seed: int = 3):
    task = TaskConfig(template=TEMPLATE, verbalizer=VERBALIZER)
    return make_context(task, llm(tiny_llama), load_examples(sst_train), load_examples(sst_dev), seed=seed)


# ---- rewards, by hand ---------------------------------------------------------------------------------------------
def test_gap_reward_piecewise_by_hand():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    scores = probs.log() - 2.0  # label-word log-probs: any per-row constant is renormalised away
    gold = torch.tensor([0, 2])
    # ex 0: right, gap 0.6 - 0.3 = 0.3, x200; ex 1: wrong, gap 0.3 - 0.5 = -0.2, x180
    assert gap_reward(scores, gold).tolist() == pytest.approx([60.0, -36.0], abs=1e-4)
    assert gap_reward(scores, gold, correct_coeff=1.0, incorrect_coeff=0.5).tolist() == pytest.approx([0.3, -0.1])
    assert gap(scores, gold, "logprob").tolist() == pytest.approx([math.log(2.0), math.log(0.3 / 0.5)], abs=1e-5)
    batched = gap_reward(torch.stack([scores, scores.flip(-1)]), gold)  # (P=2, N=2)
    assert batched[0].tolist() == pytest.approx([60.0, -36.0], abs=1e-4)
    assert batched[1].tolist() == pytest.approx([200 * (0.1 - 0.6) * 0.9, 200 * (0.2 - 0.5) * 0.9], abs=1e-4)


def test_zscore_per_input_across_prompts():
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    assert zscore(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([-1 / std, 0.0, 1 / std], rel=1e-3)
    per_input = zscore(torch.tensor([[1.0, 10.0], [3.0, 10.0]]))  # columns = inputs, rows = prompts
    assert per_input[:, 0].tolist() == pytest.approx([-1.0, 1.0], rel=1e-3)
    assert per_input[:, 1].tolist() == [0.0, 0.0]  # every prompt earned the same: no signal, no blow-up


def test_variance_reduced_policy_gradient_weights():
    assert vr_policy_gradient_weights(torch.tensor([1.0, 2.0, 3.0, 6.0])).tolist() == pytest.approx(
        [-2 / 3, -1 / 3, 0.0, 1.0]
    )


def test_sql_loss_matches_a_step_by_step_reference():
    gen = torch.Generator().manual_seed(0)
    P, L, V = 3, 4, 6
    logits, target = torch.randn(P, L, V, generator=gen), torch.randn(P, L, V, generator=gen)
    actions, rewards = torch.randint(V, (P, L), generator=gen), torch.randn(P, generator=gen)
    total = 0.0
    for p in range(P):
        adv = [logits[p, s, actions[p, s]] - logits[p, s].logsumexp(0) for s in range(L)]  # A_s = Q_s - V_s
        v = [target[p, s].logsumexp(0) for s in range(L)]  # the target network's V'_s
        for t in range(L):
            single = adv[t] - ((v[t + 1] if t + 1 < L else rewards[p]) - v[t])
            multi = sum(adv[t:]) - (rewards[p] - v[t])
            total += (single**2 + multi**2) / 2
    assert float(sql_loss(logits, target, actions, rewards)) == pytest.approx(float(total) / P, rel=1e-5)


def test_pg_loss_raises_the_probability_of_rewarded_prompts():
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    actions = torch.tensor([[0, 1, 2], [3, 4, 0]])
    pg_loss(logits, actions, torch.tensor([1.0, -1.0]), entropy_coeff=0.0).backward()
    assert logits.grad[0, 0, 0] < 0 and logits.grad[1, 0, 3] > 0  # descent: up for +advantage, down for -


# ---- RLPrompt -----------------------------------------------------------------------------------------------------
def test_policy_sampling_is_seeded_and_avoids_special_tokens(tiny_llama):
    a = PromptPolicy(tiny_llama, 16, torch.Generator().manual_seed(0))
    b = PromptPolicy(tiny_llama, 16, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    ids, states = a.sample(6, 4, torch.Generator().manual_seed(7), top_k=50)
    again, _ = b.sample(6, 4, torch.Generator().manual_seed(7), top_k=50)
    other, _ = a.sample(6, 4, torch.Generator().manual_seed(8), top_k=50)
    assert ids.shape == (6, 4) and states.shape == (6, 4, tiny_llama.spec.hidden_size)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert not a.banned[ids].any()  # no special or invisible tokens, no half characters
    text = tiny_llama.tokenizer.decode(ids[0].tolist())
    assert text.strip() and "\ufffd" not in text
    greedy, _ = a.sample(2, 4, None)
    assert torch.equal(greedy[0], greedy[1])
    # the states are the frozen LM's: teacher forcing them reproduces the sampling logits
    assert torch.allclose(a.logits(states[:, 0]), a.logits(a.last_hidden(ids[:, :0].new_full((6, 1), a.source_id))))


def test_rlprompt_state_round_trip(tiny_llama, sst_train, sst_dev):
    ctx, objective = context(tiny_llama, sst_train, sst_dev)
    cfg = RLPromptConfig(**CHEAP["rlprompt"])
    opt = RLPrompt(cfg, ctx)
    for _ in range(3):
        opt.step(objective)
    state, tensors = json.loads(json.dumps(opt.state_dict())), opt.tensors()
    ctx2, objective2 = context(tiny_llama, sst_train, sst_dev)
    objective2.load_state_dict(json.loads(json.dumps(objective.state_dict())))
    copy = RLPrompt(cfg, ctx2)
    copy.load_state_dict(state)
    copy.load_tensors(tensors)
    assert copy.tensors().keys() == tensors.keys()
    assert all(torch.equal(copy.tensors()[k], v) for k, v in tensors.items())  # MLP, target MLP, Adam moments
    opt.step(objective), copy.step(objective2)  # the next steps of the original and of the restored copy agree
    assert opt.state_dict() == copy.state_dict() and len(opt.rewards) == 4
    assert all(torch.equal(copy.tensors()[k], v) for k, v in opt.tensors().items())


def test_policy_lm_other_than_the_task_model(tiny_llama, sst_train, sst_dev):
    with pytest.raises(PromptTuneError, match="policy_model"):
        policy_backbone(object(), None)  # a black-box backend offers no local LM: the user must name one
    ctx, objective = context(tiny_llama, sst_train, sst_dev)
    opt = RLPrompt(RLPromptConfig(**{**CHEAP["rlprompt"], "policy_model": "tiny-gpt2", "eval_every": 1}), ctx)
    offered = opt.step(objective)  # GPT-2-style policy tokens, decoded to text, scored by tiny-llama
    assert opt.policy.backbone.spec.name == "tiny-gpt2" and offered[0].candidate.text.endswith("\n")


@pytest.mark.parametrize("algorithm", ["sql", "pg"])
def test_rlprompt_reward_rises(algorithm, tiny_llama, sst_train, sst_dev, tmp_path):
    options = {"mlp_hidden": 32, "prompts_per_step": 8, "examples_per_step": 0, "top_k": 64, "lr": 3e-2}
    result = search(
        sst_train, sst_dev, None, optimizer="rlprompt", out=tmp_path, llm=llm(tiny_llama), template=TEMPLATE,
        verbalizer=VERBALIZER, budget=0, max_steps=30, seed=2, eval_every=10, algorithm=algorithm, **options,
    )  # fmt: skip
    assert result.steps == 30
    rewards = json.loads((tmp_path / CHECKPOINT).read_text())["optimizer"]["rewards"]
    assert sum(rewards[-10:]) / 10 > sum(rewards[:10]) / 10 + 2.0  # mean gap reward of the sampled prompts


# ---- every RL optimiser: budget, artifact, eval -------------------------------------------------------------------
def write_tsv(path, rows):
    path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    return path


@pytest.mark.parametrize("name", NAMES)
def test_search_respects_the_budget_and_eval_scores_the_artifact(
    name, tiny_llama, sst_train, sst_dev, tmp_path, capsys
):
    out = tmp_path / name
    backend = llm(tiny_llama)
    result = search(
        sst_train, sst_dev, sst_dev, optimizer=name, out=out, llm=backend, template=TEMPLATE, verbalizer=VERBALIZER,
        budget=120, select_top=2, seed=2, **CHEAP[name],
    )  # fmt: skip
    assert result.stopped in ("budget", "done") and result.calls <= 120 and backend.budget.calls <= 120
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["kind"] == "discrete" and manifest["method"] == name
    dev = write_tsv(tmp_path / "dev.tsv", sst_dev)
    assert main(["eval", str(out), "--data", str(dev), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(result.test["accuracy"])


# ---- unsupervised -------------------------------------------------------------------------------------------------
def test_reliable_pseudo_labels_by_hand():
    # views x examples x classes; example 2 disagrees across views, example 3 is below the confidence bar
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55], [0.7, 0.3]],
            [[0.8, 0.2], [0.1, 0.9], [0.4, 0.6], [0.4, 0.6], [0.9, 0.1]],
        ]
    )
    index, labels, conf = reliable_pseudo_labels(probs, per_class=1, min_confidence=0.6)
    assert index == [0, 1] and labels == [0, 1] and conf == pytest.approx([0.85, 0.85])
    index, labels, _ = reliable_pseudo_labels(probs, per_class=5, min_confidence=0.0)
    assert index == [0, 4, 1, 3] and labels == [0, 0, 1, 1]


def test_pseudo_label_loss_by_hand():
    logprobs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]]]).log()  # (P=1, N=2, C=2)
    loss = pseudo_label_loss(logprobs, torch.tensor([0, -1]), unlabelled_weight=0.5)
    assert loss.tolist() == pytest.approx([(-math.log(0.7) - 0.5 * math.log(0.6)) / 2])


def test_unsupervised_never_reads_gold_labels(tiny_llama, sst_train, tmp_path):
    task = TaskConfig(template=TEMPLATE, verbalizer=VERBALIZER)
    config = SearchConfig(optimizer="unsupervised", optimizer_config=CHEAP["unsupervised"], budget=0, max_steps=4)
    states = []
    for labelled in (True, False):
        rows = sst_train if labelled else [{"text": r["text"]} for r in sst_train]
        out = tmp_path / str(labelled)
        run_loop(config, task, llm(tiny_llama), load_examples(rows, require_label=labelled), out=out)
        states.append(json.loads((out / CHECKPOINT).read_text())["optimizer"])
    assert states[0] == states[1] and states[0]["demos"]
    prompt = json.loads((tmp_path / "False" / "prompt.json").read_text())
    assert prompt["demos"].count("Sentiment:") == 2 and set(prompt["extra"]["pseudo_labelled"].values()) <= {"0", "1"}


# ---- directional stimulus -----------------------------------------------------------------------------------------
def test_plackett_luce_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0]).log()  # probabilities 1/6, 2/6, 3/6
    assert float(pl_log_prob(scores, [2, 0])) == pytest.approx(math.log(3 / 6 * 1 / 3))
    assert pl_sample(scores, 2, None) == [2, 1]
    draws = [tuple(pl_sample(scores, 2, torch.Generator().manual_seed(s))) for s in range(300)]
    assert draws[:5] == [tuple(pl_sample(scores, 2, torch.Generator().manual_seed(s))) for s in range(5)]
    first = sum(d[0] == 2 for d in draws) / len(draws)
    assert abs(first - 0.5) < 0.1 and all(len(set(d)) == 2 for d in draws)


def test_words_tfidf_and_occlusion_helpers(tiny_llama):
    assert input_words("The film, the FILM and a great cast!", 10) == ["the", "film", "and", "a", "great", "cast"]
    assert tfidf_targets([["the", "great"], ["the", "bad"], ["the", "film"]], 1) == [[1], [1], [1]]
    ex = load_examples([{"text": "not good , not bad .", "label": "0"}])[0]
    assert without_word(ex, "text", "not").fields["text"] == "good , bad ."
    texts = ["a great movie .", "bad"]
    feats = word_features(tiny_llama, texts, 8)
    assert [f.shape[0] for f in feats] == [3, 1] and feats[0].shape[1] == tiny_llama.spec.hidden_size
    ids = tiny_llama.tokenizer("bad", add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    from prompttune.types import PromptInputs

    direct = tiny_llama(PromptInputs(tiny_llama.embed(inputs), torch.ones_like(inputs), pos, pos[:, :0], pos, pos))
    assert torch.allclose(feats[1][0], direct[0].mean(0), atol=1e-5)  # a word = mean of its tokens' states


def test_directional_stimulus_sft_fits_the_pseudo_hints(tiny_llama, sst_train, sst_dev):
    ctx, objective = context(tiny_llama, sst_train, sst_dev)
    cfg = DirectionalStimulusConfig(pseudo_targets="tfidf", sft_steps=150, sft_lr=3e-2, num_keywords=2)
    opt = DirectionalStimulus(cfg, ctx)
    offered = opt.step(objective)  # stage (a): pseudo-hints + SFT, then the SFT policy is offered
    assert opt.ready and [s.candidate for s in offered] == [Candidate("{hint}")]
    hits = 0
    for ex in objective.examples:
        key = example_key(ex)
        greedy = pl_sample(opt.scores(key), 2, None)
        hits += set(greedy) == set(opt.targets[key])
    assert hits >= len(objective.examples) - 1
    # the loop's candidate gets the policy's hints for any inputs, dev included, and the manual prompt gets none
    specialised = opt.specialize(Candidate("{hint}"), ctx.dev)
    assert all(h.startswith("Keywords: ") for _, h in specialised.hints) and len(specialised.hints) == len(ctx.dev)
    assert opt.specialize(Candidate(""), ctx.dev) == Candidate("")
