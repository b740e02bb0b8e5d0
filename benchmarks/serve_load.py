"""Serving load benchmark: many distinct prompts mixed in one batch vs. the same requests served prompt by prompt.

    python benchmarks/serve_load.py                                   # smollm2-135m -> results/serve-load-<model>.json
    python benchmarks/serve_load.py --model tiny-llama --requests 64 --out benchmarks/results/quick/serve-load.json

A `prompttune serve` process on a free loopback port holds the backbone once and every prompt; 32 closed-loop
clients send /v1/completions requests (greedy, `--max-tokens` new tokens) spread round-robin over 1, 8 and 64
distinct prompts. The same requests run against a second server started with `--no-mix-prompts`, which only ever
puts one prompt in a forward pass (continuous batching per prompt) — the prompt-by-prompt baseline. One more run
mixes four methods (prompt tuning, prefix tuning, P-tuning, DePT) over 64 prompts.

Targets (issue 5): 64 prompts reach >= 0.8x the single-prompt throughput, and >= 3x the prompt-by-prompt baseline.
Bounded: at most `--requests` per run and `--time-limit` seconds each; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from serve_common import (
    HERE,
    SENTENCES,
    ServerProcess,
    environment,
    make_prompts,
    metric_values,
    percentile,
    request,
    write_json,
)

MIXED_METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning", "dept"]


def load_run(port: int, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """`args.clients` threads send `args.requests` requests (round-robin over `names`); latency per request."""
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.time_limit

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= args.requests or time.monotonic() > deadline:
                break
            body = {
                "model": f"{args.model}:{names[i % len(names)]}",
                "prompt": SENTENCES[i % len(SENTENCES)],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            start = time.perf_counter()
            try:
                status, answer, _ = request(port, "POST", "/v1/completions", body, conn=conn)
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                status, answer = 0, str(err)
            with lock:
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                    tokens.append(answer["usage"]["completion_tokens"])
                else:
                    errors.append(f"{status}: {str(answer)[:200]}")
        conn.close()

    before = _batch_stats(port)
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - tic
    after = _batch_stats(port)
    decode_rows = after["rows"] - before["rows"]
    decode_passes = max(after["passes"] - before["passes"], 1)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(latencies) / seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 2),
        "p50_s": round(percentile(latencies, 0.5), 4),
        "p99_s": round(percentile(latencies, 0.99), 4),
        "mean_decode_batch": round(decode_rows / decode_passes, 2),
        "mean_prompts_per_decode_pass": round((after["prompts"] - before["prompts"]) / decode_passes, 2),
    }


def _batch_stats(port: int) -> dict[str, float]:
    sizes = metric_values(port, "prompttune_batch_size")
    prompts = metric_values(port, "prompttune_batch_prompts")
    return {
        "rows": sizes.get('prompttune_batch_size_sum{kind="decode"}', 0.0),
        "passes": sizes.get('prompttune_batch_size_count{kind="decode"}', 0.0),
        "prompts": prompts.get('prompttune_batch_prompts_sum{kind="decode"}', 0.0),
    }


def warm_up(port: int, model: str, names: list[str], n: int) -> None:
    for i in range(n):
        body = {"model": f"{model}:{names[i % len(names)]}", "prompt": SENTENCES[0], "max_tokens": 2}
        request(port, "POST", "/v1/completions", {**body, "temperature": 0})


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "## Serving: mixed-prompt batching",
        "",
        f"`benchmarks/serve_load.py` on {result['model']}: {s['clients']} concurrent clients, /v1/completions with "
        f"{s['max_tokens']} greedy new tokens, {s['requests']} requests per run (at most {s['time_limit']} s), max "
        f"batch {s['max_batch_size']}; CPU {result['environment']['cpu']}, {s['threads']} threads (shared machine: "
        "noisy). `by_prompt` is the same server with `--no-mix-prompts` (one prompt per forward pass). Prompts are "
        "untrained artifacts (throughput does not depend on the values).",
        "",
        "| mode | distinct prompts | methods | req/s | tokens/s | p50 s | p99 s | rows per decode pass | prompts per "
        "decode pass | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['mode']} | {r['prompts']} | {r['methods']} | {r['throughput_rps']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['mean_decode_batch']:.1f} | "
            f"{r['mean_prompts_per_decode_pass']:.1f} | {r['errors']} |"
        )
    t = result["targets"]
    lines += [
        "",
        f"- 64 prompts vs 1 prompt (mixed): {t['mixed64_vs_mixed1']:.2f}x (target >= 0.8: "
        f"{'met' if t['mixed64_vs_mixed1'] >= 0.8 else 'NOT met'})",
        f"- 64 prompts mixed vs prompt by prompt: {t['mixed64_vs_byprompt64']:.2f}x (target >= 3: "
        f"{'met' if t['mixed64_vs_byprompt64'] >= 3 else 'NOT met'})",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=256, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--counts", default="1,8,64", help="distinct prompts per run")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per run at most")
    p.add_argument("--workdir", type=Path, default=None, help="where the artifacts go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/serve-load-<model>.json")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    out = args.out or HERE / "results" / f"serve-load-{args.model}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="serve-load-"))
    top = max(counts)
    same = make_prompts(args.model, work / "prompt_tuning", top, ["prompt_tuning"])
    mixed_methods = make_prompts(args.model, work / "mixed", top, MIXED_METHODS)
    served = {**same, **{f"m{n[1:]}": p for n, p in mixed_methods.items()}}
    common = ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(4 * args.clients)]
    runs = []
    for mode, flags in (("mixed", []), ("by_prompt", ["--no-mix-prompts"])):
        log = work / f"server-{mode}.log"  # the server's own output, if something goes wrong
        server = ServerProcess(args.model, served if mode == "mixed" else same, args.threads, common + flags, log)
        try:
            warm_up(server.port, args.model, list(same), args.clients)
            plan = [(n, "prompt_tuning", list(same)[:n]) for n in counts]
            if mode == "mixed":
                plan.append((top, "4 methods", [f"m{n[1:]}" for n in list(same)[:top]]))
            for n, methods, names in plan:
                result = load_run(server.port, names, args)
                runs.append({"mode": mode, "prompts": n, "methods": methods, **result})
                print(
                    f"{mode:9s} prompts={n:3d} ({methods}): {result['throughput_rps']:.2f} req/s, "
                    f"p50 {result['p50_s']:.2f}s p99 {result['p99_s']:.2f}s, decode batch "
                    f"{result['mean_decode_batch']:.1f}, errors {result['errors']}",
                    flush=True,
                )
        finally:
            server.stop()
    rps = {(r["mode"], r["prompts"], r["methods"]): r["throughput_rps"] for r in runs}
    one = rps.get(("mixed", min(counts), "prompt_tuning"), float("nan"))
    many = rps.get(("mixed", top, "prompt_tuning"), float("nan"))
    base = rps.get(("by_prompt", top, "prompt_tuning"), float("nan"))
    result = {
        "benchmark": "serve_load",
        "model": args.model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args.threads),
        "runs": runs,
        "targets": {"mixed64_vs_mixed1": round(many / one, 3), "mixed64_vs_byprompt64": round(many / base, 3)},
    }
    result["settings"]["max_batch_size"] = args.max_batch_size
    result["markdown"] = markdown(result)
    write_json(out, result)
    print(result["markdown"])
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
