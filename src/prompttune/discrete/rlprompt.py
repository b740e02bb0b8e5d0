"""RLPrompt (Deng et al., 2022, "RLPrompt: Optimizing Discrete Text Prompts with Reinforcement Learning",
arXiv 2205.12548).

The policy is a frozen language model with a small trainable MLP between its final hidden state and its (frozen)
output embedding: `logits = lm_head(MLP(h_t))`. It writes `prompt_length` tokens after a fixed source token, each
sampled from those logits (top-256, as the reference code's classification runs). Every prompt is scored by the task
model on a class-balanced minibatch of training examples; the reward is the paper's piecewise gap reward (gold class
probability minus the best other class, x200 when right, x180 when wrong; `rl.gap_reward`), averaged over the
minibatch, z-score normalised across the prompts sampled for that input (the paper's reward stabilisation) and
scaled x5 (the paper's reward shaping for classification).

Learning rule (`algorithm`):
- `sql` (default, the paper's): on-policy soft Q-learning with sparse terminal reward. The policy logits are read
  as Q-values; the loss averages the single-step target `A_t = Q_t - V_t -> V'_{t+1} - V'_t` (terminal: `r - V'_T`)
  and the multi-step (path-consistency) target `sum_{t'>=t} A_t' -> r - V'_t`, where V' comes from a target copy of
  the MLP updated by Polyak averaging (rate 0.001).
- `pg`: REINFORCE with the z-scored reward as the advantage plus an entropy bonus; simpler, documented alternative.

Small-budget adaptation: the paper trains 12k steps of 16 prompts x 32 examples (~6M task-model calls); here the
whole run fits a budget of a few thousand calls, so the defaults use 8 prompts x 8 examples per step and a larger
learning rate (1e-2 over ~30-50 steps moves Adam about as far as 5e-5 over 12k steps). Each `eval_every` steps the
greedy prompt is scored on all training examples and offered to the loop (the paper picks its final prompt by
evaluating the greedy prompt on dev; the loop does that with the offered ones). The policy LM defaults to the task
model when it is a local transformers model (the paper: distilGPT-2); set `policy_model` otherwise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PromptTuneError
from ..registry import register_optimizer
from ..types import PromptInputs
from .base import Candidate, Objective, Scored, SearchContext
from .rl import (
    PolicyOptimizer,
    adam_tensors,
    balanced_minibatch,
    gap_reward,
    load_adam_tensors,
    policy_backbone,
    zscore,
)

_BANNED = -1e4  # logit of tokens the policy may not write (finite: keeps entropies and logsumexp NaN-free)


@dataclass
class RLPromptConfig:
    """RLPrompt: a policy network writes prompt tokens; trained by RL on the task model's verbalizer reward."""

    prompt_length: int = 5
    """Tokens per prompt (the paper: 5 for few-shot classification, 2 in its small-model table)."""
    policy_model: str | None = None
    """Frozen LM under the policy: None = the task model (hf backend); else an embedded name, `tiny-*`, HF id or
    path (needed for llama_cpp/openai backends)."""
    mlp_hidden: int = 2048
    """Hidden units of the trainable MLP (the paper: one hidden layer of 2048)."""
    prompts_per_step: int = 8
    """Prompts sampled per step (the paper: 16)."""
    examples_per_step: int = 8
    """Training examples each prompt is scored on per step, class-balanced (0 = all of them)."""
    algorithm: str = "sql"
    """`sql` (soft Q-learning, the paper's) or `pg` (REINFORCE with the z-scored reward as advantage)."""
    lr: float = 1e-2
    """Adam learning rate of the MLP (the paper: 5e-5 over 12k steps; a budget of a few dozen steps needs more)."""
    top_k: int = 256
    """Sample each token from the k most likely ones (0 = the whole vocabulary)."""
    correct_coeff: float = 200.0
    """Gap reward scale when the prediction is right (the paper's lambda_2)."""
    incorrect_coeff: float = 180.0
    """Gap reward scale when the prediction is wrong (the paper's lambda_1)."""
    reward_space: str = "prob"
    """Gap in class probabilities (`prob`, the paper) or class log-probabilities (`logprob`)."""
    zscore: str = "batch"
    """Reward stabilisation: `batch` (each prompt's mean reward on the minibatch, normalised across the sampled
    prompts: the reference implementation for classification), `example` (each example's rewards normalised across
    the prompts, then averaged) or `none`."""
    reward_scale: float = 5.0
    """Multiplies the normalised reward (the paper's shaping of [0, 1] to [0, 5])."""
    target_rate: float = 1e-3
    """sql: Polyak rate of the target network."""
    entropy_coeff: float = 0.01
    """pg: weight of the entropy bonus."""
    grad_clip: float = 5.0
    """Clip the MLP's gradient norm (0 = off)."""
    eval_every: int = 5
    """Every N steps, score the greedy prompt on all training examples and offer it for dev selection."""
    separator: str = "\n"
    """Appended after the generated tokens, so they do not run into the template text that follows."""

    def __post_init__(self) -> None:
        for name in ("prompt_length", "mlp_hidden", "eval_every"):
            value = getattr(self, name)
            if value < 1:
                raise PromptTuneError(f"config field {name!r}: expected a positive integer, got {value!r}")
        if self.prompts_per_step < 2:
            raise PromptTuneError(
                f"config field 'prompts_per_step': expected at least 2 (rewards are normalised "
                f"across prompts), got {self.prompts_per_step!r}"
            )
        choices = {
            "algorithm": ("sql", "pg"),
            "reward_space": ("prob", "logprob"),
            "zscore": ("batch", "example", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PromptTuneError(f"config field {name!r}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.examples_per_step < 0 or self.top_k < 0:
            raise PromptTuneError("config fields 'lr' (> 0), 'examples_per_step' and 'top_k' (>= 0) out of range")


class PromptPolicy(nn.Module):
    """Frozen LM + trainable MLP on its last hidden state, scored against the frozen output embedding.

    The backbone is not a submodule: `parameters()`/`state_dict()` hold only the MLP.
    """

    def __init__(self, backbone: Any, hidden: int, generator: torch.Generator):
        super().__init__()
        self.__dict__["backbone"] = backbone
        dim = backbone.spec.output_size
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        # The reference code starts from a near-zero MLP: logits ~ 0, i.e. a near-uniform policy over the vocabulary.
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(layer.weight, gain=1e-4, generator=generator)
            nn.init.constant_(layer.bias, -1e-4)
        self.to(backbone.device)
        tok = backbone.tokenizer
        self.source_id = int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        banned = torch.zeros(backbone.spec.vocab_size, dtype=torch.bool)
        for i in set(getattr(tok, "all_special_ids", []) or []):
            if i < len(banned):
                banned[i] = True
        for i in range(min(len(tok), len(banned))):  # tokens that write nothing visible, or half a character
            text = tok.decode([i])
            if not banned[i] and (not text.strip() or "\ufffd" in text):
                banned[i] = True
        banned[len(tok) :] = True  # padded embedding rows beyond the tokenizer
        self.register_buffer("banned", banned.to(backbone.device), persistent=False)

    @torch.no_grad()
    def last_hidden(self, ids: Tensor) -> Tensor:
        """ids (P, T) -> final hidden state of the last position (P, D); the frozen LM only."""
        P, T = ids.shape
        ids = ids.to(self.backbone.device)
        pos = torch.arange(T, device=ids.device).expand(P, T)  # (P, T)
        inputs = PromptInputs(
            self.backbone.embed(ids), torch.ones_like(ids), pos, ids.new_zeros(P, 0), pos, pos[:, -1:]
        )
        return self.backbone(inputs)[:, -1].float()  # (P, D)

    def logits(self, states: Tensor, mlp: nn.Module | None = None) -> Tensor:
        """states (..., D) -> next-token logits (..., V) of the policy (or of `mlp`, the target copy)."""
        out = self.backbone.lm_logits((mlp or self.mlp)(states)).float()  # (..., V)
        return out.masked_fill(self.banned, _BANNED)

    @torch.no_grad()
    def sample(self, n: int, length: int, generator: torch.Generator | None, top_k: int = 0) -> tuple[Tensor, Tensor]:
        """Write n prompts token by token (greedy when `generator` is None).

        Returns:
            ids (n, L) and the frozen LM's states before each token (n, L, D).
        """
        ids = torch.full((n, 1), self.source_id, dtype=torch.long)  # (n, 1)
        states = []
        for _ in range(length):
            h = self.last_hidden(ids)  # (n, D)
            logits = self.logits(h).cpu()  # (n, V)
            if generator is None:
                token = logits.argmax(-1)  # (n,)
            else:
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]  # (n, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (n,)
            states.append(h)
            ids = torch.cat([ids, token[:, None]], 1)
        return ids[:, 1:], torch.stack(states, 1)


def sql_loss(logits: Tensor, target_logits: Tensor, actions: Tensor, rewards: Tensor) -> Tensor:
    """On-policy soft Q-learning loss with a sparse terminal reward (single-step + multi-step, averaged).

    Args:
        logits: (P, L, V) policy logits, read as Q-values. target_logits: (P, L, V) from the target network.
        actions: (P, L) sampled tokens. rewards: (P,) shaped rewards.
    Returns:
        scalar: squared errors summed over the L steps, averaged over the P prompts.
    """
    q = logits.gather(-1, actions[..., None])[..., 0]  # (P, L)
    advantage = q - logits.logsumexp(-1)  # (P, L)
    v_target = target_logits.logsumexp(-1).detach()  # (P, L)
    r = rewards[:, None].detach()  # (P, 1)
    single = advantage - (torch.cat([v_target[:, 1:], r], 1) - v_target)  # (P, L)
    multi = advantage.flip(1).cumsum(1).flip(1) - (r - v_target)  # (P, L)
    return ((single.square() + multi.square()) / 2).sum(1).mean()


def pg_loss(logits: Tensor, actions: Tensor, advantages: Tensor, entropy_coeff: float) -> Tensor:
    """REINFORCE: -(advantage * log pi(prompt)) - entropy_coeff * entropy; logits (P, L, V), actions (P, L)."""
    logp = logits.log_softmax(-1)  # (P, L, V)
    chosen = logp.gather(-1, actions[..., None])[..., 0].sum(1)  # (P,)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return -(advantages.detach() * chosen).mean() - entropy_coeff * entropy


@register_optimizer("rlprompt")
class RLPrompt(PolicyOptimizer):
    config_cls = RLPromptConfig

    def __init__(self, config: RLPromptConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        backbone = policy_backbone(ctx.backend, config.policy_model)
        if backbone.kind != "causal_lm":
            raise PromptTuneError(f"config field 'policy_model': RLPrompt needs a causal LM, got {backbone.kind}")
        self.policy = PromptPolicy(backbone, config.mlp_hidden, torch.Generator().manual_seed(ctx.seed))
        self.target = copy.deepcopy(self.policy.mlp).requires_grad_(False)
        self.adam = torch.optim.Adam(self.policy.mlp.parameters(), lr=config.lr)
        self.steps = 0
        self.rewards: list[float] = []  # mean raw gap reward of each step's sampled prompts (diagnostics, tests)

    def text(self, ids: Tensor) -> str:
        return self.policy.backbone.tokenizer.decode(ids.tolist()) + self.config.separator

    def learn(self, objective: Objective) -> list[Scored]:
        cfg, step = self.config, self.steps
        examples = list(objective.examples)
        gold = [self.ctx.labels.index(str(ex.label)) if ex.label is not None else -1 for ex in examples]
        if min(gold) < 0:
            raise PromptTuneError("rlprompt: every training example needs a label (the reward compares classes)")
        batch = [examples[i] for i in balanced_minibatch(gold, cfg.examples_per_step, self.ctx.seed * 7_919 + step)]
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + step)  # a pure function of (seed, step)
        actions, states = self.policy.sample(cfg.prompts_per_step, cfg.prompt_length, gen, cfg.top_k)
        scored = objective.score([Candidate(self.text(a)) for a in actions], batch)  # may raise BudgetExhausted
        logprobs = torch.stack([s.logprobs for s in scored])  # (P, N, C)
        raw = gap_reward(logprobs, scored[0].gold, cfg.correct_coeff, cfg.incorrect_coeff, cfg.reward_space)  # (P, N)
        reward = self.stabilise(raw) * cfg.reward_scale  # (P,)
        self.update(states, actions, reward)
        self.steps += 1
        self.rewards.append(round(float(raw.mean()), 4))
        if self.steps % cfg.eval_every:
            return []
        greedy, _ = self.policy.sample(1, cfg.prompt_length, None)
        return objective.score([Candidate(self.text(greedy[0]))])

    def stabilise(self, raw: Tensor) -> Tensor:
        """(P, N) gap rewards -> (P,) per-prompt rewards, z-scored across the prompts."""
        if self.config.zscore == "batch":
            return zscore(raw.mean(1))
        if self.config.zscore == "example":
            return zscore(raw).mean(1)
        return raw.mean(1)

    def update(self, states: Tensor, actions: Tensor, reward: Tensor) -> None:
        cfg = self.config
        if cfg.algorithm == "sql":
            with torch.no_grad():  # Polyak step before the update, as the reference implementation
                for p_target, p in zip(self.target.parameters(), self.policy.mlp.parameters(), strict=True):
                    p_target.mul_(1 - cfg.target_rate).add_(p, alpha=cfg.target_rate)
        device = states.device
        logits = self.policy.logits(states)  # (P, L, V)
        actions, reward = actions.to(device), reward.to(device)
        if cfg.algorithm == "sql":
            with torch.no_grad():
                target_logits = self.policy.logits(states, self.target)  # (P, L, V)
            loss = sql_loss(logits, target_logits, actions, reward)
        else:
            loss = pg_loss(logits, actions, reward, cfg.entropy_coeff)
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.policy.mlp.parameters(), cfg.grad_clip)
        self.adam.step()

    # ---- checkpoint --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps, "rewards": list(self.rewards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps, self.rewards = int(state["steps"]), list(state["rewards"])

    def tensors(self) -> dict[str, Tensor]:
        out = {f"mlp.{k}": v for k, v in self.policy.mlp.state_dict().items()}
        out.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        out.update(adam_tensors(self.adam))
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.policy.mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        self.target.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("target.")})
        load_adam_tensors(self.adam, tensors)

    def export(self, best: Candidate) -> dict[str, Any]:
        return {"policy_steps": self.steps, "mean_gap_reward": self.rewards[-20:]}
