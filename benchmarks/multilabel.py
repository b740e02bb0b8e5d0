"""PTEC on the hate-speech multi-label set (22 labels) with SmolLM2-135M: prompt tuning with a classifier head
(PTEC: Buchner et al., 2024, "Prompt Tuned Embedding Classification for Multi-Label Industry Sector Allocation",
arXiv 2309.12075), its text-to-text alternative (labels generated under a trie constraint), and a trivial baseline.

    python benchmarks/multilabel.py                             # every variant -> results/multilabel-<variant>.json
    python benchmarks/multilabel.py --variants ptec_classifier  # one variant
    python benchmarks/multilabel.py --variants ptec_classifier --method ept   # another soft prompt, same head
    python benchmarks/multilabel.py --max-steps 3 --limit 20    # smoke run -> results/quick/ (not committed)

Protocol: train on `train_preprocessed.json`, choose the step (and the classifier's probability threshold) on
`dev_preprocessed.json` only, score `test_preprocessed.json` once. Reported: macro-F1 (the figure PTEC selects on),
micro-F1 and sample-wise Jaccard (what PTEC's repository reports), exact match and labels per example. Settings come
from `configs/hatespeech_ptec.yaml` plus the per-variant overrides below; the step budget is sized for about ten
minutes per variant on two CPU cores.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # run.py (environment, atomic JSON writes, memory) lives next to this script

from run import environment, peak_rss_mb, reset_peak_rss, warm_up, write_json  # noqa: E402

from prompttune import PromptTuner  # noqa: E402
from prompttune.api import make_config  # noqa: E402
from prompttune.backbones import load_backbone  # noqa: E402
from prompttune.cli import read_run_config  # noqa: E402
from prompttune.data.examples import detect_label_columns, load_examples  # noqa: E402
from prompttune.evaluation import metrics, score_metrics  # noqa: E402
from prompttune.heads.base import THRESHOLD_METRICS  # noqa: E402
from prompttune.types import Example  # noqa: E402

CONFIG = REPO / "configs" / "hatespeech_ptec.yaml"
DATA = REPO.parent / "shared" / "data" / "hatespeech-multilabel"
SPLITS = {"train": "train_preprocessed.json", "dev": "dev_preprocessed.json", "test": "test_preprocessed.json"}
# 120 steps of 8 see ~960 of the 2,338 training comments once each. The frozen text before the soft tokens is cached
# (the library default): ~3.5 MiB of keys/values per comment, ~4.5 GiB for train + dev, shared by both variants
# (same seed, same comments). Classifier: dev scored at steps 0, 40, 80, 120 (cheap once dev prefixes are cached).
# Label generation decodes without the cache, so dev is generated only at steps 0 and 120.
VARIANTS: dict[str, dict[str, Any] | None] = {
    "ptec_classifier": {"head": "classifier", "max_steps": 120, "eval_every": 40},
    "label_generation": {"head": "label_generation", "max_steps": 120, "eval_every": 120, "max_new_tokens": 24},
    "majority": None,  # the most frequent training label set, for every comment
}
METRICS = ("macro_f1", "micro_f1", "jaccard", "exact_match", "labels_per_example")


def load_splits(data_dir: Path, limit: int | None) -> tuple[list[str], dict[str, list[Example]]]:
    """Label columns (fixed on the training file) and the three splits (the first `limit` rows of each, if set)."""
    columns = detect_label_columns(data_dir / SPLITS["train"])
    splits = {k: load_examples(data_dir / name, label_columns=columns) for k, name in SPLITS.items()}
    return columns, {k: v[:limit] if limit else v for k, v in splits.items()}


def run_majority(columns: list[str], splits: dict[str, list[Example]]) -> dict[str, Any]:
    label_set, count = Counter(ex.label for ex in splits["train"]).most_common(1)[0]
    test = splits["test"]
    scores = metrics.multilabel([ex.label for ex in test], [label_set] * len(test), columns)
    return {"predicted_set": list(label_set), "train_share": round(count / len(splits["train"]), 4), "test": scores}


def run_tuned(
    base: Any, overrides: dict[str, Any], backbone: Any, columns: list[str], splits: dict[str, list[Example]], args
) -> dict[str, Any]:
    options = {**overrides, "label_columns": columns, "seed": args.seed}
    if args.max_steps is not None:
        options.update(max_steps=args.max_steps, eval_every=max(1, args.max_steps))
    # Another method keeps the config's task and training settings and takes its own defaults (its benchmark size).
    cfg = make_config(backbone.spec.name, args.method or base.method, base=base, **options)
    tuner = PromptTuner(config=cfg, backbone=backbone)
    result = tuner.fit(splits["train"], splits["dev"], quiet=not args.verbose)
    tic = time.perf_counter()
    test = tuner.evaluate(splits["test"])
    model = tuner.model
    if cfg.task.head == "classifier":
        points = operating_points(model, splits["dev"], splits["test"])
    else:
        points = stop_points(tuner, splits["dev"], splits["test"], test)
    return {
        "head": cfg.task.head,
        "method": cfg.method,
        "dev_best": {k: result.best_dev[k] for k in METRICS if k in result.best_dev} if result.best_dev else None,
        "dev_best_step": result.best_step,
        "tuned_on_dev": result.tuned,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "test_seconds": round(time.perf_counter() - tic, 2),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "test": {k: test[k] for k in METRICS},
        "operating_points": points,
        "train_config": asdict(cfg.train),
        "method_config": cfg.method_config,
        "task_config": {k: v for k, v in asdict(cfg.task).items() if k != "label_columns"},
    }


def operating_points(model: Any, dev: list[Example], test: list[Example]) -> dict[str, Any]:
    """The classifier's one threshold chosen on dev by each metric it can maximise, and the test metrics each gives:
    the same trained prompt and head, only the operating point differs (macro-F1 favours rare labels, Jaccard few
    labels per comment)."""
    head = model.head
    kept = (head.options.threshold_metric, float(head.threshold))
    dev_scores, test_scores = model.scores(dev), model.scores(test)  # (N, C) each
    points = {}
    for metric in THRESHOLD_METRICS:
        head.options.threshold_metric = metric
        tuned = head.tune_on_dev(model, dev_scores, dev, "none")
        scores = score_metrics(head, test, test_scores)
        points[metric] = {"threshold": tuned["threshold"], "dev": tuned[f"dev_{metric}"]}
        points[metric]["test"] = {k: scores[k] for k in METRICS}
    head.options.threshold_metric = kept[0]
    head.threshold.fill_(kept[1])
    return points


def stop_points(tuner: Any, dev: list[Example], test: list[Example], scored: dict[str, Any]) -> dict[str, Any]:
    """The label-generation head's stop bias chosen on dev by each metric, and the test metrics each gives: the same
    trained prompt, only how readily an answer ends differs (`scored`: the test metrics at the run's own bias)."""
    head, batch = tuner.model.head, tuner.config.train.eval_batch_size
    kept = (head.options.threshold_metric, float(head.stop_bias))
    points = {}
    for metric in THRESHOLD_METRICS:
        head.options.threshold_metric = metric
        dev_scores = head.dev_metrics(tuner.model, dev, batch)  # decodes dev once, sets the stop bias by `metric`
        same = float(head.stop_bias) == kept[1]
        test_scores = scored if same else tuner.evaluate(test)
        points[metric] = {"stop_bias": float(head.stop_bias), "dev": dev_scores[metric]}
        points[metric]["test"] = {k: test_scores[k] for k in METRICS}
    head.options.threshold_metric = kept[0]
    head.stop_bias.fill_(kept[1])
    return points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--data-dir", type=Path, default=DATA, help="folder holding the *_preprocessed.json files")
    p.add_argument("--seed", type=int, default=13, help="seed for initialisation and data order")
    p.add_argument("--method", help="soft-prompt method under each head (default: the config's prompt_tuning)")
    p.add_argument("--max-steps", type=int, help="override the step budget (smoke runs; dev is scored at the end)")
    p.add_argument("--limit", type=int, help="use only the first N rows of each split (smoke runs)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, the machine's cores)")
    p.add_argument("--results", type=Path, help="output folder (default: results/, or results/quick/ for smoke runs)")
    p.add_argument("--verbose", action="store_true", help="progress bars and dev scores while training")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; expected some of {', '.join(VARIANTS)}")
    smoke = args.max_steps is not None or args.limit is not None
    args.results = args.results or HERE / "results" / ("quick" if smoke else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    columns, splits = load_splits(args.data_dir, args.limit)
    sizes = {f"n_{k}": len(v) for k, v in splits.items()}
    print(f"hatespeech: {len(columns)} labels, {sizes} -> {args.results}", flush=True)
    base = read_run_config(CONFIG)
    backbone, model_name = None, base.model
    args.method = None if args.method == base.method else args.method  # the config's own method keeps its file name
    env = environment()
    for variant in args.variants:
        gc.collect()
        scoped = reset_peak_rss()
        wall = time.perf_counter()
        overrides = VARIANTS[variant]
        if overrides is None:
            record = run_majority(columns, splits)
        else:
            if backbone is None:
                backbone = load_backbone(model_name)
                warm_up(backbone)
            record = run_tuned(base, overrides, backbone, columns, splits, args)
        record = {
            "dataset": "hatespeech-multilabel",
            "variant": variant,
            "model": model_name if overrides is not None else None,
            "seed": args.seed,
            "labels": len(columns),
            **sizes,
            **record,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_scope": "variant" if scoped else "process (peak could not be reset)",
            "wall_seconds": round(time.perf_counter() - wall, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **env,
        }
        tag = variant if overrides is None or not args.method else f"{variant}-{args.method}"
        write_json(args.results / f"multilabel-{tag}.json", record)
        test = record["test"]
        print(
            f"{tag:18s} test macro-F1 {test['macro_f1']:.4f}  micro-F1 {test['micro_f1']:.4f}  "
            f"Jaccard {test['jaccard']:.4f}  ({record['wall_seconds']:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
