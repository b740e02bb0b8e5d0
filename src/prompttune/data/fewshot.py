"""Few-shot data: which k examples of an unlabelled pool to label (active selection), and seeded k-shot sampling.

Active selection for prompt learning, as studied in "Exploring Small Language Models with Prompt-Learning Paradigm
for Efficient Domain-Specific Text Classification" (arXiv 2507.14871), with the frozen model as the only signal:

- `uncertainty`: uncertainty sampling (Lewis & Gale, 1994) on the zero-shot verbalizer's class distribution: the
  highest entropy, or the smallest margin between the two most likely classes. The distribution is calibrated on
  content-free inputs first by default (Zhao et al., 2021, arXiv 2102.09690): an uncalibrated model's uncertainty
  mostly measures its label bias.
- `diversity`: on the frozen model's mean-pooled final hidden states (L2-normalised): k-center greedy, the core-set
  rule of Sener & Savarese, 2018 (arXiv 1708.00489), or k-means with k-means++ seeding (Arthur & Vassilvitskii, 2007)
  taking the example nearest each centroid.
- `random`: the seeded baseline.

`balance` splits k evenly over the zero-shot predicted classes (`predicted`, no labels needed) or over the gold
labels (`label`: the pool must be labelled, so this is an oracle for simulations; with `random` it is ordinary
seeded k-shot sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PromptTuneError
from ..types import Example

STRATEGIES = ("uncertainty", "diversity", "random")


@dataclass
class SelectConfig:
    """Active few-shot selection (`prompttune select`)."""

    k: int = 16
    """How many examples to choose."""
    strategy: str = "uncertainty"
    """`uncertainty` (zero-shot verbalizer probabilities), `diversity` (frozen embeddings) or `random`."""
    uncertainty: str = "entropy"
    """Uncertainty measure: `entropy` (highest first) or `margin` (smallest top-1 minus top-2 probability first)."""
    diversity: str = "kcenter"
    """Diversity rule: `kcenter` (greedy farthest point) or `kmeans` (k-means++ seeding, Lloyd steps, the example
    nearest each centroid)."""
    balance: str = "none"
    """Equal share of k per class: `none`, `predicted` (zero-shot predicted class) or `label` (gold label; oracle)."""
    calibrate: bool = True
    """Divide the zero-shot probabilities by their content-free prior before measuring uncertainty."""
    seed: int = 13
    """Seed of the random choices (random strategy, k-center's first point, k-means++ seeding)."""
    batch_size: int = 32
    """Examples per forward pass over the pool."""

    def __post_init__(self) -> None:
        for name, ok, expected in (
            ("k", self.k > 0, "a positive integer"),
            ("strategy", self.strategy in STRATEGIES, " or ".join(STRATEGIES)),
            ("uncertainty", self.uncertainty in ("entropy", "margin"), "entropy or margin"),
            ("diversity", self.diversity in ("kcenter", "kmeans"), "kcenter or kmeans"),
            ("balance", self.balance in ("none", "predicted", "label"), "none, predicted or label"),
            ("batch_size", self.batch_size > 0, "a positive integer"),
        ):
            if not ok:
                raise PromptTuneError(f"config field {name!r}: expected {expected}, got {getattr(self, name)!r}")


@dataclass
class Selection:
    """Chosen pool indices (in choice order) and each pool example's selection signal."""

    indices: list[int]
    score: list[float] = field(default_factory=list)  # uncertainty (higher = less sure); empty for other strategies
    predicted: list[int] = field(default_factory=list)  # zero-shot class per pool example, when computed


# ---- pure selection rules -------------------------------------------------------------------------------------------
def entropy(probs: Tensor) -> Tensor:
    """(N, C) probabilities -> (N,) entropy in nats."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def margin(probs: Tensor) -> Tensor:
    """(N, C) probabilities -> (N,) top-1 minus top-2 probability (small = uncertain)."""
    top = probs.topk(min(2, probs.shape[-1]), -1).values  # (N, 2)
    return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)


def k_center_greedy(x: Tensor, k: int, first: int) -> list[int]:
    """Greedy k-center: start at `first`, then repeatedly add the point farthest from everything chosen.

    Args:
        x: (N, D) points; Euclidean distance.
    Returns:
        k distinct indices in choice order (ties go to the lowest index).
    """
    chosen = [first]
    dist = torch.cdist(x, x[first : first + 1])[:, 0]  # (N,) distance to the nearest chosen point
    while len(chosen) < min(k, x.shape[0]):
        nxt = int(torch.argmax(dist))  # argmax returns the first maximum: deterministic ties
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(x, x[nxt : nxt + 1])[:, 0])
    return chosen


def k_means(x: Tensor, k: int, generator: torch.Generator, steps: int = 20) -> list[int]:
    """k-means++ seeding and Lloyd steps; returns the point nearest each centroid (distinct, by cluster size)."""
    n = x.shape[0]
    centres = [int(torch.randint(n, (1,), generator=generator))]
    d2 = torch.cdist(x, x[centres])[:, 0] ** 2  # (N,)
    while len(centres) < min(k, n):
        if float(d2.sum()) <= 0:  # fewer distinct points than k
            break
        centres.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
        d2 = torch.minimum(d2, torch.cdist(x, x[centres[-1:]])[:, 0] ** 2)
    c = x[centres].clone()  # (k, D)
    for _ in range(steps):
        assign = torch.cdist(x, c).argmin(1)  # (N,)
        for j in range(c.shape[0]):
            if bool((assign == j).any()):
                c[j] = x[assign == j].mean(0)
    assign = torch.cdist(x, c).argmin(1)
    sizes = torch.bincount(assign, minlength=c.shape[0])
    out: list[int] = []
    dist = torch.cdist(c, x)  # (k, N)
    for j in sorted(range(c.shape[0]), key=lambda j: (-int(sizes[j]), j)):
        for i in torch.argsort(dist[j], stable=True).tolist():
            if i not in out:
                out.append(i)
                break
    return out[:k]


def quotas(k: int, groups: Sequence[Any]) -> dict[Any, int]:
    """Split k as evenly as possible over the groups present (in sorted order), never above a group's size."""
    sizes: dict[Any, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=str)
    share = dict.fromkeys(order, 0)
    left = min(k, len(groups))
    while left:
        open_groups = [g for g in order if share[g] < sizes[g]]
        for g in open_groups[:left]:
            share[g] += 1
        left -= min(left, len(open_groups))
    return share


def select_indices(
    k: int,
    strategy: str,
    cfg: SelectConfig | None = None,
    *,
    probs: Tensor | None = None,
    features: Tensor | None = None,
    groups: Sequence[Any] | None = None,
) -> list[int]:
    """Choose k indices from precomputed signals: `probs` (N, C) for uncertainty, `features` (N, D) for diversity.

    `groups` (one per pool example) splits k evenly over groups and applies the strategy within each.
    """
    cfg = cfg or SelectConfig(k=k, strategy=strategy)
    n = len(groups) if groups is not None else (probs if probs is not None else features).shape[0]  # type: ignore
    if k > n:
        raise PromptTuneError(f"select: k={k} is larger than the pool ({n} examples)")
    gen = torch.Generator().manual_seed(cfg.seed)
    if strategy == "uncertainty":
        if probs is None:
            raise PromptTuneError("select: the uncertainty strategy needs class probabilities")
        signal = entropy(probs) if cfg.uncertainty == "entropy" else -margin(probs)  # (N,) higher = less sure
    elif strategy == "diversity":
        if features is None:
            raise PromptTuneError("select: the diversity strategy needs features")
        unit = F.normalize(features.float(), dim=-1)  # (N, D) cosine geometry: hidden-state norms carry little
    parts = [(list(range(n)), k)]
    if groups is not None:
        share = quotas(k, groups)
        parts = [([i for i in range(n) if groups[i] == g], m) for g, m in share.items() if m]
    chosen: list[int] = []
    for members, m in parts:
        if strategy == "uncertainty":
            ranked = sorted(members, key=lambda i: (-float(signal[i]), i))
            chosen += ranked[:m]
        elif strategy == "random":
            perm = torch.randperm(len(members), generator=gen).tolist()
            chosen += [members[j] for j in perm[:m]]
        else:
            sub = unit[members]  # (n_g, D)
            if cfg.diversity == "kcenter":
                first = int(torch.randint(len(members), (1,), generator=gen))
                picked = k_center_greedy(sub, m, first)
            else:
                picked = k_means(sub, m, gen)
            chosen += [members[j] for j in picked]
    return chosen


# ---- signals from the frozen model ----------------------------------------------------------------------------------
def select(model: Any, pool: Sequence[Example], cfg: SelectConfig, cache: dict[str, Tensor] | None = None) -> Selection:
    """Choose `cfg.k` pool examples with a frozen `PromptModel` (manual template + verbalizer head, no training).

    `cache`, a dict kept between calls with the same model and pool, saves the forward passes over the pool when
    several strategies are compared.

    Raises:
        PromptTuneError: k larger than the pool, `balance=label` on unlabelled examples, a head without class scores.
    """
    cache = {} if cache is None else cache
    probs = features = None
    if cfg.strategy == "uncertainty" or cfg.balance == "predicted":
        if not model.head.is_classifier or not hasattr(model.head, "prior"):
            raise PromptTuneError("select: uncertainty and balance=predicted need a verbalizer head (label words)")
        key = f"probs:calibrate={cfg.calibrate}"
        if key not in cache:
            scores = model.scores(pool, cfg.batch_size)  # (N, C)
            if cfg.calibrate:
                scores = scores - model.content_free_prior().cpu()
            cache[key] = scores.softmax(-1)
        probs = cache[key]
    if cfg.strategy == "diversity":
        if "features" not in cache:
            cache["features"] = model.represent(pool, "final", cfg.batch_size)  # (N, D)
        features = cache["features"]
    groups: list[Any] | None = None
    if cfg.balance == "predicted":
        groups = probs.argmax(-1).tolist()  # type: ignore[union-attr]
    elif cfg.balance == "label":
        missing = [ex.source for ex in pool if ex.label is None]
        if missing:
            raise PromptTuneError(f"{missing[0]}: balance=label needs a labelled pool (or use balance=predicted)")
        groups = [ex.label for ex in pool]
    indices = select_indices(cfg.k, cfg.strategy, cfg, probs=probs, features=features, groups=groups)
    score: list[float] = []
    if probs is not None and cfg.strategy == "uncertainty":
        score = (entropy(probs) if cfg.uncertainty == "entropy" else -margin(probs)).tolist()
    return Selection(indices, score, probs.argmax(-1).tolist() if probs is not None else [])


def sample_k_shot(examples: Sequence[Example], k_per_class: int, seed: int) -> list[Example]:
    """Seeded k-shot sampling: `k_per_class` examples of every label (all of a rarer label)."""
    labels = sorted({ex.label for ex in examples}, key=str)
    k = min(len(examples), k_per_class * len(labels))
    cfg = SelectConfig(k=k, strategy="random", balance="label", seed=seed)
    return [examples[i] for i in select_indices(k, "random", cfg, groups=[ex.label for ex in examples])]


# ---- CLI: `prompttune select` ---------------------------------------------------------------------------------------
def add_select_verb(verbs: Any, make_verb: Any) -> None:
    """Register `prompttune select` (flags from `SelectConfig`; template and label words as for `train`)."""
    from ..cliutil import add_config_flags, text_flag
    from ..config import TaskConfig, field_docs

    p = make_verb(verbs, "select", "choose which k pool examples to label (active few-shot selection)", _cmd, None)
    docs = field_docs(TaskConfig)
    p.add_argument("--model", default="smollm2-135m", help="frozen model (default: smollm2-135m)")
    p.add_argument("--pool", required=True, metavar="FILE", help="TSV/CSV/JSONL pool (a label column is optional)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the chosen rows (.tsv/.csv/.jsonl)")
    p.add_argument("--template", type=text_flag, default=TaskConfig.template, metavar="TEXT", help=docs["template"])
    p.add_argument("--verbalizer", help=f"{docs['verbalizer']} Needed by uncertainty and balance=predicted.")
    p.add_argument("--label-field", help=docs["label_field"])
    p.set_defaults(select_fields=add_config_flags(p, SelectConfig, "selection", set()))


def _cmd(args: Any) -> dict[str, Any]:
    from ..api import build_model, make_config, resolve_labels
    from ..backbones import load_backbone
    from ..cliutil import print_table
    from ..config import build_section
    from .examples import load_examples, write_examples

    cfg = build_section(SelectConfig, {n: getattr(args, n) for n in args.select_fields if hasattr(args, n)}, "select")
    pool = load_examples(args.pool, args.label_field, require_label=False)
    needs_words = cfg.strategy == "uncertainty" or cfg.balance == "predicted"
    if needs_words and not args.verbalizer:
        raise PromptTuneError(f"select: strategy {cfg.strategy!r} / balance {cfg.balance!r} needs --verbalizer")
    head = "verbalizer" if args.verbalizer else "classifier"
    run = make_config(args.model, "manual", template=args.template, verbalizer=args.verbalizer, head=head)
    backbone = load_backbone(args.model)
    labels = resolve_labels(run.task, None) or ["0", "1"]  # diversity alone never reads the head's scores
    model = build_model(run, backbone, labels)
    chosen = select(model, pool, cfg)
    write_examples(args.out, [pool[i] for i in chosen.indices], args.label_field or "label")
    rows = []
    for i in chosen.indices:
        text = " | ".join(pool[i].fields.values()).replace("\n", " ")
        rows.append([str(i), str(pool[i].label or ""), f"{chosen.score[i]:.4f}" if chosen.score else "-", text[:70]])
    print_table(args, ["row", "label", "uncertainty", "text"], rows)
    return {
        "out": str(args.out),
        "indices": chosen.indices,
        "strategy": cfg.strategy,
        "pool": len(pool),
        "score": [chosen.score[i] for i in chosen.indices] if chosen.score else None,
    }
