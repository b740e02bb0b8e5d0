"""Benchmark grid: 16-shot SST-2, MR, CR, SST-5 x 5 data seeds x prompt methods, plus the PEFT baseline.

    python benchmarks/run.py                      # the full grid (resumable: finished cells are skipped)
    python benchmarks/run.py --quick              # smoke run: 1 seed, 200 test rows, 30 steps -> results/quick/
    python benchmarks/run.py --timing-only        # 10 training steps per method on sst-2 seed 13 -> results/timing/
    python benchmarks/run.py --datasets sst-2 --seeds 13,21 --methods prompt_tuning,dept --max-cells 4

Protocol (RLPrompt's, Deng et al., 2022, arXiv 2205.12548): train on 16 examples per class, select on the dev file
of the same size, report test accuracy. One JSON per (dataset, seed, method) cell in `benchmarks/results/`, written
atomically; `report.py` turns them into `REPORT.md` and runs at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # peft_baseline and report live next to this script

import peft_baseline  # noqa: E402
import report  # noqa: E402

from prompttune import PromptTuner  # noqa: E402
from prompttune.api import hint_text, make_config  # noqa: E402
from prompttune.backbones import load_backbone  # noqa: E402
from prompttune.data.examples import load_examples  # noqa: E402
from prompttune.evaluation import score_metrics  # noqa: E402
from prompttune.types import Example  # noqa: E402

MODEL = "smollm2-135m"
THREADS = 2  # the machine's two cores; on a CPU shared with other jobs, `--threads 1` times far more steadily
DATASETS, SEEDS, METHODS = report.DATASETS, report.SEEDS, report.METHODS  # the grid is defined once, in report.py
_BINARY = {0: " negative", 1: " positive"}
TASKS: dict[str, dict[str, Any]] = {
    "sst-2": {"template": "Review: {text}\n{soft}Sentiment:{answer}", "verbalizer": _BINARY},
    "mr": {"template": "Review: {text}\n{soft}Sentiment:{answer}", "verbalizer": _BINARY},
    "cr": {"template": "Review: {text}\n{soft}Sentiment:{answer}", "verbalizer": _BINARY},
    "sst-5": {
        "template": "Review: {text}\n{soft}Rating:{answer}",
        "verbalizer": {0: " terrible", 1: " bad", 2: " okay", 3: " good", 4: " great"},
    },
}
# Benchmark name -> (registered method, options). DePT keeps its defaults: 8 tokens + rank 4 x 576 positions is
# the same 9,216 trainable parameters as 16 prompt-tuning tokens on a 576-wide model.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "manual": ("manual", {}),
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 16}),
    "prompt_tuning_nocache": ("prompt_tuning", {"num_virtual_tokens": 16, "cache_prefix": False}),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 16}),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 16}),
    "dept": ("dept", {}),
    # EPT defaults: 8 fused tokens, rank-2 knowledge, 2 subspaces of rank 1 = 9,232 parameters (the same budget).
    "ept": ("ept", {}),
    # BayesPrompt: 16 tokens sampled from a mixture (one component per class) of the training examples' mean final
    # hidden states, then trained as they are: 9,216 parameters, like prompt tuning; only the starting tokens differ.
    "bayesprompt": ("bayesprompt", {"num_virtual_tokens": 16}),
    # Deep prompts (P-tuning v2 style): 16 slots with a vector at each of the 30 layers = 276,480 parameters.
    "deep_prompt": ("deep_prompt", {"num_virtual_tokens": 16}),
    # IAPT defaults: 4 tokens generated per layer by a width-16 bottleneck from the review = 624,300 parameters.
    "iapt": ("iapt", {}),
    "peft_prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 16}),  # our config only supplies shared settings
}
TEST_SUBSET_SEED = 0
DEFAULT_RESULTS = HERE / "results"


@dataclass(frozen=True)
class Cell:
    dataset: str
    seed: int
    method: str

    @property
    def name(self) -> str:
        return f"{self.dataset}__{self.seed}__{self.method}"


# ---- environment ------------------------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD, with `+dirty` when the working tree has changes (others edit in parallel)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True).stdout
        return head.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (so `ru_maxrss` becomes per cell); False where /proc refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def environment() -> dict[str, Any]:
    threads = torch.get_num_threads()
    return {
        "device": f"cpu, {threads} thread{'s' if threads > 1 else ''}",
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": _peft_version(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def _peft_version() -> str:
    try:
        import peft

        return peft.__version__
    except ImportError:
        return "not installed"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---- data -------------------------------------------------------------------------------------------------------
def stratified_subset(examples: list[Example], limit: int | None, seed: int = TEST_SUBSET_SEED) -> list[Example]:
    """A fixed, seeded, class-stratified sample of `limit` examples (file order kept); all of them when None."""
    if limit is None or limit >= len(examples):
        return examples
    by_label: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    rng = random.Random(seed)
    quotas = {lab: limit * len(idx) / len(examples) for lab, idx in by_label.items()}
    counts = {lab: int(q) for lab, q in quotas.items()}
    # largest remainder: hand the rows lost to rounding to the classes that lost most
    for lab in sorted(quotas, key=lambda lab: counts[lab] - quotas[lab])[: limit - sum(counts.values())]:
        counts[lab] += 1
    keep = [i for lab, idx in by_label.items() for i in rng.sample(idx, counts[lab])]
    return [examples[i] for i in sorted(keep)]


def test_subset_label(args: argparse.Namespace) -> str:
    if args.timing_only:
        return "none (timing only)"
    return "full" if args.test_limit is None else f"stratified sample, seed {TEST_SUBSET_SEED}"


def load_split(data_dir: Path, dataset: str, seed: int) -> tuple[list[Example], list[Example]]:
    folder = data_dir / dataset / "16-shot" / f"16-{seed}"
    return load_examples(folder / "train.tsv"), load_examples(folder / "dev.tsv")


def load_test(data_dir: Path, dataset: str, limit: int | None) -> list[Example]:
    return stratified_subset(load_examples(data_dir / dataset / "16-shot" / "test.tsv"), limit)


# ---- cells ------------------------------------------------------------------------------------------------------
def plan(datasets: list[str], seeds: list[int], methods: list[str]) -> list[Cell]:
    """Dataset-major, then seed, then method: all of sst-2 seed 13 first."""
    return [Cell(d, s, m) for d in datasets for s in seeds for m in methods]


def config_for(cell: Cell, train_overrides: dict[str, Any]):
    method, options = VARIANTS[cell.method]
    task = TASKS[cell.dataset]
    return make_config(
        MODEL,
        method,
        template=task["template"],
        verbalizer=task["verbalizer"],
        seed=cell.seed,
        **train_overrides,
        **options,
    )


class Runner:
    """Runs cells against one shared backbone; memoises the seed-independent manual-prompt test scores."""

    def __init__(self, args: argparse.Namespace, train_overrides: dict[str, Any]):
        self.args = args
        self.train_overrides = train_overrides
        self.backbone = load_backbone(MODEL)
        self.env = environment()
        self._tests: dict[str, list[Example]] = {}
        self._manual_raw: dict[str, torch.Tensor] = {}  # dataset -> uncalibrated test scores (N, C)
        warm_up(self.backbone)

    def test_set(self, dataset: str) -> list[Example]:
        if self.args.timing_only:
            return []
        if dataset not in self._tests:
            self._tests[dataset] = load_test(self.args.data_dir, dataset, self.args.test_limit)
        return self._tests[dataset]

    def run(self, cell: Cell) -> dict[str, Any]:
        gc.collect()
        scoped = reset_peak_rss()
        wall = time.perf_counter()
        train, dev = load_split(self.args.data_dir, cell.dataset, cell.seed)
        test = self.test_set(cell.dataset)
        cfg = config_for(cell, self.train_overrides)
        record: dict[str, Any] = {"dataset": cell.dataset, "seed": cell.seed, "method": cell.method}
        if cell.method == "peft_prompt_tuning":
            record.update(self._run_peft(cfg, train, dev, test))
        else:
            record.update(self._run_ours(cell, cfg, train, dev, test))
        record.update(
            n_test=len(test),
            test_subset=test_subset_label(self.args),
            peak_rss_mb=round(peak_rss_mb(), 1),
            peak_rss_scope="cell" if scoped else "process (peak could not be reset)",
            wall_seconds=round(time.perf_counter() - wall, 2),
            train_config=asdict(cfg.train),
            method_config=cfg.method_config,
            template=TASKS[cell.dataset]["template"],
            quick=self.args.quick,
            timing_only=self.args.timing_only,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            **self.env,
        )
        return record

    def _run_ours(self, cell: Cell, cfg, train, dev, test) -> dict[str, Any]:
        tuner = PromptTuner(config=cfg, backbone=self.backbone)
        rss_base = rss_mb()
        result = tuner.fit(train, None if self.args.timing_only else dev, quiet=True)
        peak_train = peak_rss_mb()
        model = tuner.model
        out: dict[str, Any] = {
            "base_method": cfg.method,
            "dev_best": result.best_dev.get("accuracy") if result.best_dev else None,
            "dev_best_step": result.best_step,
            "calibrated": bool(result.tuned.get("calibrated", False)),
            "steps": result.steps,
            "train_seconds": round(result.seconds, 3),
            "seconds_per_step": result.seconds_per_step if result.steps else None,
            "seconds_per_step_median": median([r["seconds"] for r in result.log if "seconds" in r]),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "rss_base_mb": round(rss_base, 1),
            "peak_rss_train_mb": round(peak_train, 1),
        }
        if test:
            prior = model.head.prior.detach().clone()  # (C,) what calibration subtracts (zeros when off)
            raw = self._manual_raw.get(cell.dataset) if cfg.method == "manual" else None
            out["manual_test_scores_shared"] = raw is not None
            if raw is None:
                raw = model.scores(test, cfg.train.eval_batch_size) + prior  # (N, C)
                if cfg.method == "manual":  # no parameters: only the dev-chosen calibration depends on the seed
                    self._manual_raw[cell.dataset] = raw
            calibrated = score_metrics(model.head, test, raw - prior)
            plain = score_metrics(model.head, test, raw)
            out.update(
                test_accuracy=calibrated["accuracy"],
                test_macro_f1=calibrated["macro_f1"],
                test_accuracy_uncalibrated=plain["accuracy"],
            )
        return out

    def _run_peft(self, cfg, train, dev, test) -> dict[str, Any]:
        model = peft_baseline.PeftPromptTuning(
            MODEL, cfg.task.template, cfg.task.verbalizer, cfg.method_config["num_virtual_tokens"], hint_text(cfg)
        )
        rss_base = rss_mb()
        result = peft_baseline.fit(model, train, None if self.args.timing_only else dev, cfg.train)
        peak_train = peak_rss_mb()
        out: dict[str, Any] = {
            "base_method": "peft.PromptTuningConfig",
            "dev_best": result["best_dev"]["accuracy"] if result["best_dev"] else None,
            "dev_best_step": result["best_step"],
            "calibrated": False,
            "steps": result["steps"],
            "train_seconds": round(result["seconds"], 3),
            "seconds_per_step": result["seconds_per_step"],
            "seconds_per_step_median": median(result["step_seconds"]),
            "trainable_params": sum(p.numel() for p in model.trainable()),
            "rss_base_mb": round(rss_base, 1),
            "peak_rss_train_mb": round(peak_train, 1),
            "init_text": hint_text(cfg),
        }
        if test:
            scores = model.metrics(test, cfg.train.eval_batch_size)
            out.update(
                test_accuracy=scores["accuracy"],
                test_macro_f1=scores["macro_f1"],
                test_accuracy_uncalibrated=scores["accuracy"],
            )
        return out


def warm_up(backbone: Any) -> None:
    """One forward + backward, so one-off library initialisation is not billed to the first cell's steps."""
    ids = torch.tensor([backbone.tokenizer("Review: a warm-up sentence.\nSentiment:")["input_ids"]])
    embeds = backbone.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    backbone.model(inputs_embeds=embeds).logits[:, -1].sum().backward()


