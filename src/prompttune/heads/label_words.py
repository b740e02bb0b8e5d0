"""Related words for a label's own words, found without network access: the label words' nearest whole-word
neighbours in the backbone's input-embedding space, and/or a user-supplied list (mapping, JSON or TSV lines).

The knowledgeable verbalizer (`knowledgeable.py`) expands each label with these and then refines the list on data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PromptTuneError

_WORD = re.compile(r" [^\W\d_]{2,}")  # a leading space, then two or more letters: a whole word after a space


def related_words(
    anchors: dict[str, list[str]], backbone: Any, user: Any, expand: int, max_tokens: int
) -> dict[str, list[str]]:
    """label -> related words: the user's (`user`: mapping or file; those over `max_tokens` tokens dropped), then
    `expand` embedding neighbours per label; never a word of another label, never one of the label's own."""
    tok = backbone.tokenizer
    related = read_related_words(user, anchors) if user is not None else {label: [] for label in anchors}
    related = {
        label: [w for w in words if len(tok(w, add_special_tokens=False)["input_ids"]) <= max_tokens]
        for label, words in related.items()
    }
    if expand:
        taken = {label: anchors[label] + related[label] for label in anchors}
        vocab = min(len(tok), backbone.spec.vocab_size)
        embeddings = backbone.spec.embed_tokens(torch.arange(vocab, device=backbone.device)).detach().float().cpu()
        extra = expand_from_embeddings(embeddings, tok, taken, expand)
        related = {label: related[label] + extra[label] for label in anchors}
    return related


def expand_from_embeddings(
    embeddings: Tensor, tokenizer: Any, taken: dict[str, list[str]], k: int
) -> dict[str, list[str]]:
    """The `k` nearest whole-word tokens of each label in input-embedding space, each word given to one label.

    A candidate is a token that decodes to a leading space plus letters and encodes back to itself alone. Its
    similarity to a label is the largest cosine to one of the label's words (mean of the word's token embeddings);
    it goes to the label it is most similar to, unless it matches (case-insensitively) a word another label already
    has: then it is skipped. Ties break on the token id, so the result is deterministic.

    Args:
        embeddings: (V, D) input embeddings of the vocabulary.
        taken: label -> the words it already has (its own first).
    Returns:
        label -> up to `k` new words, most similar first.
    """
    labels = list(taken)
    owner = {w.strip().lower(): label for label in labels for w in taken[label]}
    have = {w for label in labels for w in taken[label]}
    decoded = tokenizer.batch_decode([[i] for i in range(embeddings.shape[0])])
    ids = [i for i, text in enumerate(decoded) if _WORD.fullmatch(text) and text not in have]
    encoded = tokenizer([decoded[i] for i in ids], add_special_tokens=False)["input_ids"]
    cand = [(i, decoded[i]) for i, e in zip(ids, encoded, strict=True) if e == [i]]
    if not cand:
        return {label: [] for label in labels}
    unit = F.normalize(embeddings.float(), dim=-1)  # (V, D)
    sims = []
    for label in labels:
        anchors = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in taken[label]]
        vecs = F.normalize(torch.stack([embeddings[a].float().mean(0) for a in anchors if a]), dim=-1)  # (A, D)
        sims.append((unit[[i for i, _ in cand]] @ vecs.T).max(-1).values)  # (K,)
    sim = torch.stack(sims, 1)  # (K, C)
    best, which = sim.max(1)  # (K,)
    order = sorted(range(len(cand)), key=lambda j: (-float(best[j]), cand[j][0]))
    out: dict[str, list[str]] = {label: [] for label in labels}
    for j in order:
        label, form = labels[int(which[j])], cand[j][1].strip().lower()
        if len(out[label]) < k and owner.setdefault(form, label) == label:
            out[label].append(cand[j][1])
    return out


def read_related_words(source: Any, anchors: dict[str, list[str]]) -> dict[str, list[str]]:
    """label -> related words from a mapping, a JSON file or `label<TAB>w, w` lines; no word under two labels."""
    where = "head kpt: related_words"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PromptTuneError(f"{where}: {path}: no such file")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                source = json.loads(text)
            except json.JSONDecodeError as err:
                raise PromptTuneError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        else:
            source, where = {}, str(path)
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise PromptTuneError(f"{path}:{n}: expected 'label<TAB>word, word, ...', got {line!r}")
                label, words = line.split("\t", 1)
                source.setdefault(label.strip(), []).extend(words.split(","))
    if not isinstance(source, dict):
        raise PromptTuneError(f"{where}: expected a mapping label -> words, got {type(source).__name__}")
    out: dict[str, list[str]] = {label: [] for label in anchors}
    owner = {w.strip().lower(): label for label in anchors for w in anchors[label]}
    for label, words in source.items():
        label = str(label)
        if label not in anchors:
            raise PromptTuneError(f"{where}: label {label!r} is not one of {list(anchors)}")
        space = " " if all(w.startswith(" ") for w in anchors[label]) else ""
        for word in [words] if isinstance(words, str) else list(words):
            word = str(word).strip()
            if not word:
                continue
            if owner.setdefault(word.lower(), label) != label:
                raise PromptTuneError(
                    f"{where}: word {word!r} is given to labels {owner[word.lower()]!r} and {label!r}"
                )
            if space + word not in anchors[label] + out[label]:
                out[label].append(space + word)
    return out
