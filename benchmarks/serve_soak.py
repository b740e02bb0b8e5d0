"""Serving soak test: minutes of mixed valid and invalid traffic against one server process.

    python benchmarks/serve_soak.py                   # smollm2-135m, 180 s -> results/serve-soak-<model>.json
    python benchmarks/serve_soak.py --model tiny-llama --duration 30 --out benchmarks/results/quick/serve-soak.json

Clients send completions (plain, streamed, streams abandoned after the first chunk), chat, classification, hot
load/unload cycles, health and metrics scrapes, and malformed requests of every kind the server must refuse (bad
JSON, unknown model, bad fields, too long input, oversized body, missing or wrong API key, unknown route, wrong
method). Every request carries a unique X-Request-Id that the answer must echo.

Checks at the end: every request got exactly one answer, with its own id and the expected status class; the
server's request counter equals the number of requests sent; the server is healthy with an empty queue; its
resident memory did not grow after warm-up; SIGTERM stops it cleanly. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serve_common import HERE, SENTENCES, ServerProcess, environment, make_prompts, request, write_json

KEY = "soak-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Soak:
    def __init__(self, port: int, model: str, names: list[str], hot: str, seed: int):
        self.port, self.model, self.names, self.hot = port, model, names, hot
        self.rng = random.Random(seed)
        self.sent = 0
        self.outcomes: Counter[str] = Counter()
        self.problems: list[str] = []

    # each action returns (method, path, body, headers, expected status class or exact status, stream mode)
    def action(self, i: int) -> tuple[str, str, Any, dict, int, str]:
        r, m = self.rng, f"{self.model}:{self.rng.choice(self.names)}"
        text = r.choice(SENTENCES)
        roll = r.random()
        if roll < 0.25:
            body = {"model": m, "prompt": text, "max_tokens": r.randint(1, 16), "temperature": r.choice([0, 0.8])}
            if r.random() < 0.3:
                body["logprobs"] = 5
            return "POST", "/v1/completions", body, AUTH, 200, "plain"
        if roll < 0.35:
            body = {"model": m, "prompt": text, "max_tokens": 12, "temperature": 0, "stream": True}
            return "POST", "/v1/completions", body, AUTH, 200, "abandon" if r.random() < 0.4 else "stream"
        if roll < 0.50:
            inputs = [r.choice(SENTENCES) for _ in range(r.randint(1, 4))]
            return "POST", "/v1/classify", {"model": m, "input": inputs}, AUTH, 200, "plain"
        if roll < 0.58:
            body = {"model": m, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
            body["stream"] = r.random() < 0.5
            return "POST", "/v1/chat/completions", body, AUTH, 200, "stream" if body["stream"] else "plain"
        if roll < 0.63:
            path = r.choice(["/health", "/v1/models", "/metrics"])
            return "GET", path, None, AUTH, 200, "plain"
        if roll < 0.66:
            return "HOT", "", None, AUTH, 200, "plain"
        return self.invalid(m, text)

    def invalid(self, m: str, text: str) -> tuple[str, str, Any, dict, int, str]:
        r = self.rng
        cases = [
            ("POST", "/v1/completions", b"{not json", AUTH, 400),
            ("POST", "/v1/completions", {"model": f"{self.model}:missing", "prompt": "x"}, AUTH, 404),
            ("POST", "/v1/completions", {"model": m, "prompt": text, "max_tokens": -3}, AUTH, 400),
            ("POST", "/v1/completions", {"model": m, "prompt": text, "temperature": "hot"}, AUTH, 400),
            ("POST", "/v1/completions", {"model": m, "prompt": "word " * 3000}, AUTH, 400),
            ("POST", "/v1/completions", {"model": m, "prompt": "x" * 300_000}, AUTH, 413),
            ("POST", "/v1/completions", {"model": m, "prompt": text}, {}, 401),
            ("POST", "/v1/completions", {"model": m, "prompt": text}, {"Authorization": "Bearer wrong"}, 401),
            ("POST", "/v1/chat/completions", {"model": m, "messages": []}, AUTH, 400),
            ("POST", "/v1/classify", {"model": m, "input": [3]}, AUTH, 400),
            ("POST", "/v1/prompts", {"path": "../../etc"}, AUTH, 403),
            ("GET", "/v1/nowhere", None, AUTH, 404),
            ("PUT", "/v1/completions", {"model": m}, AUTH, 405),
        ]
        method, path, body, headers, status = r.choice(cases)
        return method, path, body, headers, status, "plain"

    def run_one(self, i: int, rid: str) -> None:
        method, path, body, headers, expect, mode = self.action(i)
        if method == "HOT":  # load a prompt under a fresh name, use it, unload it: three requests
            path = f"hot-{rid}"
            steps = [
                ("POST", "/v1/prompts", {"path": self.hot, "name": path}, 200),
                ("POST", "/v1/classify", {"model": f"{self.model}:{path}", "input": "fine ."}, 200),
                ("DELETE", f"/v1/prompts/{path}", None, 200),
            ]
            for k, (meth, p, b, status) in enumerate(steps):
                self.check(meth, p, b, AUTH, status, "plain", f"{rid}-{k}")
            return
        self.check(method, path, body, headers, expect, mode, rid)

    def check(self, method: str, path: str, body: Any, headers: dict, expect: int, mode: str, rid: str) -> None:
        self.sent += 1
        hdrs = {**headers, "X-Request-Id": rid}
        try:
            if mode == "plain":
                status, answer, got = request(self.port, method, path, body, hdrs, timeout=600)
            else:
                status, answer, got = self.stream(path, body, hdrs, abandon=mode == "abandon")
        except (OSError, http.client.HTTPException) as err:
            self.outcomes["lost"] += 1
            self.problems.append(f"{rid} {method} {path}: no answer ({err})")
            return
        if got.get("x-request-id") != rid:
            self.outcomes["wrong_id"] += 1
            self.problems.append(f"{rid}: answered with id {got.get('x-request-id')!r}")
        if status == expect or (expect == 200 and status == 429):
            self.outcomes["429" if status == 429 else ("ok" if status < 400 else "refused_as_expected")] += 1
            if status >= 400 and not (isinstance(answer, dict) and "error" in answer):
                self.outcomes["bad_error_shape"] += 1
                self.problems.append(f"{rid}: {status} without an OpenAI-shaped error body")
        else:
            self.outcomes["unexpected_status"] += 1
            self.problems.append(f"{rid} {method} {path}: expected {expect}, got {status}: {str(answer)[:160]}")

    def stream(self, path: str, body: Any, headers: dict, abandon: bool) -> tuple[int, Any, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            got = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status != 200:
                return resp.status, json.loads(resp.read()), got
            if abandon:
                resp.readline()  # the first event, then hang up mid-stream
                self.outcomes["abandoned_streams"] += 1
                return 200, None, got
            events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
            if events[-1] != "data: [DONE]":
                raise http.client.HTTPException("stream did not end with [DONE]")
            return 200, events, got
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--duration", type=float, default=180, help="seconds of traffic")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/serve-soak-<model>.json")
    args = p.parse_args(argv)
    out = args.out or HERE / "results" / f"serve-soak-{args.model}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="serve-soak-"))
    methods = ["prompt_tuning", "prefix_tuning", "p_tuning", "dept"]
    prompts = make_prompts(args.model, work / "prompts", args.prompts, methods)
    hot = make_prompts(args.model, work / "hot", 1, ["prompt_tuning"])
    (work / "key").write_text(KEY + "\n")
    extra = [
        "--api-key-file",
        str(work / "key"),
        "--prompt-dirs",
        str(work / "hot"),
        "--max-body-bytes",
        "100000",
        "--max-input-tokens",
        "1024",
        "--max-queue",
        str(4 * args.clients),
    ]
    server = ServerProcess(args.model, prompts, args.threads, extra, work / "server.log")
    clients = [
        Soak(server.port, args.model, list(prompts), str(hot["p000"]), args.seed + c) for c in range(args.clients)
    ]
    counted_before = _counted(server.port)  # startup health probes
    rss: list[tuple[float, float]] = []
    stop = time.monotonic() + args.duration
    tic = time.monotonic()

    def drive(soak: Soak, c: int) -> None:
        i = 0
        while time.monotonic() < stop:
            soak.run_one(i, f"c{c}-r{i}")
            i += 1

    threads = [threading.Thread(target=drive, args=(s, c)) for c, s in enumerate(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - tic, server.rss_mb()))
        time.sleep(2)
    seconds = time.monotonic() - tic
    status, health, _ = request(server.port, "GET", "/health")
    counted = _counted(server.port) - counted_before
    sent = sum(s.sent for s in clients) + 2  # + the first metrics scrape and the health check above
    exit_code = server.stop()
    outcomes = sum((s.outcomes for s in clients), Counter())
    problems = [p for s in clients for p in s.problems]
    warm = [m for t, m in rss if seconds * 0.25 <= t < seconds * 0.5] or [rss[0][1]]
    late = [m for t, m in rss if t >= seconds * 0.75] or [rss[-1][1]]
    growth = statistics.median(late) - statistics.median(warm)
    checks = {
        "no_request_lost": outcomes["lost"] == 0,
        "every_answer_has_its_own_id": outcomes["wrong_id"] == 0,
        "expected_statuses": outcomes["unexpected_status"] == 0 and outcomes["bad_error_shape"] == 0,
        "server_counted_every_request_once": counted == sent,
        "healthy_at_end": status == 200 and health.get("status") == "ok" and health.get("queue_depth") == 0,
        "memory_flat": growth <= max(0.05 * statistics.median(warm), 25.0),
        "clean_shutdown": exit_code == 0,
    }
    result = {
        "benchmark": "serve_soak",
        "model": args.model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args.threads),
        "seconds": round(seconds, 1),
        "requests_sent": sent,
        "requests_counted_by_server": counted,
        "outcomes": dict(outcomes),
        "rss_mb": {
            "after_warmup": round(statistics.median(warm), 1),
            "end": round(statistics.median(late), 1),
            "growth": round(growth, 1),
            "samples": [[round(t, 1), round(m, 1)] for t, m in rss],
        },
        "checks": checks,
        "passed": all(checks.values()),
        "problems": problems[:50],
    }
    result["markdown"] = markdown(result)
    write_json(out, result)
    print(result["markdown"])
    print(f"wrote {out}")
    return result


def _counted(port: int) -> float:
    """Requests the server has answered (its own counter; a scrape counts itself only after it answers)."""
    _, text, _ = request(port, "GET", "/metrics", headers=AUTH)
    lines = str(text).splitlines()
    return sum(float(x.rpartition(" ")[2]) for x in lines if x.startswith("prompttune_requests_total{"))


def markdown(r: dict[str, Any]) -> str:
    o = r["outcomes"]
    lines = [
        "## Serving: soak run",
        "",
        f"`benchmarks/serve_soak.py` on {r['model']}: {r['settings']['clients']} clients for {r['seconds']:.0f} s, "
        f"{r['requests_sent']} requests (valid completions, streams, abandoned streams, chat, classification, hot "
        "load/unload, and malformed requests of every refused kind).",
        "",
        f"- answered as expected: {o.get('ok', 0)} ok, {o.get('refused_as_expected', 0)} refused with the expected "
        f"4xx, {o.get('429', 0)} told to retry (429), {o.get('abandoned_streams', 0)} streams abandoned by the client",
        f"- lost: {o.get('lost', 0)}; wrong id: {o.get('wrong_id', 0)}; unexpected status: "
        f"{o.get('unexpected_status', 0)}; server counted {r['requests_counted_by_server']:.0f} of "
        f"{r['requests_sent']} sent",
        f"- resident memory after warm-up {r['rss_mb']['after_warmup']} MB, at the end {r['rss_mb']['end']} MB "
        f"(growth {r['rss_mb']['growth']} MB)",
        "- checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
