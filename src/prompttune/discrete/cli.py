"""`prompttune search`: discrete prompt search from the command line.

    prompttune search --backend hf --model smollm2-135m --optimizer promptquine --budget 2000 \\
        --train data/sst-2/16-shot/16-13/train.tsv --dev data/sst-2/16-shot/16-13/dev.tsv \\
        --template 'Review: {text}\\n{prompt}Sentiment:{answer}' --verbalizer '0= negative,1= positive' --out runs/pq

or from a YAML file laid out like an artifact's `run.yaml` (flags override it; `--config runs/pq/run.yaml` reruns
a finished search as it was):

    prompttune search --config configs/search/sst2_promptquine.yaml --budget 800 --out runs/pq2

Flags come from the config dataclasses (`SearchConfig`, `BackendConfig`, the task fields, `DataConfig`) and the
chosen optimiser's config, exactly as `train` builds its flags, so `--help` lists every option with its docstring.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..errors import PromptTuneError


def add_search_parser(verbs: Any, argv: Sequence[str]) -> None:
    """Add the `search` verb (its optimiser's flags depend on `--optimizer` in argv)."""
    from .. import cliutil as cli
    from ..config import DataConfig, TaskConfig
    from ..llm.base import BackendConfig
    from ..registry import OPTIMIZERS, lookup
    from .api import TASK_FIELDS, read_search_config
    from .config import SearchConfig

    name = cli.preparsed(
        argv, "search", "--optimizer", lambda path: read_search_config(path).get("optimizer", "random"), "random"
    )
    opt_cls = lookup(OPTIMIZERS, name, "optimizer")
    p = cli.make_verb(verbs, "search", "search a discrete (text) prompt for a black-box or local LLM", cmd_search, None)
    p.add_argument("--config", metavar="SEARCH_YAML", help="YAML search config (e.g. a run.yaml); flags override it")
    p.add_argument("--out", metavar="DIR", help="artifact directory (also holds checkpoint.json and search.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    taken = {"optimizer_config"}
    fields = cli.add_config_flags(p, opt_cls.config_cls, f"optimizer {name}", taken)
    fields += cli.add_config_flags(p, SearchConfig, "search", taken)
    fields += cli.add_config_flags(p, BackendConfig, "backend", taken)
    taken |= {f for f in TaskConfig.__dataclass_fields__ if f not in TASK_FIELDS}
    fields += cli.add_config_flags(p, TaskConfig, "task", taken)
    fields += cli.add_config_flags(p, DataConfig, "data", taken)
    names = ", ".join(sorted(OPTIMIZERS))
    for action in p._actions:  # name the registered optimisers in --optimizer's help
        if action.dest == "optimizer":
            action.help = f"discrete optimiser: {names} (default: random)"
    p.set_defaults(config_fields=fields)


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    """Run a search, score the test file once, write the artifact."""
    from .. import cliutil as cli
    from .api import read_search_config, search

    values = read_search_config(args.config) if args.config else {}
    flags = {n: getattr(args, n) for n in args.config_fields if hasattr(args, n)}
    if flags.get("optimizer", values.get("optimizer")) != values.get("optimizer"):
        values.pop("optimizer_config", None)  # the YAML's optimiser options belong to another optimiser
    values.update(flags)  # flat optimiser flags override the YAML's optimizer_config inside search()
    file_out = values.pop("out", None)
    out = args.out or file_out  # `--out` overrides the file's `out`
    if not out:
        raise PromptTuneError("no output directory: pass --out DIR (or set `out:` in the config)")
    optimizer = values.pop("optimizer", "random")
    result = search(optimizer=optimizer, out=out, resume=args.resume, quiet=args.quiet, **values)
    rows = [
        ["optimizer", optimizer],
        ["prompt", repr(result.best.text)[:100]],
        ["LLM calls", str(result.calls)],
        ["steps", f"{result.steps} (stopped: {result.stopped})"],
        ["seconds", f"{result.seconds:.1f}"],
    ]
    if result.best.demos:
        rows.insert(2, ["demonstrations", repr(result.best.demos)[:100]])
    for split in ("dev", "test"):
        metrics = getattr(result, split)
        if metrics:
            key = metrics["primary_metric"]
            rows.append([f"{split} {key}", f"{metrics[key]:.4f}"])
    cli.print_table(args, ["", ""], rows + [["artifact", str(out)]], header=False)
    return result.summary()
