"""A local transformers model as a text-in/text-out backend (white box: exact label-word log-probs).

Scoring reuses the soft-prompt path unchanged: the prompt text becomes an example of the template `{text}{answer}`,
the manual method adds nothing, and the verbalizer head scores every token of multi-token words (one row per word,
teacher-forced), reading logits only at the answer positions. So a discrete prompt scored here gives exactly the
number `prompttune eval` gives for the same text with the soft machinery.
"""

from __future__ import annotations

import inspect
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..backbones.causal_lm import _returned_cache
from ..data.collate import collate
from ..data.templates import Prompt, Template, special_affixes
from ..heads.verbalizer import VerbalizerHead
from ..methods.manual import Manual, ManualConfig
from ..model import PromptModel
from .base import BackendConfig, Budget, LLMBackend

_RAW = Template("{text}{answer}")  # the backend receives finished prompt texts


class HFBackend(LLMBackend):
    """Args:
    config: `config.model` is an embedded name, `tiny-*`, HF id or local path (see `prompttune models`).
    backbone: an already loaded `Backbone` to reuse (tests, the API sharing one model).
    """

    kind = "hf"

    def __init__(self, config: BackendConfig, budget: Budget | None = None, backbone: Any = None, device: str = "cpu"):
        super().__init__(config, budget)
        if backbone is None:
            from ..backbones.base import load_backbone

            backbone = load_backbone(config.model, device)
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self._models: dict[tuple[str, ...], PromptModel] = {}
        self._prefixes: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()  # most recently used last
        # transformers >= 5.2x renamed `past_key_values` to `cache`; accept both spellings.
        params = inspect.signature(backbone.model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"

    def _model(self, words: Sequence[str]) -> PromptModel:
        key = tuple(words)
        if key not in self._models:
            labels = [str(i) for i in range(len(words))]
            head = VerbalizerHead(labels, "causal_lm", {str(i): [w] for i, w in enumerate(words)}, self.tokenizer)
            method = Manual(ManualConfig(), self.backbone.spec)
            self._models[key] = PromptModel(self.backbone, method, head, _RAW).to(self.backbone.device)
        return self._models[key]

    def _label_logprobs(self, prompts: list[str], words: list[str], prefixes: list[str]) -> Tensor:
        model = self._model(words)
        longest = max(len(ids) for _, ids in model.head.options)
        prompts = [self._fit(p, self.backbone.spec.max_positions - longest) for p in prompts]
        head, _ = special_affixes(self.tokenizer)
        encoded = [tuple(head) + tuple(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        # Reuse a beginning only when this call holds it at least twice (several candidates on one example): a
        # lone prompt is cheaper in a plain batch, and the choice never depends on what earlier calls cached, so a
        # resumed search takes exactly the uninterrupted one's path.
        uses = Counter(prefixes)
        starts = [self._shared(ids, pre) if uses[pre] > 1 else 0 for ids, pre in zip(encoded, prefixes, strict=True)]
        scores = torch.zeros(len(prompts), len(words))
        # Batches of similar length, prompts with a reusable beginning apart from those without (a batch either
        # continues cached keys/values or runs whole prompts).
        order = sorted(range(len(prompts)), key=lambda i: (starts[i] == 0, -(len(encoded[i]) - starts[i])))
        groups = [[i for i in order if starts[i]], [i for i in order if not starts[i]]]
        size = self.config.batch_size
        chunks = [g[at : at + size] for g in groups for at in range(0, len(g), size)]
        with torch.no_grad():
            for idx in chunks:
                rows = [r for j, i in enumerate(idx) for r in model.head.rows(Prompt(encoded[i], ()), j)]
                past = None
                if starts[idx[0]]:  # a batch of prompts whose beginnings' keys/values are reused
                    past = [self._prefix(encoded[i][: starts[i]]) for i in (idx[r.example] for r in rows)]
                batch = collate(rows, self.backbone.pad_id, past)
                scores[idx] = model(batch, len(idx)).float().cpu()  # (n, W): log P(word | prompt)
        self._charged(len(prompts), sum(len(ids) for ids in encoded), "score")
        return scores

    def _shared(self, ids: tuple[int, ...], prefix: str) -> int:
        """How many leading tokens of `ids` are the prefix text's own tokens (0: no reusable beginning)."""
        if not prefix or not self.config.prefix_cache or not self.backbone.supports_prefix_cache:
            return 0
        head, _ = special_affixes(self.tokenizer)
        own = tuple(head) + tuple(self.tokenizer(prefix, add_special_tokens=False)["input_ids"])
        # Tokenised alone, the prefix must give the prompt's first tokens exactly (BPE may merge across the cut).
        ok = len(own) >= 2 and len(own) < len(ids) and ids[: len(own)] == own
        return len(own) if ok else 0

    def _prefix(self, ids: tuple[int, ...]) -> Tensor:
        """Frozen keys/values of a prompt beginning (LRU). One prefix per call, so a value never depends on which
        other prompts were computed with it, and a resumed search sees exactly the uninterrupted one's numbers."""
        kv = self._prefixes.pop(ids, None)
        if kv is None:
            kv = self.backbone.encode_prefixes([list(ids)])[0]  # (layers, 2, kvh, L, hd)
        self._prefixes[ids] = kv
        while len(self._prefixes) > self.config.prefix_cache:
            self._prefixes.popitem(last=False)
        return kv

    def _fit(self, prompt: str, limit: int) -> str:
        """Drop text from the front of a prompt longer than the context (earliest demonstrations first), as a
        sliding-window LLM server would, instead of failing the whole search on one long candidate."""
        head, _ = special_affixes(self.tokenizer)
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        excess = len(head) + len(enc["input_ids"]) - limit
        if excess <= 0:
            return prompt
        return prompt[enc["offset_mapping"][excess][0] :]

    @torch.no_grad()
    def _generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, chat: bool
    ) -> list[str]:
        out = []
        eos = self.tokenizer.eos_token_id
        tokens = 0
        for i, prompt in enumerate(prompts):
            text = self._chat(prompt) if chat else prompt
            head, _ = special_affixes(self.tokenizer)
            ids = list(head) + self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids[-(self.backbone.spec.max_positions - max_new_tokens) :]
            x = torch.tensor([ids], device=self.backbone.device)  # (1, T)
            # One prompt at a time and a generator seeded per prompt: a text never depends on its batch neighbours.
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            new: list[int] = []
            past = None
            for _ in range(max_new_tokens):
                model_out = self.backbone.model(
                    input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_key: past}
                )
                past = _returned_cache(model_out)
                logits = model_out.logits[0, -1].float()  # (V,)
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1).cpu()
                    token = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    token = int(logits.argmax())
                if token == eos:
                    break
                new.append(token)
                x = torch.tensor([[token]], device=self.backbone.device)  # (1, 1)
            tokens += len(ids) + len(new)
            out.append(self.tokenizer.decode(new, skip_special_tokens=True))
        self._charged(len(prompts), tokens, "generate")
        return out

    def _chat(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def pieces(self, text: str) -> list[str]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode([i]) for i in ids]

    def vocabulary(self) -> list[str]:
        vocab = getattr(self, "_vocab", None)
        if vocab is None:
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            size = len(self.tokenizer)
            pieces = (self.tokenizer.decode([i]) for i in range(size) if i not in special)
            # Byte fragments decode to U+FFFD and control pieces are unprintable: neither is a usable prompt piece.
            vocab = [p for p in pieces if p.strip() and p.isprintable() and "\ufffd" not in p]
            self._vocab = vocab
        return vocab
