"""Discrete prompt benchmark: 16-shot SST-2 / MR / CR, SmolLM2-135M as the (black-box) task model.

    python benchmarks/discrete.py --datasets sst-2 --seeds 13              # one seed; resumable, seeded
    python benchmarks/discrete.py                                          # the grid: 3 datasets x 5 seeds
    python benchmarks/discrete.py --model tiny-llama --test-limit 40 --budget 150 --results /tmp/d   # smoke run
    python benchmarks/discrete.py --report-only                            # rewrite the report from the JSON files

Methods (one row each; the same template, verbalizer, budget and best-on-dev selection for all):
manual prompt (the template alone), positive thinking (hand-written phrases, best on dev), random search, in-context
demonstrations (balanced random sets; and TF-IDF nearest neighbours per input), PromptQuine, OPRO-style (without and
with chain-of-thought) and every other registered optimiser asked for with `--methods` (e.g. rlprompt).

The learning optimisers (rlprompt, rlprompt_pg, unsupervised, directional_stimulus) need far more calls than the
default budget (one RLPrompt step scores 8 prompts x 8 examples); run them with their baselines at a larger budget
into their own folder, e.g.

    python benchmarks/discrete.py --datasets sst-2 --budget 2000 --test-limit 300 \
        --methods manual,random,icl,rlprompt,rlprompt_pg,unsupervised,directional_stimulus \
        --results benchmarks/results/discrete_rl

`unsupervised` never reads the training labels (its dev selection does, like every row's).

Protocol (RLPrompt, Deng et al., 2022, arXiv 2205.12548): search on the 16-per-class train file, select on the dev
file of the same size, report test accuracy; mean (std) over data seeds. Every search spends at most `--budget` LLM
calls (dev selection included, test excluded). One JSON per (dataset, seed, method) in `results/discrete/`, written
atomically; a finished cell is skipped and an interrupted one resumes from its search checkpoint. `--test-limit N`
scores a fixed, seeded N-row subset of the test file (the same rows for every method) to keep CPU runs short; the
report states n_test. `report.py` includes the section this script renders (`section()`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results" / "discrete"
DATASETS = ("sst-2", "mr", "cr")
SEEDS = (13, 21, 42, 87, 100)
TEMPLATE = "Review: {text}\n{prompt}Sentiment:{answer}"
VERBALIZER = {"0": [" negative"], "1": [" positive"]}
# Benchmark row -> (optimizer, options). Options are fields of the optimiser's config.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "manual": ("manual", {}),
    "positive_thinking": ("manual", {"prompts": "POSITIVE_THINKING"}),
    "random": ("random", {"num_tokens": 5, "per_step": 4}),
    "icl": ("icl", {"k": 4, "selection": "per_class", "per_step": 2}),
    "icl_knn": ("icl", {"k": 4, "selection": "similarity"}),
    "promptquine": ("promptquine", {"shots_per_class": 2, "population": 6, "offspring": 4}),
    "opro": ("opro", {"per_step": 4}),
    "opro_cot": ("opro", {"per_step": 2, "cot": True}),
    # Small steps so that a few hundred calls still make several policy updates (the paper: 16 prompts x 32 inputs).
    "rlprompt": ("rlprompt", {"prompts_per_step": 4, "examples_per_step": 8, "eval_every": 2}),
    "rlprompt_pg": ("rlprompt", {"algorithm": "pg"}),
    "unsupervised": ("unsupervised", {}),
    "directional_stimulus": ("directional_stimulus", {}),
}
DEFAULT_METHODS = ("manual", "positive_thinking", "random", "icl", "promptquine", "opro", "opro_cot", "rlprompt")
REFERENCE_SMALL_SST2 = {"distilGPT-2": 72.2, "GPT-2 small (124M)": 80.5}  # RLPrompt, 2-token prompts, SST-2 test


def _options(options: dict[str, Any]) -> dict[str, Any]:
    from prompttune.discrete.opro import POSITIVE_THINKING

    return {k: (list(POSITIVE_THINKING) if v == "POSITIVE_THINKING" else v) for k, v in options.items()}


def test_rows(dataset: str, limit: int) -> list[Any]:
    """The test file, or a seeded subset of `limit` rows (the same for every method and seed)."""
    from prompttune.data.examples import load_examples

    rows = load_examples(DATA / dataset / "16-shot" / "test.tsv")
    if limit and limit < len(rows):
        rows = random.Random(1234).sample(rows, limit)
    return rows


def run_cell(dataset: str, seed: int, name: str, args: argparse.Namespace, llm: Any, test: list[Any]) -> dict:
    from prompttune.discrete.api import search
    from prompttune.registry import OPTIMIZERS, _ensure_loaded

    _ensure_loaded()
    optimizer, options = METHODS[name]
    if optimizer not in OPTIMIZERS:
        raise SystemExit(f"optimizer {optimizer!r} is not registered (have: {', '.join(sorted(OPTIMIZERS))})")
    split = DATA / dataset / "16-shot" / f"16-{seed}"
    runs = args.results / "runs" / f"{dataset}__{seed}__{name}"
    resume = (runs / "checkpoint.json").is_file()
    tic = time.perf_counter()
    result = search(
        split / "train.tsv", split / "dev.tsv", test, optimizer=optimizer, out=runs, resume=resume, quiet=True,
        llm=llm, template=TEMPLATE, verbalizer=VERBALIZER, budget=args.budget, seed=seed, select_top=args.select_top,
        **_options(options),
    )  # fmt: skip
    best = result.best.to_dict()
    return {
        "dataset": dataset,
        "seed": seed,
        "method": name,
        "optimizer": optimizer,
        "options": _options(options),
        "model": args.model,
        "backend": args.backend,
        "budget": args.budget,
        "test": result.test,
        "dev": result.dev,
        "calls": result.calls,
        "tokens": result.tokens,
        "search_seconds": result.seconds,
        "seconds": round(time.perf_counter() - tic, 3),  # search + dev selection + test scoring
        "steps": result.steps,
        "stopped": result.stopped,
        "resumed": resume,
        "prompt": {k: (v[:500] if isinstance(v, str) else v) for k, v in best.items() if k != "example_demos"},
        "n_test": len(test),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
    }


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


# ---- report ----------------------------------------------------------------------------------------------------
def _load(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{100 * mean:.1f} ({100 * statistics.stdev(values):.1f})" if len(values) > 1 else f"{100 * mean:.1f}"


def section(folder: Path = RESULTS, title: str = "Discrete prompts (black-box search)") -> list[str]:
    """Markdown lines for REPORT.md (empty when there are no results)."""
    records = _load(folder)
    if not records:
        return []
    lines = [
        f"## {title}",
        "",
        f"Generated by `benchmarks/discrete.py` from `results/{Path(folder).name}/*.json`. The task model (named "
        f"below) is used as a black box through its label-word log-probabilities; template `{TEMPLATE!r}`, label words "
        "' negative' / ' positive', every search limited to the same LLM-call budget (dev selection included), "
        "best candidate chosen on dev, test accuracy mean (std) over seeds. "
        "Calls, steps and seconds are per search (seconds include scoring the test rows; a call is one prompt scored "
        "on one example or one text generated). A search whose dev selection and first step do not fit the budget "
        "shows 0 steps: it returns the manual prompt (OPRO with chain-of-thought pays two calls per example).",
        "",
    ]
    models = sorted({f"{r['model']} via {r['backend']}" for r in records})
    lines += [f"- Task model: {', '.join(models)}; budgets: {sorted({r['budget'] for r in records})} calls.", ""]
    for dataset in [d for d in DATASETS if any(r["dataset"] == d for r in records)]:
        rows = [r for r in records if r["dataset"] == dataset]
        lines += [
            f"### {dataset}",
            "",
            "| method | seeds | test acc % mean (std) | Δ vs manual pp (same seeds) | found a prompt ≠ manual "
            "| dev acc % | LLM calls | search steps | seconds | n_test "
            f"| example prompt (seed {min(r['seed'] for r in rows)}) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        manual = {r["seed"]: r["test"]["accuracy"] for r in rows if r["method"] == "manual" and r.get("test")}
        names = [m for m in METHODS if any(r["method"] == m for r in rows)]
        for name in names:
            cell = sorted((r for r in rows if r["method"] == name), key=lambda r: r["seed"])
            test = [r["test"]["accuracy"] for r in cell if r.get("test")]
            dev = [r["dev"]["accuracy"] for r in cell if r.get("dev")]
            prompt = cell[0]["prompt"]
            shown = (prompt.get("demos", "") + prompt.get("text", "")).replace("\n", "⏎").replace("|", "\\|")
            calls, seconds = statistics.fmean(r["calls"] for r in cell), statistics.fmean(r["seconds"] for r in cell)
            deltas = [100 * (r["test"]["accuracy"] - manual[r["seed"]]) for r in cell if r["seed"] in manual]
            delta = f"{statistics.fmean(deltas):+.1f} (n={len(deltas)})" if deltas and name != "manual" else "–"
            found = sum(bool(r["prompt"].get("text") or r["prompt"].get("demos")) for r in cell)
            lines.append(
                f"| {name} | {len(cell)}/{len(SEEDS)} | {_ms(test)} | {delta} | {found}/{len(cell)} "
                f"| {_ms(dev).split(' ')[0]} | {calls:.0f} | {statistics.fmean(r.get('steps', 0) for r in cell):.0f} "
                f"| {seconds:.0f} | {cell[0]['n_test']} "
                f"| `{shown[:80] or '(empty)'}` |"
            )
        lines.append("")
    lines += [
        "Published RLPrompt results on SST-2 with small task models (2-token prompts, full test set): "
        + ", ".join(f"{m} {v}" for m, v in REFERENCE_SMALL_SST2.items())
        + ". Our task model differs, so these are a bar, not a like-for-like comparison.",
        "",
    ]
    return lines


def write_report(folder: Path) -> Path:
    out = folder / "REPORT.md"
    text = "\n".join(["# Discrete prompt benchmark", ""] + (section(folder)[1:] or ["No results yet."]))
    tmp = out.with_name(".REPORT.md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--budget", type=int, default=400, help="LLM calls per search, dev selection included")
    p.add_argument("--select-top", type=int, default=2, help="best candidates re-scored on dev (+ the manual prompt)")
    p.add_argument("--test-limit", type=int, default=0, help="score a fixed random subset of N test rows (0 = all)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--backend", default="hf", choices=["hf", "llama_cpp"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        print(f"wrote {write_report(args.results)}")
        return
    import torch

    from prompttune.llm.base import BackendConfig, load_backend

    torch.set_num_threads(args.threads)
    llm = load_backend(BackendConfig(backend=args.backend, model=args.model, threads=args.threads))
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    for dataset in args.datasets.split(","):
        test = test_rows(dataset, args.test_limit)
        for seed in map(int, args.seeds.split(",")):
            for name in methods:
                path = args.results / f"{dataset}__{seed}__{name}.json"
                if path.is_file():
                    continue
                record = run_cell(dataset, seed, name, args, llm, test)
                write_json(path, record)
                acc = record["test"]["accuracy"] if record["test"] else float("nan")
                print(
                    f"{dataset} seed {seed} {name}: test acc {100 * acc:.1f}, {record['calls']} calls, "
                    f"{record['seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                write_report(args.results)
    print(f"wrote {write_report(args.results)}")


if __name__ == "__main__":
    main()
