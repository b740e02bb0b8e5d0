"""Verbalizer families, active few-shot selection and prompt ensembles on a 16-shot split (one seed per command).

    python benchmarks/verbalizers.py --seed 13                 # full size: SmolLM2-135M, SST-2, full test file
    python benchmarks/verbalizers.py --dataset mr --seed 13    # MR, CR or SST-5: the main grid's template and words
    python benchmarks/verbalizers.py --model tiny-llama --test-limit 40 --pool-size 60 --k 4 --steps 4   # smoke

Rows (test accuracy; dev = the seed's 16-shot dev file, used for selection and `calibrate=auto` only):
- zero-shot manual template (method `manual`, no training): the plain verbalizer; with content-free calibration
  (Zhao et al., 2021); the KPT verbalizer (Hu et al., 2022, arXiv 2108.02035: embedding-space expansion, frequency
  and relevance refinement and contextualized calibration on the 32 training texts, labels unused, plain average);
  KPT with expansion only (no refinement, no calibration); KPT plus content-free calibration;
- prompt tuning (16 soft tokens, the main grid's settings) on the 16-shot train split with the plain verbalizer, the
  soft verbalizer (WARP-style label embeddings) and KPT with learned word weights;
- active selection: k examples chosen from a seeded sample of the dataset's full file (SST: the training split; MR
  and CR: the whole corpus minus every dev and test sentence; labels revealed only for the chosen ones) by zero-shot
  uncertainty, frozen-embedding diversity (k-center) or at random, each with an equal share per zero-shot predicted
  class, then prompt tuning with the plain verbalizer;
- ensembles of all the learned prompts above: mean of probabilities and majority vote.

Writes `<out>/<dataset>__<seed>.json` (every row, its settings and the environment) and `<out>/<dataset>__<seed>.md`.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as grid  # noqa: E402  (the main grid: environment, data loading, atomic JSON)

from prompttune import PromptTuner  # noqa: E402
from prompttune.api import build_model, make_config  # noqa: E402
from prompttune.backbones import load_backbone  # noqa: E402
from prompttune.data.examples import load_examples  # noqa: E402
from prompttune.data.fewshot import SelectConfig, select  # noqa: E402
from prompttune.ensemble import combine  # noqa: E402
from prompttune.evaluation import score_metrics  # noqa: E402
from prompttune.types import Example  # noqa: E402

SOFT_TOKENS = 16
# The full labelled file each dataset's active-selection pool is sampled from (`<label> <text>` lines). SST-2 and SST-5
# have an official train split; MR and CR come as one file holding every sentence, the test ones included.
FULL_FILES = {"sst-2": "stsa.binary.train", "sst-5": "stsa.fine.train", "mr": "rt-polarity.all", "cr": "custrev.all"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="sst-2", choices=sorted(FULL_FILES), help="dataset (default: sst-2)")
    p.add_argument("--seed", type=int, default=13, help="data seed (16-shot split) and training seed (default: 13)")
    p.add_argument("--model", default=grid.MODEL, help=f"backbone (default: {grid.MODEL})")
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data", help="data root")
    p.add_argument("--test-limit", type=int, default=None, help="score a fixed stratified sample of N test rows")
    p.add_argument("--pool-size", type=int, default=2000, help="pool sampled from the full train file (0 = all)")
    p.add_argument("--k", type=int, default=16, help="examples chosen by active selection (default: 16)")
    p.add_argument("--balance", default="predicted", help="selection balance: none, predicted, label")
    p.add_argument("--expand", type=int, default=16, help="KPT related words per label (default: 16)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the TrainConfig default)")
    p.add_argument("--threads", type=int, default=grid.THREADS, help="torch threads (default: 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/verbalizers)")
    args = p.parse_args(argv)
    if args.out is None:  # smoke runs on tiny models never land next to the real results
        sub = "verbalizers" if args.model == grid.MODEL else "quick/verbalizers"
        args.out = HERE / "results" / sub
    return args


def _key(text: str) -> str:
    """Letters and digits only: the full files and the 16-shot TSVs quote and encode some sentences differently."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def full_pool(data_dir: Path, dataset: str, size: int, seed: int, exclude: set[str]) -> list[Example]:
    """A seeded sample of the dataset's full file (`<label> <text>` lines), minus sentences whose `_key` is in
    `exclude`."""
    rows = []
    for raw in (data_dir / dataset / "full" / FULL_FILES[dataset]).read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # MR and CR are Latin-1
            line = raw.decode("latin-1")
        label, _, text = line.partition(" ")
        if text and _key(text) not in exclude:
            rows.append({"text": text, "label": label})
    if size and size < len(rows):
        rows = random.Random(seed).sample(rows, size)
    return load_examples(rows)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.backbone = load_backbone(args.model)
        self.task = grid.TASKS[args.dataset]  # the main grid's template and label words
        self.train, self.dev = grid.load_split(args.data_dir, args.dataset, args.seed)
        self.test = grid.load_test(args.data_dir, args.dataset, args.test_limit)
        self.rows: list[dict[str, Any]] = []
        self.learned: dict[str, torch.Tensor] = {}  # row -> test probabilities (N, C) of each learned prompt
        self.head: Any = None  # a trained head: the label order and decision rule the ensembles share

    def options(self, **extra: Any) -> dict[str, Any]:
        task, seed = self.task, self.args.seed
        out = {"template": task["template"], "verbalizer": task["verbalizer"], "seed": seed, **extra}
        if self.args.steps is not None:
            out.update(max_steps=self.args.steps, eval_every=max(1, min(20, self.args.steps)))
        return out

    def record(self, name: str, group: str, test: dict[str, Any], tic: float, **info: Any) -> None:
        row = {"row": name, "group": group, "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]}
        row.update(seconds=round(time.perf_counter() - tic, 1), **info)
        self.rows.append(row)
        print(f"{name:40s} {test['accuracy']:.4f}  ({row['seconds']:.0f} s)", flush=True)

    # ---- zero-shot ----------------------------------------------------------------------------------------------
    def zero_shot(self) -> None:
        tic = time.perf_counter()
        tuner = PromptTuner(self.args.model, "manual", backbone=self.backbone, **self.options(calibrate="none"))
        tuner.fit(self.train, self.dev, quiet=True)
        model = tuner.model
        raw = model.scores(self.test)  # (N, C)
        self.record("manual + verbalizer", "zero-shot", score_metrics(model.head, self.test, raw), tic)
        tic = time.perf_counter()
        prior = model.content_free_prior()
        cal = score_metrics(model.head, self.test, raw - prior)
        self.record("manual + verbalizer + calibration", "zero-shot", cal, tic, prior=prior.exp().tolist())
        kpt = {"head": "kpt", "expand": self.args.expand, "learn_weights": False}
        variants = [
            ("manual + kpt", {}),
            ("manual + kpt (expansion only)", {"relevance": False, "frequency_cutoff": 0.0, "calibrate_words": False}),
        ]
        for name, extra in variants:
            tic = time.perf_counter()
            tuner = PromptTuner(
                self.args.model, "manual", backbone=self.backbone, **self.options(calibrate="none"), **kpt, **extra
            )
            result = tuner.fit(self.train, self.dev, quiet=True)
            raw = tuner.model.scores(self.test)
            info = {"kept": result.tuned.get("kpt_kept"), "words": tuner.model.head.words}
            self.record(name, "zero-shot", score_metrics(tuner.model.head, self.test, raw), tic, **info)
            if not extra:
                tic = time.perf_counter()
                prior = tuner.model.content_free_prior()
                cal = score_metrics(tuner.model.head, self.test, raw - prior)
                self.record("manual + kpt + calibration", "zero-shot", cal, tic, prior=prior.exp().tolist())

    # ---- prompt tuning ------------------------------------------------------------------------------------------
    def tune(self, name: str, group: str, train: list[Example], **extra: Any) -> None:
        tic = time.perf_counter()
        tuner = PromptTuner(
            self.args.model,
            "prompt_tuning",
            backbone=self.backbone,
            **self.options(num_virtual_tokens=SOFT_TOKENS, **extra),
        )
        result = tuner.fit(train, self.dev, quiet=True)
        scores = tuner.model.scores(self.test)  # (N, C) calibration included; kept for the ensembles
        self.learned[name] = scores.softmax(-1)
        self.head = self.head or tuner.model.head
        test = score_metrics(tuner.model.head, self.test, scores)
        self.record(
            name,
            group,
            test,
            tic,
            dev_best=(result.best_dev or {}).get("accuracy"),
            best_step=result.best_step,
            calibrated=bool(result.tuned.get("calibrated")),
            trainable_params=sum(p.numel() for p in tuner.model.parameters() if p.requires_grad),
        )

    def prompt_tuning(self) -> None:
        self.tune("prompt_tuning + verbalizer", "16-shot", self.train)
        self.tune("prompt_tuning + soft verbalizer", "16-shot", self.train, head="soft_verbalizer")
        self.tune("prompt_tuning + kpt (learned weights)", "16-shot", self.train, head="kpt", expand=self.args.expand)

    # ---- active selection ---------------------------------------------------------------------------------------
    def active(self) -> None:
        exclude = {_key(ex.fields["sentence"]) for ex in self.dev}
        if FULL_FILES[self.args.dataset].endswith(".all"):  # the file holds the test sentences too: never pick them
            every_test = grid.load_test(self.args.data_dir, self.args.dataset, None)
            exclude |= {_key(ex.fields["sentence"]) for ex in every_test}
        pool = full_pool(self.args.data_dir, self.args.dataset, self.args.pool_size, self.args.seed, exclude)
        task = self.task
        cfg = make_config(self.args.model, "manual", template=task["template"], verbalizer=task["verbalizer"])
        model = build_model(cfg, self.backbone, list(cfg.task.verbalizer))
        print(f"pool: {len(pool)} sentences", flush=True)
        signals: dict[str, torch.Tensor] = {}  # one pass over the pool per signal, shared by the strategies
        for strategy in ("random", "uncertainty", "diversity"):
            tic = time.perf_counter()
            cfg = SelectConfig(k=self.args.k, strategy=strategy, balance=self.args.balance, seed=self.args.seed)
            chosen = select(model, pool, cfg, signals)
            picked = [pool[i] for i in chosen.indices]
            labels = {lab: sum(ex.label == lab for ex in picked) for lab in sorted({ex.label for ex in pool})}
            seconds = round(time.perf_counter() - tic, 1)
            print(f"  {strategy}: chose {len(picked)} in {seconds} s, labels {labels}", flush=True)
            self.tune(f"active {strategy} (k={self.args.k}) + prompt_tuning", "active", picked)
            self.rows[-1].update(select_seconds=seconds, chosen_labels=labels, pool=len(pool))

    # ---- ensembles ----------------------------------------------------------------------------------------------
    def ensembles(self) -> None:
        tic = time.perf_counter()
        names = list(self.learned)
        probs = torch.stack([self.learned[n] for n in names])  # (M, N, C): each member scored the test set once
        for how in ("mean", "vote"):
            metrics = score_metrics(self.head, self.test, combine(probs, how))  # as PromptEnsemble.evaluate_all
            self.record(f"ensemble of {len(names)} learned prompts ({how})", "ensemble", metrics, tic, members=names)

    def report(self) -> str:
        lines = [
            f"# Verbalizers, active selection, ensembles: {self.args.dataset} 16-shot, seed {self.args.seed}, "
            f"{self.args.model}",
            "",
            f"Test rows: {len(self.test)}. Dev (selection, calibrate=auto): the seed's 16-shot dev file.",
            "",
            "| group | row | test accuracy | macro-F1 | seconds |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['group']} | {r['row']} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | "
                f"{r['seconds']:.0f} |"
            )
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.utils.logging.disable_progress_bar()
    wall = time.perf_counter()
    bench = Bench(args)
    print(f"{args.dataset} seed {args.seed}, {args.model}, {len(bench.test)} test rows -> {args.out}", flush=True)
    bench.zero_shot()
    bench.prompt_tuning()
    bench.active()
    bench.ensembles()
    name = f"{args.dataset}__{args.seed}"
    record = {
        "dataset": args.dataset,
        "seed": args.seed,
        "model": args.model,
        "n_test": len(bench.test),
        "test_subset": "full" if args.test_limit is None else f"stratified sample, seed {grid.TEST_SUBSET_SEED}",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": bench.rows,
        "wall_seconds": round(time.perf_counter() - wall, 1),
        **grid.environment(),
    }
    grid.write_json(args.out / f"{name}.json", record)
    (args.out / f"{name}.md").write_text(bench.report())
    print(bench.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
