"""`prompttune <verb>`: models, train, eval, predict, generate, export, import-peft, select, ensemble.

Every config flag is generated from the config dataclasses (`TaskConfig`, `TrainConfig`, `DataConfig` and the chosen
method's config) and their attribute docstrings, so Python, YAML and the CLI share one source. `train` parses
`--method`/`--config` first and then adds that method's own flags. User errors print one `error: ...` line on stderr
and exit with code 2; a traceback means a bug in prompttune. In text flags (templates, separators, init texts)
`\\n`, `\\t` and `\\\\` are a newline, a tab and a backslash, as in Python strings; paths are taken as typed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .cliutil import add_config_flags, fmt, make_verb, preparsed, print_table
from .config import DataConfig, RunConfig, TaskConfig, TrainConfig, field_docs, read_yaml_mapping
from .errors import PromptTuneError

SECTIONS = {"task": TaskConfig, "train": TrainConfig, "data": DataConfig}
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the same shape as every other user error)."""

    def error(self, message: str) -> typing.NoReturn:
        raise PromptTuneError(f"{message} (see `{self.prog} --help`)")


def read_run_config(path: str | Path) -> RunConfig:
    """A RunConfig from a YAML file (same structure as `RunConfig.from_dict`)."""
    return RunConfig.from_dict(read_yaml_mapping(path), where=str(path))


# ---- verbs ----------------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    """List the embedded models."""
    from . import zoo

    rows = zoo.list_models()
    table = [[r["name"], r["kind"], r["params"], "yes" if r["installed"] else "no", r["cached"] or "-"] for r in rows]
    print_table(args, ["name", "kind", "params", "installed", "cached"], table)
    return {"models": rows}


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train a prompt, score the test file once, save the artifact."""
    from .api import PromptTuner, make_config
    from .data.examples import find_split

    base = read_run_config(args.config) if args.config else None
    model = args.model or (base.model if base else RunConfig.model)
    method = args.method or (base.method if base else RunConfig.method)
    overrides = {name: getattr(args, name) for name in args.config_fields if hasattr(args, name)}
    cfg = make_config(model, method, base=base, **overrides)
    cfg.out = args.out or cfg.out
    if not cfg.out:
        raise PromptTuneError("no output directory: pass --out DIR (or set `out:` in the config)")
    if args.quiet:  # transformers' weight-loading bar too, not only ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tuner = PromptTuner(config=cfg)
    tic = time.perf_counter()
    result = tuner.fit(out=cfg.out, resume=args.resume, quiet=args.quiet)
    test = cfg.data.test
    if test is None and cfg.data.train and Path(cfg.data.train).is_dir():
        test = find_split(cfg.data.train, "test")
    test_metrics = tuner.evaluate(test) if test else None
    assert tuner.model is not None
    params = tuner.model.method.num_trainable() + sum(p.numel() for p in tuner.model.head.parameters())
    metrics = {
        "dev": result.best_dev,
        "test": test_metrics,
        "seconds": round(time.perf_counter() - tic, 3),  # what the user waited: training, dev and test evaluation
        "train_seconds": round(result.seconds, 3),  # optimizer steps only
        "trainable_params": params,
    }
    tuner.save(cfg.out, metrics)
    summary = {"out": str(cfg.out), "model": cfg.model, "method": cfg.method, "steps": result.steps}
    summary.update(best_step=result.best_step, **metrics)
    rows = [[k, str(summary[k])] for k in ("model", "method", "trainable_params", "steps", "best_step")]
    rows.append(["seconds", f"{summary['seconds']:.1f}"])
    for split in ("dev", "test"):
        if summary[split]:
            key = summary[split]["primary_metric"]
            rows.append([f"{split} {key}", fmt(summary[split][key])])
    print_table(args, ["", ""], rows + [["artifact", str(cfg.out)]], header=False)
    return summary


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of a saved artifact on a labelled file."""
    from .api import PromptTuner

    metrics = PromptTuner.load(args.dir).evaluate(args.data, args.batch_size)
    rows = [[k, fmt(v)] for k, v in metrics.items() if k != "primary_metric"]
    print_table(args, ["metric", "value"], rows)
    return metrics


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Labels (classifier heads) or generations (generation head) for raw texts."""
    from .api import PromptTuner

    if bool(args.texts) == bool(args.data):
        raise PromptTuneError("predict: give either TEXTs or --data FILE")
    tuner = PromptTuner.load(args.dir)
    inputs = tuner.load_data(args.data or _inputs(tuner, args.texts), require_label=False)
    texts = [" | ".join(e.fields.values()) for e in inputs] if args.data else args.texts
    labels, scores, names = tuner.predict_with_scores(inputs)
    if args.out:
        _write_predictions(args.out, inputs, labels)
    out = []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        label = list(label) if isinstance(label, tuple) else label
        item = {"text": text, "label": label}
        if scores is not None:
            item["scores"] = dict(zip(names, [round(s, 6) for s in scores[i].tolist()], strict=True))
        out.append(item)
        if not args.json and not args.out:
            print(f"{','.join(label) if isinstance(label, list) else label}\t{text}")
    if args.out and not args.json:
        print(f"wrote {len(out)} predictions to {args.out}")
    return {"predictions": out, "out": args.out}


def _write_predictions(path: str, examples: Sequence[Any], predictions: Sequence[Any]) -> None:
    """The input rows with a `prediction` column (and their gold `label` column, where they had one)."""
    from .data.examples import write_examples
    from .types import Example

    rows = []
    for ex, pred in zip(examples, predictions, strict=True):
        gold = {} if ex.label is None else {"label": ",".join(ex.label) if isinstance(ex.label, tuple) else ex.label}
        rows.append(Example({**ex.fields, **gold}, tuple(pred) if isinstance(pred, list) else pred, ex.source))
    write_examples(path, rows, "prediction")


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy generations with the learned prompt."""
    from .api import PromptTuner

    if not args.texts:
        raise PromptTuneError("generate: give at least one TEXT")
    tuner = PromptTuner.load(args.dir)
    texts = tuner.generate(_inputs(tuner, args.texts), args.max_new_tokens)
    if not args.json:
        for text in texts:
            print(text.replace("\n", "\\n"))  # one line per input
    return {"generations": [{"text": t, "generation": g} for t, g in zip(args.texts, texts, strict=True)]}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """Write a PEFT adapter directory."""
    from .peft_compat import export_peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # returned and printed below, once
        notes = export_peft(args.dir, args.out)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if not args.json:
        print(f"wrote PEFT adapter to {args.out}")
    return {"out": str(args.out), "format": args.format, "warnings": notes}