# ---- command line -----------------------------------------------------------------------------------------------
def _csv(kind, allowed=None):
    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; expected some of {', '.join(map(str, allowed))}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 200 test rows, 30 steps; writes results/quick/")
    p.add_argument("--timing-only", action="store_true", help="10 training steps per method on sst-2 seed 13")
    p.add_argument("--datasets", type=_csv(str, DATASETS), default=None, help="comma list (default: all four)")
    p.add_argument("--seeds", type=_csv(int, SEEDS), default=None, help="comma list (default: 13,21,42,87,100)")
    p.add_argument("--methods", type=_csv(str, METHODS), default=None, help="comma list (default: all)")
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data", help="data root")
    p.add_argument("--test-limit", type=int, default=None, help="score a fixed stratified sample of N test rows")
    p.add_argument("--max-cells", type=int, default=None, help="run at most N missing cells, then stop")
    p.add_argument("--force", action="store_true", help="rerun cells whose result file exists")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (default: 2, the machine's cores)")
    p.add_argument("--repeats", type=int, default=3, help="--timing-only: interleaved rounds (median is kept)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where the main grid's JSON files go")
    args = p.parse_args(argv)
    if args.quick and args.timing_only:
        p.error("--quick and --timing-only are separate runs; pick one")
    return args


def settings(args: argparse.Namespace) -> tuple[list[Cell], Path, dict[str, Any]]:
    """Cells to consider, their result folder and the TrainConfig overrides of this kind of run."""
    datasets = args.datasets or list(DATASETS)
    seeds = args.seeds or list(SEEDS)
    methods = args.methods or list(METHODS)
    if args.timing_only:
        methods = [m for m in methods if m != "manual"]  # nothing to time: the manual prompt has no steps
        return plan(["sst-2"], [13], methods), args.results / "timing", {"max_steps": 10, "eval_every": 10}
    if args.quick:
        args.test_limit = 200 if args.test_limit is None else args.test_limit
        return plan(datasets, args.seeds or [SEEDS[0]], methods), args.results / "quick", {"max_steps": 30}
    return plan(datasets, seeds, methods), args.results, {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per PEFT cell drowns the log
    cells, out_dir, overrides = settings(args)
    todo = [c for c in cells if args.force or not (out_dir / f"{c.name}.json").exists()]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run -> {out_dir}", flush=True)
    todo = todo[: args.max_cells] if args.max_cells is not None else todo
    failed = 0
    if todo:
        runner = Runner(args, overrides)
        if args.timing_only:
            failed = run_timing(runner, todo, out_dir, args.repeats)
        else:
            for i, cell in enumerate(todo, 1):
                record = run_logged(runner, cell, out_dir, f"[{i}/{len(todo)}]")
                if record is None:
                    failed += 1
                else:
                    write_json(out_dir / f"{cell.name}.json", record)
    if args.quick or args.results.resolve() != DEFAULT_RESULTS:  # only the main grid writes benchmarks/REPORT.md
        folder = out_dir if args.quick else args.results
        report.main(["--results", str(folder), "--out", str(folder / "REPORT.md"), "--plots", str(folder)])
    else:
        report.main(["--results", str(args.results)])
    return 1 if failed else 0


def run_logged(runner: Runner, cell: Cell, out_dir: Path, tag: str) -> dict[str, Any] | None:
    """Run one cell; on failure write `<cell>.error.txt` (one broken cell must not sink an overnight grid)."""
    tic = time.perf_counter()
    error = out_dir / f"{cell.name}.error.txt"
    try:
        record = runner.run(cell)
    except Exception:
        error.parent.mkdir(parents=True, exist_ok=True)
        error.write_text(traceback.format_exc())
        print(f"{tag} {cell.name}: FAILED (see {error})", flush=True)
        return None
    error.unlink(missing_ok=True)
    print(f"{tag} {cell.name}: {summary(record)} ({time.perf_counter() - tic:.0f} s)", flush=True)
    return record


def run_timing(runner: Runner, cells: list[Cell], out_dir: Path, repeats: int) -> int:
    """Interleaved rounds over the methods (a shared CPU drifts); each method's figure is the median round."""
    rounds: dict[Cell, list[dict[str, Any]]] = {c: [] for c in cells}
    failed = 0
    for r in range(repeats):
        for cell in cells:
            record = run_logged(runner, cell, out_dir, f"[round {r + 1}/{repeats}]")
            if record is None:
                failed += 1
            else:
                rounds[cell].append(record)
    for cell, records in rounds.items():
        if not records:
            continue
        per_round = [rec["seconds_per_step"] for rec in records]
        record = dict(records[-1])
        record.update(
            seconds_per_step=median(per_round),
            seconds_per_step_rounds=per_round,
            seconds_per_step_min=min(per_round),
            peak_rss_train_mb=max(rec["peak_rss_train_mb"] for rec in records),
            peak_rss_mb=max(rec["peak_rss_mb"] for rec in records),
        )
        write_json(out_dir / f"{cell.name}.json", record)
    return failed


def summary(record: dict[str, Any]) -> str:
    parts = []
    if record.get("test_accuracy") is not None:
        parts.append(f"test acc {100 * record['test_accuracy']:.1f} (n={record['n_test']})")
    if record.get("seconds_per_step") is not None:
        parts.append(f"{record['seconds_per_step']:.3f} s/step")
    parts.append(f"peak {record['peak_rss_mb']:.0f} MB")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
