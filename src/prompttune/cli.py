"""`prompttune <verb>`: models, train, eval, predict, generate, export, import-peft, select, ensemble.

Every config flag is generated from the config dataclasses (`TaskConfig`, `TrainConfig`, `DataConfig` and the chosen
method's config) and their attribute docstrings, so Python, YAML and the CLI share one source. `train` parses
`--method`/`--config` first and then adds that method's own flags. User errors print one `error: ...` line on stderr
and exit with code 2; a traceback means a bug in prompttune.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import DataConfig, RunConfig, TaskConfig, TrainConfig, field_docs, read_yaml_mapping
from .errors import PromptTuneError

SECTIONS = {"task": TaskConfig, "train": TrainConfig, "data": DataConfig}
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the same shape as every other user error)."""

    def error(self, message: str) -> typing.NoReturn:
        raise PromptTuneError(f"{message} (see `{self.prog} --help`)")


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_METAVARS: dict[Any, str] = {int: "N", float: "X", _comma_list: "A,B,..."}


def _flag_type(hint: Any) -> Any:
    """`bool`, or the converter for one field's CLI string (dicts such as the verbalizer parse in the config)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin in (bool, int, float, str):
        return origin
    return _comma_list if origin is list else str


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, taken: set[str]) -> list[str]:
    """Add `--field-name` for each field of a config dataclass (bools as `--x/--no-x`); returns the field names.

    Defaults are suppressed, so the namespace holds only what the user typed and YAML values are kept otherwise.
    """
    group = parser.add_argument_group(title)
    hints, docs, names = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if f.name in taken:  # a method field shadows a section field, as in `api.split_kwargs`
            continue
        taken.add(f.name)
        names.append(f.name)
        doc = docs.get(f.name, "").rstrip(".")
        if "default:" not in doc:
            doc += f" (default: {f.default if f.default is not dataclasses.MISSING else None})"
        help_text = doc.replace("%", "%%")
        kind = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = _METAVARS.get(kind, "TEXT") if cls is not DataConfig else "PATH"
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    return names


def read_run_config(path: str | Path) -> RunConfig:
    """A RunConfig from a YAML file (same structure as `RunConfig.from_dict`)."""
    return RunConfig.from_dict(read_yaml_mapping(path), where=str(path))


# ---- verbs ----------------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    """List the embedded models."""
    from . import zoo

    rows = zoo.list_models()
    table = [[r["name"], r["kind"], r["params"], "yes" if r["installed"] else "no", r["cached"] or "-"] for r in rows]
    _print_table(args, ["name", "kind", "params", "installed", "cached"], table)
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
            rows.append([f"{split} {key}", _fmt(summary[split][key])])
    _print_table(args, ["", ""], rows + [["artifact", str(cfg.out)]], header=False)
    return summary


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of a saved artifact on a labelled file."""
    from .api import PromptTuner

    metrics = PromptTuner.load(args.dir).evaluate(args.data, args.batch_size)
    rows = [[k, _fmt(v)] for k, v in metrics.items() if k != "primary_metric"]
    _print_table(args, ["metric", "value"], rows)
    return metrics


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Labels (classifier heads) or generations (generation head) for raw texts."""
    from .api import PromptTuner

    tuner = PromptTuner.load(args.dir)
    assert tuner.model is not None
    inputs = _inputs(tuner, args.texts)
    if not tuner.model.head.is_classifier:
        labels, scores = tuner.predict(inputs), None
    else:
        scores = tuner.predict_scores(inputs)
        labels = tuner.model.head.decide(scores)
    out = []
    for i, (text, label) in enumerate(zip(args.texts, labels, strict=True)):
        label = list(label) if isinstance(label, tuple) else label
        item = {"text": text, "label": label}
        if scores is not None:
            item["scores"] = dict(zip(tuner.model.head.labels, [round(s, 6) for s in scores[i].tolist()], strict=True))
        out.append(item)
        if not args.json:
            print(f"{','.join(label) if isinstance(label, list) else label}\t{text}")
    return {"predictions": out}


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy generations with the learned prompt."""
    from .api import PromptTuner

    tuner = PromptTuner.load(args.dir)
    if tuner.backbone.kind != "causal_lm":
        raise PromptTuneError(f"{args.dir}: generation needs a causal LM, the backbone is an encoder")
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
    fields = list(dict.fromkeys(tuner.model.template.fields))
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


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_table(args: argparse.Namespace, headers: list[str], rows: list[list[str]], header: bool = True) -> None:
    if args.json:
        return
    table = ([headers] if header else []) + rows
    widths = [max(len(str(r[i])) for r in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# ---- parser ---------------------------------------------------------------------------------------------------------
def preparsed(argv: Sequence[str], verb: str, flag: str, from_config: Callable[[str], str], default: str) -> str:
    """What `verb` will use for `flag` (the flag, else the `--config` file's value, else `default`), read before the
    real parse because it decides which flags exist (a method's, a head's, an optimiser's)."""
    if argv[:1] != [verb]:
        return default
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[1:])
    value = getattr(known, flag.lstrip("-").replace("-", "_"))
    if value:
        return value
    return from_config(known.config) if known.config else default


def _verb(verbs: Any, name: str, help_text: str, func: Any, positional: str | None = "DIR") -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    if positional:
        p.add_argument(positional.lower(), metavar=positional)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=func)
    return p


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; `argv` decides which method's flags `train` gets."""
    from .data.fewshot import add_select_verb
    from .ensemble import add_ensemble_verb
    from .registry import HEADS, METHODS, lookup

    parser = _Parser(prog="prompttune", description="Learn prompts for frozen pretrained models.", allow_abbrev=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    _verb(verbs, "models", "list the embedded models", cmd_models, None)

    method = preparsed(argv, "train", "--method", lambda path: read_run_config(path).method, RunConfig.method)
    method_cls = lookup(METHODS, method, "method")
    p = _verb(verbs, "train", "train a prompt and save an artifact", cmd_train, None)
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

    p = _verb(verbs, "eval", "metrics of a saved artifact on labelled data", cmd_eval)
    p.add_argument("--data", required=True, metavar="FILE", help="labelled TSV/CSV/JSONL file")
    p.add_argument("--batch-size", type=int, help="examples per batch (default: the run's eval_batch_size)")
    for verb, func, what in (("predict", cmd_predict, "labels"), ("generate", cmd_generate, "greedy generations")):
        p = _verb(verbs, verb, f"{what} for raw texts", func)
        p.add_argument("texts", nargs="+", metavar="TEXT", help="input text, or a JSON object of template fields")
    p.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: the artifact's)")

    p = _verb(verbs, "export", "write an artifact in another format (PEFT)", cmd_export)
    p.add_argument("--format", choices=["peft"], default="peft", help="target format (default: peft)")
    p.add_argument("--out", required=True, metavar="DIR2", help="directory to write")
    p = _verb(verbs, "import-peft", "turn a PEFT prompt-tuning adapter into an artifact", cmd_import_peft, "PEFT_DIR")
    p.add_argument("--model", required=True, help=run_docs["model"])
    p.add_argument("--out", required=True, metavar="DIR", help="artifact directory to write")
    p.set_defaults(config_fields=add_config_flags(p, TaskConfig, "task", set()))
    add_select_verb(verbs, _verb)
    add_ensemble_verb(verbs, _verb)
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
