"""The Hugging Face PEFT baseline: `PromptTuningConfig` used the way a PEFT user would use it.

Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv 2104.08691)
through `peft.get_peft_model` on a fresh copy of the same HF model, with everything else held equal to our
`prompt_tuning` cells: the same template text (PEFT puts the soft tokens in front of everything, so the template is
rendered without its `{soft}` marker), the same label words, init text, steps, batch size, learning rate, warm-up
and decay (`prompttune.train.schedule`), data order (`prompttune.train.batch_indices`), gradient clipping and model
selection on dev every `eval_every` steps (the initial prompt is a candidate too, as in `prompttune.train.fit`).

What differs is only what PEFT does: tokenizer left padding of each batch, the soft prompt in front of the pads
(PEFT defect 1 in BASELINES.md), the standard forward returning full `(B, N + T, V)` logits, and no calibration.
The loss is cross-entropy over the label words' log-probabilities at the last position.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prompttune import zoo
from prompttune.config import TrainConfig
from prompttune.data.templates import Template
from prompttune.evaluation import metrics
from prompttune.train import batch_indices, schedule
from prompttune.types import Example


def render(template: Template, example: Example) -> str:
    """Our template as plain text, without soft slots: `"Review: <text>\\nSentiment:"`."""
    return "".join(template.render_chunks(example))


def label_token_ids(tokenizer: Any, verbalizer: dict[str, list[str]]) -> list[int]:
    """One token id per label (PEFT users read the next-token logits, so every label word must be one token).

    Raises:
        ValueError: a label word that is not exactly one token.
    """
    ids = []
    for label, words in verbalizer.items():
        tokens = tokenizer(words[0], add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label {label!r}: word {words[0]!r} is {len(tokens)} tokens; the baseline needs one")
        ids.append(tokens[0])
    return ids


class PeftPromptTuning:
    """A PEFT prompt-tuning model plus the pieces to score texts with it.

    Args:
        model_name: prompttune model name (resolved by `prompttune.zoo`, loaded fresh).
        template: our template string; rendered without its `{soft}` marker.
        verbalizer: label -> words (only the first word of each label is used).
        num_virtual_tokens: soft tokens PEFT puts in front.
        init_text: `prompt_tuning_init_text` (the same text our `init=text` uses).
    """

    def __init__(
        self, model_name: str, template: str, verbalizer: dict[str, list[str]], num_virtual_tokens: int, init_text: str
    ):
        from peft import PromptTuningConfig, get_peft_model

        # PEFT 0.21 asks transformers 5 a deprecated question on every wrap; the warning is PEFT's, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model, tokenizer, ref = zoo.load(model_name)
        tokenizer.padding_side = "left"  # what PEFT's docs and users do for decoder-only classification
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=init_text,
            tokenizer_name_or_path=ref.path,  # the local HF directory: nothing reaches for the hub
        )
        self.model = get_peft_model(model, config)
        self.tokenizer = tokenizer
        self.template = Template(template)
        self.labels = list(verbalizer)
        self.word_ids = torch.tensor(label_token_ids(tokenizer, verbalizer))  # (C,)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def scores(self, examples: Sequence[Example]) -> Tensor:
        """Label-word log-probabilities (B, C) at the last position of PEFT's standard forward."""
        texts = [render(self.template, ex) for ex in examples]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, N+T, V)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)
        return logp[:, self.word_ids]  # (B, C)

    @torch.no_grad()
    def predict_scores(self, examples: Sequence[Example], batch_size: int) -> Tensor:
        """Scores (N, C) in input order; batches of similar length (less padding, which only helps PEFT)."""
        self.model.eval()
        order = sorted(range(len(examples)), key=lambda i: -len(render(self.template, examples[i])))
        out = torch.zeros(len(examples), len(self.labels))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.scores([examples[i] for i in idx])
        return out

    def metrics(self, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        scores = self.predict_scores(examples, batch_size)
        pred = [self.labels[i] for i in scores.argmax(-1).tolist()]
        gold = [ex.label for ex in examples]
        return {"accuracy": metrics.accuracy(gold, pred), "macro_f1": metrics.macro_f1(gold, pred, self.labels)}


def fit(
    peft: PeftPromptTuning, train: Sequence[Example], dev: Sequence[Example] | None, cfg: TrainConfig
) -> dict[str, Any]:
    """Train with the same schedule, data order and model selection as `prompttune.train.fit`.

    Returns:
        `best_step`, `best_dev` (metrics, None without dev), `steps`, `seconds`, `seconds_per_step` (training
        steps only, evaluation excluded, as in `FitResult`) and `step_seconds` (each step's time).
    """
    torch.manual_seed(cfg.seed)
    params = peft.trainable()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
    targets = torch.tensor([peft.labels.index(ex.label) for ex in train])  # (N,)
    dev_metrics = peft.metrics(dev, cfg.eval_batch_size) if dev else None  # the initial prompt is a candidate
    best = {"step": 0, "dev": dev_metrics, "state": [p.detach().clone() for p in params]}
    step_seconds: list[float] = []
    for step in range(cfg.max_steps):
        peft.model.train()
        tic = time.perf_counter()
        idx = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        loss = F.cross_entropy(peft.scores([train[i] for i in idx]), targets[idx])
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tic)
        steps = step + 1
        if dev and (steps % cfg.eval_every == 0 or steps == cfg.max_steps):
            dev_metrics = peft.metrics(dev, cfg.eval_batch_size)
            if dev_metrics["accuracy"] > best["dev"]["accuracy"]:
                best = {"step": steps, "dev": dev_metrics, "state": [p.detach().clone() for p in params]}
    if dev:
        with torch.no_grad():
            for p, saved in zip(params, best["state"], strict=True):
                p.copy_(saved)
    return {
        "best_step": best["step"] if dev else len(step_seconds),
        "best_dev": best["dev"],
        "steps": len(step_seconds),
        "seconds": sum(step_seconds),
        "seconds_per_step": sum(step_seconds) / max(1, len(step_seconds)),
        "step_seconds": step_seconds,
    }
