"""Shared pieces of the serving benchmarks: artifacts to serve, a server in its own process, loopback HTTP.

Traffic only ever goes to 127.0.0.1, to a server these scripts start and stop themselves.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEMPLATE = "Review: {text}\n{soft}Sentiment:{answer}"
VERBALIZER = {"0": [" negative"], "1": [" positive"]}
SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "an utterly compelling ` who wrote it ' in which the reputation of the most famous author who ever lived comes "
    "into question .",
    "it 's a cookie-cutter movie , a cut-and-paste job .",
    "one of the greatest family-oriented , fantasy-adventure movies ever .",
    "too slow for a younger crowd , too shallow for an older one .",
    "a masterpiece four years in the making .",
    "the story is also as unoriginal as they come , already having been recycled more times than i 'd care to count .",
]


def make_prompts(model: str, out: Path, count: int, methods: list[str], tokens: int = 16) -> dict[str, Path]:
    """`count` distinct prompt artifacts (untrained: serving speed does not depend on the values), methods in turn.

    Each gets its own seed, so every prompt's vectors differ. Reuses artifacts already written by an earlier run.
    """
    import torch

    from prompttune import artifacts
    from prompttune.api import build_model, hint_text, make_config
    from prompttune.backbones import load_backbone
    from prompttune.methods.base import InitContext

    paths = {f"p{i:03d}": out / f"p{i:03d}" for i in range(count)}
    if all((p / "artifact.json").is_file() for p in paths.values()):
        return paths
    backbone = load_backbone(model)
    for i, path in enumerate(paths.values()):
        method = methods[i % len(methods)]
        cfg = make_config(model, method, template=TEMPLATE, verbalizer=VERBALIZER, num_virtual_tokens=tokens)
        torch.manual_seed(i)
        pm = build_model(cfg, backbone, list(VERBALIZER))
        prefix_kv = (lambda ids: backbone.encode_prefixes([ids])[0]) if backbone.supports_prefix_cache else None
        pm.method.initialize(
            InitContext(backbone.tokenizer, torch.Generator().manual_seed(i), hint_text(cfg), prefix_kv)
        )
        with torch.no_grad():  # distinct prompts: the text initialisation plus a per-prompt perturbation
            for p in pm.method.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 + i)) * 0.01)
        artifacts.save(pm, cfg.to_dict(), path, {}, "bench")
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`prompttune serve` in a child process on a free loopback port."""

    def __init__(
        self, model: str, prompts: dict[str, Path], threads: int, extra: list[str] = (), log: Path | None = None
    ):
        self.port = free_port()
        cmd = [sys.executable, "-m", "prompttune", "serve", "--model", model, "--port", str(self.port), "--prompts"]
        cmd += [f"{n}={p}" for n, p in prompts.items()] + list(extra)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        self.log = open(log or os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start within 600 s")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (graceful), then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 300,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One loopback request; returns (status, parsed body, headers). Reuses `conn` (keep-alive) when given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        if own:
            conn.close()
    try:
        return resp.status, json.loads(raw), hdrs
    except ValueError:
        return resp.status, raw.decode(errors="replace"), hdrs


def metric_values(port: int, name: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of one metric family from /metrics: {'name{labels}': value}."""
    _, text, _ = request(port, "GET", "/metrics", headers=headers)
    out = {}
    for line in str(text).splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def environment(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        commit_id = commit.stdout.strip() or "?"
    except OSError:
        commit_id = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit_id,
        "python": platform.python_version(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
