"""Directional stimulus prompting (Li et al., 2023, "Guiding Large Language Models via Directional Stimulus
Prompting", arXiv 2302.11588), at CPU scale.

The paper trains a small policy LM (T5) to write an instance-specific hint -- keywords of the input -- that is added
to the black-box LLM's prompt: first supervised fine-tuning on pseudo-hints (keywords extracted by a fixed rule),
then reinforcement learning with the task reward and a KL penalty to the fine-tuned policy. Here the policy is a
keyword *selector*, which is what the paper's hint writer does on its keyword tasks without a decoder:

- features: each distinct word of the input gets the frozen LM's final hidden states averaged over its tokens (in
  context; the task model itself when it is local, else `policy_model`); a trainable MLP scores each word;
- policy: `num_keywords` words drawn without replacement from softmax(scores) (Plackett-Luce: an exact sample via
  the Gumbel top-k trick, with an exact log-probability); greedy = the top-scored words; the hint lists them in
  text order (`hint_template`) and replaces `{hint}` in `prompt_text`, which fills the template's `{prompt}`;
- (a) SFT: maximise the Plackett-Luce likelihood of pseudo-hints: the words whose removal most lowers the task
  model's gap between the gold class and the best other one (`occlusion`, paid in LLM calls), or the top TF-IDF
  words (`tfidf`, free); `auto` takes occlusion when it costs at most half the calls left;
- (b) RL: REINFORCE on minibatches with `samples` hints per example; reward = RLPrompt's gap reward scaled to
  [-0.9, 1] (`rl.gap_reward`, correct x1, wrong x0.9), baseline = the mean reward of the example's samples, plus
  `kl_coeff` x KL(policy || SFT policy) over each example's word distribution, as the paper's RL stage.

The greedy policy is scored on the training examples every `eval_every` RL steps (and once after SFT); the best so
far is the policy behind the offered candidate `prompt_text`, and `specialize` writes its hints for whatever the loop
scores (dev selection, test: inputs only, never labels). The artifact keeps that policy (`optimizer.safetensors`);
`specializer` rebuilds it to write hints for new inputs at prediction time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PromptTuneError
from ..registry import register_optimizer
from ..types import Example
from .base import Candidate, Objective, Scored, SearchContext, example_key
from .hints import HintWriter, kl_words, make_scorer, pl_log_prob, pl_sample, tfidf_targets, without_word
from .rl import PolicyOptimizer, adam_tensors, balanced_minibatch, gap, gap_reward, load_adam_tensors, policy_backbone


@dataclass
class DirectionalStimulusConfig:
    """Directional stimulus: a small keyword policy writes a per-input hint; SFT on pseudo-hints, then RL."""

    num_keywords: int = 3
    """Keywords per hint."""
    policy_model: str | None = None
    """Frozen LM whose hidden states describe the words: None = the task model (hf backend); else an embedded
    name, `tiny-*`, HF id or path."""
    field: str | None = None
    """Data column the keywords come from (default: the template's first field)."""
    max_words: int = 32
    """Distinct words of an input the policy considers (the first ones)."""
    prompt_text: str = "{hint}"
    """What fills `{prompt}`; must contain `{hint}`, which marks where the hint goes."""
    hint_template: str = "Keywords: {keywords}\n"
    """The hint; `{keywords}` becomes the chosen words, comma-separated, in text order."""
    pseudo_targets: str = "auto"
    """SFT targets: `occlusion` (words whose removal most lowers the gold class's margin; one LLM call per word),
    `tfidf` (highest TF-IDF words; no LLM calls) or `auto` (occlusion when it costs at most half the calls left)."""
    scorer_hidden: int = 64
    """Hidden units of the trainable word scorer."""
    sft_steps: int = 100
    """Full-batch Adam steps of supervised fine-tuning (CPU only, no LLM calls)."""
    sft_lr: float = 1e-2
    """Learning rate of the SFT stage."""
    lr: float = 3e-3
    """Learning rate of the RL stage."""
    samples: int = 4
    """Hints sampled per example and RL step (at least 2: the baseline is their mean reward)."""
    examples_per_step: int = 8
    """Training examples per RL step, class-balanced (0 = all)."""
    kl_coeff: float = 0.1
    """Weight of KL(policy || SFT policy) in the RL loss."""
    eval_every: int = 5
    """Every N RL steps, offer the greedy policy's hints for selection."""

    def __post_init__(self) -> None:
        for name in ("num_keywords", "max_words", "scorer_hidden", "eval_every"):
            value = getattr(self, name)
            if value < 1:
                raise PromptTuneError(f"config field {name!r}: expected a positive integer, got {value!r}")
        if self.samples < 2:
            raise PromptTuneError(f"config field 'samples': expected at least 2, got {self.samples!r}")
        if self.pseudo_targets not in ("auto", "occlusion", "tfidf"):
            raise PromptTuneError(
                f"config field 'pseudo_targets': expected auto, occlusion or tfidf, got {self.pseudo_targets!r}"
            )
        if "{hint}" not in self.prompt_text:
            raise PromptTuneError(f"config field 'prompt_text': needs {{hint}}, got {self.prompt_text!r}")
        if "{keywords}" not in self.hint_template:
            raise PromptTuneError(f"config field 'hint_template': needs {{keywords}}, got {self.hint_template!r}")
        if min(self.sft_steps, self.examples_per_step) < 0 or min(self.lr, self.sft_lr) <= 0 or self.kl_coeff < 0:
            raise PromptTuneError(
                "config fields 'sft_steps', 'examples_per_step', 'kl_coeff' (>= 0), 'lr', 'sft_lr' (> 0)"
            )


@register_optimizer("directional_stimulus")
class DirectionalStimulus(PolicyOptimizer):
    config_cls = DirectionalStimulusConfig

    def __init__(self, config: DirectionalStimulusConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        self.backbone = policy_backbone(ctx.backend, config.policy_model)
        self.column = config.field or ctx.template.fields[0]
        gen = torch.Generator().manual_seed(ctx.seed)
        dim = self.backbone.spec.output_size
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global RNG: seed it, leave it as it was
            torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
            self.scorer = make_scorer(dim, config.scorer_hidden)
        self.reference = copy.deepcopy(self.scorer).requires_grad_(False)  # the SFT policy (RL's KL anchor)
        self.best_scorer = copy.deepcopy(self.scorer).requires_grad_(False)  # the best greedy policy on train so far
        self.best: list[float] | None = None  # its (score, loglik)
        self.adam = torch.optim.Adam(self.scorer.parameters(), lr=config.lr)
        self.writer = HintWriter(self.backbone, self.column, config)
        self.targets: dict[str, list[int]] = {}  # example key -> pseudo-hint (word indices, most important first)
        self.rule = ""  # the pseudo-hint rule used (auto resolves to occlusion or tfidf)
        self.steps = 0  # RL steps
        self.ready = False  # pseudo-hints + SFT done
        self.rewards: list[float] = []

    # ---- hints ---------------------------------------------------------------------------------------------------
    def scores(self, key: str, scorer: nn.Module | None = None) -> Tensor:
        return self.writer.scores(key, scorer or self.scorer)  # (W,)

    def specialize(self, candidate: Candidate, examples: Sequence[Example]) -> Candidate:
        """The best policy so far writes the hints of `Candidate(prompt_text)` for whatever the loop scores."""
        return self.writer.specialize(candidate, examples, self.best_scorer)

    def offer(self, objective: Objective) -> list[Scored]:
        """Score the current greedy policy on the training examples; when it beats the best so far it becomes the
        policy behind `Candidate(prompt_text)` (so the loop's history entry for it stays that policy's score)."""
        examples = list(objective.examples)
        shared = Candidate(self.config.prompt_text)
        scored = objective.score([shared.specialized(hints=self.writer.hints(examples, self.scorer))], examples)[0]
        if self.best is not None and (scored.score, scored.loglik) <= tuple(self.best):
            return []
        self.best = [scored.score, scored.loglik]
        self.best_scorer.load_state_dict(self.scorer.state_dict())
        return [replace(scored, candidate=shared)]

    # ---- the step ------------------------------------------------------------------------------------------------
    def learn(self, objective: Objective) -> list[Scored]:
        examples = list(objective.examples)
        if any(ex.label is None for ex in examples):
            raise PromptTuneError(
                "directional_stimulus: every training example needs a label (pseudo-hints and "
                "rewards compare the gold class with the others)"
            )
        if not self.ready:
            return self.supervised(objective)
        cfg, step = self.config, self.steps
        gold = [self.ctx.label_of(ex) for ex in examples]
        batch = [examples[i] for i in balanced_minibatch(gold, cfg.examples_per_step, self.ctx.seed * 7_919 + step)]
        self.writer.featurise(batch)
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + step)
        keys = [example_key(ex) for ex in batch]
        with torch.no_grad():
            orders = [{k: pl_sample(self.scores(k), cfg.num_keywords, gen) for k in keys} for _ in range(cfg.samples)]
        shared = Candidate(cfg.prompt_text)
        scored = objective.score(
            [shared.specialized(hints=self.writer.hints(batch, self.scorer, o)) for o in orders], batch
        )
        logprobs = torch.stack([s.logprobs for s in scored])  # (S, N, C)
        reward = gap_reward(logprobs, scored[0].gold, 1.0, 0.9)  # (S, N)
        advantage = reward - reward.mean(0, keepdim=True)  # (S, N): per-input baseline
        scores = {k: self.scores(k) for k in keys}  # with gradients
        logp = torch.stack([torch.stack([pl_log_prob(scores[k], o[k]) for k in keys]) for o in orders])  # (S, N)
        kl = torch.stack([kl_words(scores[k], self.scores(k, self.reference)) for k in keys]).mean()
        loss = -(advantage * logp).mean() + cfg.kl_coeff * kl
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        self.adam.step()
        self.steps += 1
        self.rewards.append(round(float(reward.mean()), 5))
        return self.offer(objective) if self.steps % cfg.eval_every == 0 else []

    def supervised(self, objective: Objective) -> list[Scored]:
        """Stage (a): pseudo-hints, then SFT of the scorer on them; offers the SFT policy."""
        examples = list(objective.examples)
        self.writer.featurise(examples)
        if not self.targets:
            self.targets = self.pseudo_hints(objective, examples)
        cfg = self.config
        sft = torch.optim.Adam(self.scorer.parameters(), lr=cfg.sft_lr)
        keyed = [(example_key(ex), self.targets[example_key(ex)]) for ex in examples if self.targets[example_key(ex)]]
        for _ in range(cfg.sft_steps if keyed else 0):
            loss = -torch.stack([pl_log_prob(self.scores(k), order) for k, order in keyed]).mean()
            sft.zero_grad(set_to_none=True)
            loss.backward()
            sft.step()
        self.reference.load_state_dict(self.scorer.state_dict())
        self.ready = True
        return self.offer(objective)

    def pseudo_hints(self, objective: Objective, examples: list[Example]) -> dict[str, list[int]]:
        """Per example, the indices of its `num_keywords` pseudo-hint words, most important first."""
        k = self.config.num_keywords
        keys = [example_key(ex) for ex in examples]
        rows, owners = [], []
        for ex, key in zip(examples, keys, strict=True):
            rows.append(ex)
            owners.append((key, -1))
            for i, word in enumerate(self.writer.features[key][0]):
                rows.append(without_word(ex, self.column, word))
                owners.append((key, i))
        left = objective.budget.remaining_calls()
        rule = self.config.pseudo_targets
        if rule == "auto":
            rule = "occlusion" if left is None or len(rows) <= left // 2 else "tfidf"
        self.rule = rule
        if rule == "tfidf":
            found = tfidf_targets([self.writer.features[key][0] for key in keys], k)
            return dict(zip(keys, found, strict=True))
        base = Candidate(self.config.prompt_text.replace("{hint}", ""))
        scored = objective.score([base], rows)[0]
        margin = gap(scored.logprobs, scored.gold, "logprob").tolist()  # (R,)
        full = {key: m for (key, i), m in zip(owners, margin, strict=True) if i < 0}
        drop: dict[str, list[tuple[float, int]]] = {key: [] for key in keys}
        for (key, i), m in zip(owners, margin, strict=True):
            if i >= 0:
                drop[key].append((full[key] - m, i))  # how much the gold class loses without the word
        return {key: [i for _, i in sorted(drop[key], key=lambda d: (-d[0], d[1]))[:k]] for key in keys}

    # ---- checkpoint and artifact -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        base = super().state_dict()
        extra = {
            "steps": self.steps,
            "ready": self.ready,
            "targets": self.targets,
            "best": self.best,
            "rule": self.rule,
        }
        return {**base, **extra, "rewards": self.rewards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps, self.ready, self.rewards = int(state["steps"]), bool(state["ready"]), list(state["rewards"])
        self.best, self.rule = state["best"], state["rule"]
        self.targets = {k: [int(i) for i in v] for k, v in state["targets"].items()}

    def tensors(self) -> dict[str, Tensor]:
        out = {f"scorer.{k}": v for k, v in self.scorer.state_dict().items()}
        out.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        out.update({f"best.{k}": v for k, v in self.best_scorer.state_dict().items()})
        return {**out, **adam_tensors(self.adam)}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.scorer.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")})
        self.reference.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("reference.")})
        self.best_scorer.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
        load_adam_tensors(self.adam, tensors)

    def export(self, best: Candidate) -> dict[str, Any]:
        policy = {**asdict(self.config), "field": self.column, "hidden_size": self.backbone.spec.hidden_size}
        return {"hint_policy": policy, "pseudo_hints": self.rule, "rl_steps": self.steps, "rewards": self.rewards[-20:]}

    def export_tensors(self, best: Candidate) -> dict[str, Tensor]:
        return {f"scorer.{k}": v for k, v in self.best_scorer.state_dict().items()}

    @classmethod
    def specializer(
        cls, extra: dict[str, Any], backend: Any, artifact_dir: str
    ) -> Callable[[Candidate, Sequence[Example]], Candidate] | None:
        """Greedy hints of the saved policy for new inputs (what `prompttune eval`/`predict` use)."""
        from safetensors.torch import load_file

        saved = dict(extra.get("hint_policy") or {})
        path = Path(artifact_dir) / "optimizer.safetensors"
        if not saved or not path.is_file():
            raise PromptTuneError(
                f"{artifact_dir}: a directional_stimulus artifact needs prompt.json 'extra.hint_policy' and "
                "optimizer.safetensors"
            )
        dim = saved.pop("hidden_size")
        cfg = DirectionalStimulusConfig(**saved)
        backbone = policy_backbone(backend, cfg.policy_model)
        if backbone.spec.hidden_size != dim:
            raise PromptTuneError(
                f"{path}: the hint policy reads {dim}-d features, {backbone.spec.name!r} gives "
                f"{backbone.spec.hidden_size}; use the policy_model it was trained with"
            )
        scorer = make_scorer(dim, cfg.scorer_hidden)
        scorer.load_state_dict({k[7:]: v for k, v in load_file(str(path)).items() if k.startswith("scorer.")})

        writer = HintWriter(backbone, cfg.field, cfg)
        return lambda candidate, examples: writer.specialize(candidate, examples, scorer)