def cmd_import_peft(args: argparse.Namespace) -> dict[str, Any]:
    """Turn a PEFT prompt-tuning adapter into a prompttune artifact."""
    from .peft_compat import front_warnings, import_peft

    task = {name: getattr(args, name) for name in args.config_fields if hasattr(args, name)}
    template = task.pop("template", TaskConfig.template)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed below, once
        out = import_peft(args.peft_dir, args.model, template, task.pop("verbalizer", None), args.out, **task)
    notes = front_warnings(template)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if not args.json:
        print(f"wrote prompttune artifact to {out}")
    return {"out": str(out), "warnings": notes}


# ---- helpers --------------------------------------------------------------------------------------------------------
def _inputs(tuner: Any, texts: Sequence[str]) -> list[Any]:
    """A JSON object gives several fields; a plain string fills the template's only field."""
    fields = list(dict.fromkeys(tuner.template.fields))
    out: list[Any] = []
    for text in texts:
        if text.lstrip().startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(text)
                if isinstance(value, dict):
                    out.append({k: str(v) for k, v in value.items()})
                    continue
        out.append({fields[0]: text} if len(fields) == 1 else text)
    return out


# ---- parser ---------------------------------------------------------------------------------------------------------
def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; `argv` decides which method's flags `train` gets."""
    from .data.fewshot import add_select_verb
    from .ensemble import add_ensemble_verb
    from .registry import HEADS, METHODS, lookup

    parser = _Parser(prog="prompttune", description="Learn prompts for frozen pretrained models.", allow_abbrev=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    make_verb(verbs, "models", "list the embedded models", cmd_models, None)

    method = preparsed(argv, "train", "--method", lambda path: read_run_config(path).method, RunConfig.method)
    method_cls = lookup(METHODS, method, "method")
    p = make_verb(verbs, "train", "train a prompt and save an artifact", cmd_train, None)
    run_docs = field_docs(RunConfig)
    p.add_argument("--model", help=f"{run_docs['model'].rstrip('.')} (default: {RunConfig.model})")
    methods = ", ".join(sorted(METHODS))
    p.add_argument("--method", help=f"{run_docs['method'].rstrip('.')}: {methods} (default: {method})")
    p.add_argument("--config", metavar="RUN_YAML", help="YAML run config giving defaults; flags override it")
    p.add_argument("--out", metavar="DIR", help="artifact directory (also holds the checkpoint and metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    taken: set[str] = set()
    fields = add_config_flags(p, method_cls.config_cls, f"method {method}", taken)
    head = preparsed(argv, "train", "--head", lambda path: read_run_config(path).task.head, TaskConfig.head)
    head_cls = lookup(HEADS, head, "head")
    if head_cls.config_cls is not None:  # the head's own options (kpt, soft_verbalizer, ...)
        fields += add_config_flags(p, head_cls.config_cls, f"head {head}", taken)
    for name, cls in SECTIONS.items():
        fields += add_config_flags(p, cls, name, taken)
    p.set_defaults(config_fields=fields)

    p = make_verb(verbs, "eval", "metrics of a saved artifact on labelled data", cmd_eval)
    p.add_argument("--data", required=True, metavar="FILE", help="labelled TSV/CSV/JSONL file")
    p.add_argument("--batch-size", type=int, help="examples per batch (default: the run's eval_batch_size)")
    for verb, func, what in (("predict", cmd_predict, "labels"), ("generate", cmd_generate, "greedy generations")):
        p = make_verb(verbs, verb, f"{what} for raw texts", func)
        p.add_argument("texts", nargs="*", metavar="TEXT", help="input text, or a JSON object of template fields")
    p.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: the artifact's)")
    p = verbs.choices["predict"]
    p.add_argument("--data", metavar="FILE", help="TSV/CSV/JSONL of inputs instead of TEXTs (a label column is kept)")
    p.add_argument("--out", metavar="FILE", help="write the rows with a `prediction` column (.tsv/.csv/.jsonl)")

    p = make_verb(verbs, "export", "write an artifact in another format (PEFT)", cmd_export)
    p.add_argument("--format", choices=["peft"], default="peft", help="target format (default: peft)")
    p.add_argument("--out", required=True, metavar="DIR2", help="directory to write")
    p = make_verb(
        verbs, "import-peft", "turn a PEFT prompt-tuning adapter into an artifact", cmd_import_peft, "PEFT_DIR"
    )
    p.add_argument("--model", required=True, help=run_docs["model"])
    p.add_argument("--out", required=True, metavar="DIR", help="artifact directory to write")
    p.set_defaults(config_fields=add_config_flags(p, TaskConfig, "task", set()))
    add_select_verb(verbs, make_verb)
    add_ensemble_verb(verbs, make_verb)
    from .discrete.cli import add_search_parser

    add_search_parser(verbs, argv)
    from .serve.cli import add_serve_parser

    add_serve_parser(verbs)
    return parser


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """A warning for a person at a terminal: its message, not the library line that raised it."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    try:
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit as done:  # --help, or argparse's own exit
            return int(done.code or 0)
        # With --json, stdout carries exactly one JSON object: progress and log lines go to stderr.
        quiet_stdout = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
        with quiet_stdout, warnings.catch_warnings():
            warnings.showwarning = _show_warning  # restored on exit
            payload = args.func(args)
        if args.json:
            print(json.dumps(payload, default=str), file=stdout)
        return 0
    except (PromptTuneError, OSError, yaml.YAMLError) as err:
        message = str(err)
        if isinstance(err, OSError) and err.filename is not None:
            message = f"{err.filename}: {err.strerror or message}"
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
