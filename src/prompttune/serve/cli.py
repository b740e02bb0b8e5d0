"""The `serve` verb: `prompttune serve --model M --prompts DIR [NAME=DIR ...] [--host H] [--port P] ...`.

Every `ServeConfig` field is a flag (generated from its attribute docstrings, like the training flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import PromptTuneError
from .config import ServeConfig


def add_serve_parser(verbs: Any) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to the CLI's subparsers."""
    from ..cliutil import add_config_flags

    text = "serve learned prompts over one backbone (OpenAI-compatible HTTP API)"
    p = verbs.add_parser("serve", help=text, description=text, allow_abbrev=False)
    p.add_argument("--model", required=True, help="backbone: embedded name, tiny-* name, HF id or local path")
    p.add_argument(
        "--prompts",
        nargs="*",
        default=[],
        metavar="[NAME=]DIR",
        help="artifact directories to serve (name: the directory's name unless NAME= is given)",
    )
    p.add_argument("--device", default="cpu", help="torch device for the backbone (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout when the server stops")
    p.set_defaults(func=cmd_serve, config_fields=add_config_flags(p, ServeConfig, "server", set()))
    return p


def parse_prompts(values: list[str]) -> dict[str, str]:
    """`DIR` or `NAME=DIR` -> {name: dir}; names must be unique."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if name in out:
            raise PromptTuneError(f"--prompts: the name {name!r} is given twice; use NAME=DIR to rename one")
        out[name] = path
    return out


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Load the backbone and the prompts, then serve until interrupted (SIGINT/SIGTERM finish in-flight work)."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise PromptTuneError("serving needs the `serve` extra: pip install 'prompttune[serve]'") from None

    from ..backbones.base import load_backbone
    from .app import PromptServer, read_api_keys

    given = {name: getattr(args, name) for name in args.config_fields if hasattr(args, name)}
    cfg = ServeConfig(**given)
    keys = read_api_keys(cfg.api_key_file) if cfg.api_key_file else None
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(f"warning: serving on {cfg.host} without an API key (--api-key-file)", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backbone = load_backbone(args.model, args.device)
    server = PromptServer(backbone, parse_prompts(args.prompts), cfg, keys)
    names = [p.model_id(backbone.spec.name) for p in server.registry.all()]
    print(f"serving {backbone.spec.name} with {len(names)} prompt(s) on http://{cfg.host}:{cfg.port}", file=sys.stderr)
    config = uvicorn.Config(
        server.app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=cfg.timeout_graceful_shutdown,
    )
    # Uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handlers it found; these
    # record it instead, so a clean shutdown (in-flight requests answered) exits with status 0.
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"model": backbone.spec.name, "prompts": names, "config": dataclasses.asdict(cfg)}
