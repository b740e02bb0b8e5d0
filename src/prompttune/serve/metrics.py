"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: a few counters, gauges and
histograms need no client library. Everything is updated under one lock (from the event loop and the engine thread).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = tuple[tuple[str, str], ...]


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    """Counters, gauges (read on scrape) and histograms, each keyed by name and a label set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, _Histogram]] = defaultdict(dict)
        self._buckets: dict[str, Sequence[float]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._help: dict[str, str] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = help_text
        self._counters.setdefault(name, {})

    def histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self._help[name] = help_text
        self._buckets[name] = buckets
        self._histograms.setdefault(name, {})

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value computed when scraped (queue depth, loaded prompts)."""
        self._help[name] = help_text
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            table = self._counters[name]
            table[key] = table.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            table = self._histograms[name]
            if key not in table:
                table[key] = _Histogram(self._buckets[name])
            table[key].observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (tests and benchmarks)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """The exposition text for GET /metrics."""
        lines: list[str] = []
        with self._lock:
            for name, table in sorted(self._counters.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} counter"]
                lines += [f"{name}{_fmt_labels(k)} {_num(v)}" for k, v in sorted(table.items())]
            for name, table in sorted(self._histograms.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} histogram"]
                for key, h in sorted(table.items()):
                    running = 0
                    for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
                        running += count
                        le = "+Inf" if bound == float("inf") else _num(bound)
                        lines.append(f"{name}_bucket{_fmt_labels(key + (('le', le),))} {running}")
                    lines.append(f"{name}_sum{_fmt_labels(key)} {_num(h.total)}")
                    lines.append(f"{name}_count{_fmt_labels(key)} {h.n}")
        for name, read in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} gauge", f"{name} {_num(read())}"]
        return "\n".join(lines) + "\n"


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def server_metrics() -> Metrics:
    """The metric families the server exports (gauges are added by the app, which knows the engine)."""
    m = Metrics()
    m.counter("prompttune_requests_total", "HTTP requests by endpoint and status code")
    m.counter("prompttune_prompt_tokens_total", "prompt tokens processed (after the template)")
    m.counter("prompttune_generated_tokens_total", "tokens generated")
    m.counter("prompttune_forward_passes_total", "forward passes by kind (classify, prefill, decode)")
    m.histogram("prompttune_request_latency_seconds", "request latency by endpoint", LATENCY_BUCKETS)
    m.histogram(
        "prompttune_time_to_first_token_seconds", "streaming: time to the first generated token", LATENCY_BUCKETS
    )
    m.histogram("prompttune_batch_size", "rows per forward pass by kind", SIZE_BUCKETS)
    m.histogram("prompttune_batch_prompts", "distinct prompts per forward pass by kind", SIZE_BUCKETS)
    return m
