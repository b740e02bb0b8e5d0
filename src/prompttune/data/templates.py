"""Templates: `"Review: {text}\n{soft}Sentiment:{answer}"` -> token ids, soft-slot indices and the answer position.

Text between soft markers is tokenised as one string (so `"Review: great"` tokenises as the model saw it in
pre-training), and soft slots may sit anywhere: in front, after an instruction, in the middle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import PromptTuneError
from ..types import Example

# `{field}` takes any column name (`{Review Text}`, `{sentence1}`; spaces around it are trimmed); `{soft:K}` a count.
_TOKEN = re.compile(r"\{\s*([^{}:\s][^{}:\n]*?)\s*(?::(\d+))?\}")
_PROMPT = "\2"  # stands for `{prompt}` inside a parsed chunk
_TEXT_ALIASES = ("text", "sentence", "content", "review", "input", "question")


@dataclass(frozen=True)
class Prompt:
    """An encoded prompt: ids (soft slots hold `placeholder`), soft-slot indices; the answer is read at the end."""

    ids: tuple[int, ...]
    soft: tuple[int, ...]


class Template:
    """A parsed template.

    Args:
        text: the template string; `{{`/`}}` give literal braces.
        require_answer: causal LMs read the answer where `{answer}` stands, so it must end the template.
    """

    def __init__(self, text: str, require_answer: bool = True):
        self.text = text
        body, sep, after = text.replace("{{", "\0").replace("}}", "\1").partition("{answer}")
        if require_answer and not sep:
            raise PromptTuneError(f"template {text!r}: missing {{answer}} (where the label is read)")
        if after.strip():
            raise PromptTuneError(
                f"template {text!r}: text after {{answer}} is never seen by a left-to-right "
                f"model; move it before {{answer}}"
            )
        self.segments: list[list[str] | int | None] = []  # list of pieces (text chunk), int (soft count) or None
        self.fields: list[str] = []
        pos = 0
        chunk: list[str] = []
        for m in _TOKEN.finditer(body):
            chunk.append(body[pos : m.start()])
            name, count = m.group(1), m.group(2)
            if name == "prompt":  # where a discrete optimiser's searched text goes (empty elsewhere)
                chunk.append(_PROMPT)
            elif name == "soft":
                self.segments.append(chunk)
                self.segments.append(int(count) if count else None)
                chunk = []
            else:
                chunk.append("{" + name + "}")
                self.fields.append(name)
            pos = m.end()
        chunk.append(body[pos:])
        self.segments.append(chunk)
        if not self.fields:
            raise PromptTuneError(f"template {text!r}: no data field such as {{text}}")

    @property
    def soft_markers(self) -> int:
        return sum(1 for s in self.segments if not isinstance(s, list))

    def soft_counts(self, total: int) -> list[int]:
        """How many of `total` soft tokens each marker receives (no marker: all in front)."""
        markers = [s for s in self.segments if not isinstance(s, list)]
        if not markers:
            return [total]
        explicit = [m for m in markers if m is not None]
        if explicit and len(explicit) == len(markers):
            if total and sum(explicit) != total:
                raise PromptTuneError(
                    f"template {self.text!r}: soft markers hold {sum(explicit)} tokens but the method has {total}"
                )
            return explicit if total else [0] * len(markers)
        share, rest = divmod(total, len(markers))
        return [share + (1 if i < rest else 0) for i in range(len(markers))]

    @property
    def has_prompt(self) -> bool:
        """Whether the template marks where a discrete prompt goes (`{prompt}`)."""
        return any(isinstance(s, list) and _PROMPT in s for s in self.segments)

    def render_chunks(self, example: Example, prompt: str = "") -> list[str]:
        """The text chunks between soft markers, with fields (and `{prompt}`) filled in."""
        return [self._fill(seg, example, prompt) for seg in self.segments if isinstance(seg, list)]

    def render_text(self, example: Example, prompt: str = "") -> str:
        """The whole prompt as text up to `{answer}` (soft markers hold nothing): what a text-only LLM reads."""
        return "".join(self.render_chunks(example, prompt))

    def _fill(self, pieces: list[str], example: Example, prompt: str = "") -> str:
        out = []
        for piece in pieces:
            m = _TOKEN.fullmatch(piece)
            out.append(resolve_field(example, m.group(1)) if m else piece.replace("\0", "{").replace("\1", "}"))
        return "".join(prompt if piece == _PROMPT else piece for piece in out)

    def encode(
        self,
        example: Example,
        tokenizer: Any,
        num_soft: int,
        max_length: int,
        truncate: bool = False,
        placeholder: int = 0,
        add_suffix: bool = False,
    ) -> Prompt:
        """Tokenise an example.

        Raises:
            PromptTuneError: a field is missing, or the prompt is longer than `max_length` and `truncate` is off.
        """
        counts = self.soft_counts(num_soft)
        chunks = self.render_chunks(example)
        for _ in range(4):
            prompt = self._assemble(chunks, counts, tokenizer, placeholder, add_suffix)
            excess = len(prompt.ids) - max_length
            if excess <= 0:
                return prompt
            if not truncate:
                raise PromptTuneError(
                    f"{example.source}: prompt is {len(prompt.ids)} tokens, longer than the "
                    f"model's limit of {max_length}; shorten it or enable truncate"
                )
            example = _shorten_longest_field(example, self.fields, excess, tokenizer)
            chunks = self.render_chunks(example)
        raise PromptTuneError(f"{example.source}: could not truncate the prompt to {max_length} tokens")

    def _assemble(
        self, chunks: list[str], counts: list[int], tokenizer: Any, placeholder: int, add_suffix: bool
    ) -> Prompt:
        head, tail = special_affixes(tokenizer)
        ids: list[int] = list(head)
        soft: list[int] = []
        has_marker = self.soft_markers > 0
        if not has_marker:  # no marker: soft tokens go first (after BOS/CLS), as in Lester et al.
            soft.extend(range(len(ids), len(ids) + counts[0]))
            ids.extend([placeholder] * counts[0])
        marker = 0
        for seg in self.segments:
            if isinstance(seg, list):
                text = chunks.pop(0) if chunks else ""
                if text:
                    ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                n = counts[marker]
                marker += 1
                soft.extend(range(len(ids), len(ids) + n))
                ids.extend([placeholder] * n)
        if add_suffix:
            ids.extend(tail)
        return Prompt(tuple(ids), tuple(soft))


def resolve_field(example: Example, name: str) -> str:
    """`{text}` falls back to common column names, or to the only text column."""
    fields = example.fields
    if name in fields:
        return fields[name]
    if name == "text":
        for alias in _TEXT_ALIASES:
            if alias in fields:
                return fields[alias]
        if len(fields) == 1:
            return next(iter(fields.values()))
    raise PromptTuneError(f"{example.source}: template field {{{name}}} not in the data; columns are {sorted(fields)}")


def _shorten_longest_field(example: Example, names: list[str], excess: int, tokenizer: Any) -> Example:
    values = {n: resolve_field(example, n) for n in names}
    longest = max(values, key=lambda n: len(values[n]))
    ids = tokenizer(values[longest], add_special_tokens=False)["input_ids"]
    keep = max(0, len(ids) - excess - 1)
    fields = dict(example.fields)
    key = longest if longest in fields else next(a for a in (*_TEXT_ALIASES, *fields) if a in fields)
    # A cut inside a multi-byte character (byte-level BPE: an emoji) decodes to U+FFFD, which re-encodes to more
    # tokens than were kept, so the prompt would never get shorter: drop the broken character.
    fields[key] = tokenizer.decode(ids[:keep]).rstrip("\ufffd")
    return Example(fields=fields, label=example.label, source=example.source)


def special_affixes(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Special tokens the tokenizer puts before and after a text (e.g. BOS; or [CLS] and [SEP]), found by probing."""
    cached = getattr(tokenizer, "_prompttune_affixes", None)
    if cached is None:
        bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
        full = tokenizer("hello", add_special_tokens=True)["input_ids"]
        cached = ((), ())
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                cached = (tuple(full[:start]), tuple(full[start + len(bare) :]))
                break
        tokenizer._prompttune_affixes = cached
    return cached
