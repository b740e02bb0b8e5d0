"""A GGUF model through llama-cpp-python (optional extra `prompttune[llama]`): the fast CPU backend.

SmolLM2-135M prefills ~400 tok/s here against ~23 tok/s for transformers (MODELS.md). Label words are scored
exactly: the prompt is evaluated once, the first token of every word is read from its last position, and the other
tokens of multi-token words are teacher-forced after it (reusing the prompt's keys/values). Each prompt starts from
an empty context, so its scores never depend on the prompt scored before it.

Trap (MODELS.md): `Llama.scores` holds logits only when the model is opened with `logits_all=True`; without it the
rows read back as zeros and every word gets the same log-prob. The backend always sets it and checks the row.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import PromptTuneError
from .base import BackendConfig, BackendError, Budget, LLMBackend

INSTALL = (
    "backend llama_cpp needs llama-cpp-python, a source-only package that compiles for ~10 minutes: "
    "pip install 'prompttune[llama]' (or reuse a built wheel: pip install --find-links ~/.cache/prompttune/wheels "
    "llama-cpp-python)"
)


def gguf_path(model: str) -> Path:
    """A .gguf file, or the GGUF inside an embedded model's package."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PromptTuneError(f"{path}: no such .gguf file")
        return path
    from .. import zoo

    return zoo.gguf_file(model)


class LlamaCppBackend(LLMBackend):
    """Args:
    config: `config.model` is a .gguf path or an embedded GGUF model name (e.g. `smollm2-135m`).
    llama: an already opened `llama_cpp.Llama` (must have been created with `logits_all=True`).
    """

    kind = "llama_cpp"

    def __init__(self, config: BackendConfig, budget: Budget | None = None, llama: Any = None):
        super().__init__(config, budget)
        if llama is None:
            # llama.cpp's OpenMP workers spin-wait by default; on a CPU shared with other processes (torch's own
            # threads included) each multi-token evaluation then stalled ~8 s here. Passive waiting must be set
            # before the OpenMP runtime loads with the library.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                import llama_cpp
            except ImportError:
                raise PromptTuneError(INSTALL) from None
            llama = llama_cpp.Llama(
                model_path=str(gguf_path(config.model)),
                n_ctx=config.n_ctx,
                logits_all=True,
                n_threads=config.threads or None,
                seed=0,
                verbose=False,
            )
        self.llm = llama
        self._lock = threading.Lock()  # one llama.cpp context: calls must not interleave

    # ---- scoring ----------------------------------------------------------------------------------------------------
    def _label_logprobs(self, prompts: list[str], words: list[str], prefixes: list[str]) -> Tensor:
        with self._lock:
            word_ids = [self._tokenize(w, bos=False) for w in words]
            for w, ids in zip(words, word_ids, strict=True):
                if not ids:
                    raise PromptTuneError(f"verbalizer: word {w!r} tokenises to nothing")
            rows, tokens = [], 0
            for prompt in prompts:
                ids = self._tokenize(prompt, bos=True)
                excess = len(ids) + max(len(w) for w in word_ids) - self.config.n_ctx
                if excess > 0:  # drop the earliest tokens (after BOS), as a sliding-window server would
                    bos = 1 if ids and ids[0] == self.llm.token_bos() else 0
                    ids = ids[:bos] + ids[bos + excess :]
                rows.append(self._score(ids, word_ids))
                tokens += len(ids)
        self._charged(len(prompts), tokens, "score")
        return torch.tensor(rows, dtype=torch.float32)  # (N, W)

    def _score(self, ids: list[int], word_ids: list[list[int]]) -> list[float]:
        # Every prompt starts from an empty context: llama.cpp's numbers depend on how a sequence was split into
        # evaluation batches (measured: up to 0.2 in log-prob when a previous prompt's beginning is reused), and a
        # score must not depend on which prompt came before it (same seed, same result; exact resume).
        self.llm.reset()
        self._eval(ids)
        first = self._logprobs(len(ids) - 1)  # (V,)
        out = []
        for w in word_ids:
            total = float(first[w[0]])
            if len(w) > 1:  # teacher-force the word's other tokens after the prompt
                self._eval(ids + w[:-1])
                for j in range(1, len(w)):
                    total += float(self._logprobs(len(ids) - 1 + j)[w[j]])
            out.append(total)
        return out

    def _eval(self, ids: list[int]) -> None:
        """Make the context hold exactly `ids`, evaluating only what differs from what it holds now (within one
        prompt: the word tokens teacher-forced after it)."""
        llm = self.llm
        held = list(llm.input_ids[: llm.n_tokens])
        keep = 0
        limit = min(len(held), len(ids) - 1)  # re-evaluate at least the last token: its logits row is read
        while keep < limit and held[keep] == ids[keep]:
            keep += 1
        llm.n_tokens = keep  # `eval` drops the KV cache beyond n_tokens before appending
        llm.eval(ids[keep:])

    def _logprobs(self, position: int) -> np.ndarray:
        row = np.asarray(self.llm.scores[position], dtype=np.float64)  # (V,) logits after token `position`
        if not row.any():
            raise BackendError("llama.cpp returned an all-zero logits row: the model was opened without logits_all")
        row = row - row.max()
        return row - np.log(np.exp(row).sum())

    # ---- generation -------------------------------------------------------------------------------------------------
    def _generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, chat: bool
    ) -> list[str]:
        out, tokens = [], 0
        with self._lock:
            for i, prompt in enumerate(prompts):
                kwargs = {"max_tokens": max_new_tokens, "temperature": temperature, "seed": seed * 1_000_003 + i}
                if chat:
                    answer = self.llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **kwargs)
                    text = answer["choices"][0]["message"]["content"] or ""
                else:
                    answer = self.llm.create_completion(prompt, **kwargs)
                    text = answer["choices"][0]["text"]
                usage = answer.get("usage") or {}
                tokens += int(usage.get("total_tokens") or 0)
                out.append(text)
        self._charged(len(prompts), tokens, "generate")
        return out

    # ---- tokens -----------------------------------------------------------------------------------------------------
    def _tokenize(self, text: str, bos: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=bos, special=False))

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token]).decode("utf-8", errors="replace")

    def pieces(self, text: str) -> list[str]:
        with self._lock:
            return [self._piece(t) for t in self._tokenize(text, bos=False)]

    def vocabulary(self) -> list[str]:
        vocab = getattr(self, "_vocab", None)
        if vocab is None:
            with self._lock:
                pieces = (self._piece(i) for i in range(self.llm.n_vocab()))
                vocab = [p for p in pieces if p.strip() and p.isprintable() and "\ufffd" not in p]
            self._vocab = vocab
        return vocab

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
