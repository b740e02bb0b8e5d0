"""`prompttune serve` end to end: a real server on a free loopback port, driven by the official `openai` client and
by raw HTTP. Artifacts are trained for a few steps in-process on the tiny Llama backbone.

Mixed-prompt batching is checked where it matters: requests for different prompts queued together (the engine is
paused while they arrive) give the same scores, tokens and log-probs as each request alone, and the metrics show the
forward passes really held several prompts.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prompttune import PromptTuner
from prompttune.serve import PromptServer, RunningServer, ServeConfig

openai = pytest.importorskip("openai")

TOL = 1e-4
BB = "tiny-llama"
TEMPLATE = "Review: {text}{soft} Sentiment:{answer}"
TEXTS = ["a great movie with a great cast .", "bad .", "the plot was bad and the ending was worse .", "good fun ."]


# ---- fixtures -----------------------------------------------------------------------------------------------------
def _train(backbone, method, data, dev=None, **options):
    defaults = {"max_steps": 3, "batch_size": 4, "eval_every": 3, "lr": 0.05, "calibrate": "none"}
    if method in ("prompt_tuning", "prefix_tuning", "p_tuning", "dept", "deep_prompt"):
        defaults["num_virtual_tokens"] = 4
    if method == "dept":
        defaults["max_positions"] = 64
    defaults.update(options)
    tuner = PromptTuner(BB, method, backbone=backbone, **defaults)
    tuner.fit(data, dev, quiet=True)
    return tuner


def _write_discrete(path: Path, text: str) -> Path:
    """A discrete artifact as the search writes it (kind "discrete", the searched text in prompt.json)."""
    path.mkdir(parents=True)
    files = {
        "artifact.json": {"format_version": 1, "kind": "discrete", "method": "random", "backbone": {"name": BB}},
        "prompt.json": {"text": text, "extra": {}},
        "template.json": {"template": "{prompt}\nReview: {text} Sentiment:{answer}"},
        "head.json": {
            "head": "verbalizer",
            "labels": ["0", "1"],
            "multi_label": False,
            "words": {"0": [" negative"], "1": [" positive"]},
        },
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def tuners(tiny_llama, sst_train, sst_dev, gen_train, multi_words, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    single = {"0": [" negative"], "1": [" positive"]}
    multi_train = [{"text": r["text"], "label": ["a", "b"] if r["label"] == "1" else ["c"]} for r in sst_train]
    out = {
        "pt": _train(tiny_llama, "prompt_tuning", sst_train, sst_dev, template=TEMPLATE, verbalizer=single),
        "prefix": _train(tiny_llama, "prefix_tuning", sst_train, sst_dev, template=TEMPLATE, verbalizer=multi_words),
        "dept": _train(
            tiny_llama,
            "dept",
            sst_train,
            sst_dev,
            template="{soft}Review: {text} Sentiment:{answer}",
            verbalizer=single,
        ),
        "ptuning": _train(tiny_llama, "p_tuning", sst_train, sst_dev, template=TEMPLATE, verbalizer=single),
        "deep": _train(tiny_llama, "deep_prompt", sst_train, sst_dev, template=TEMPLATE, verbalizer=single),
        "gen": _train(tiny_llama, "prompt_tuning", gen_train, template=TEMPLATE, head="generation"),
        "tags": _train(
            tiny_llama,
            "prompt_tuning",
            multi_train,
            template=TEMPLATE,
            head="classifier",
            labels=["a", "b", "c"],
            multi_label=True,
        ),
    }
    paths = {name: t.save(root / name) for name, t in out.items()}
    paths["disc"] = _write_discrete(root / "disc", "Decide if the review is positive or negative.")
    _train(tiny_llama, "prompt_tuning", sst_train, template=TEMPLATE, verbalizer=single).save(root / "hot" / "late")
    return out, paths, root


@pytest.fixture(scope="module")
def server(tuners):
    from prompttune.backbones import load_backbone

    _, paths, root = tuners
    cfg = ServeConfig(
        batch_wait_ms=2,
        max_batch_size=16,
        max_queue=24,
        max_body_bytes=20_000,
        max_input_tokens=128,
        max_new_tokens=64,
        max_logprobs=512,
        prompt_dirs=[str(root / "hot")],
    )
    srv = PromptServer(load_backbone(BB), dict(paths), cfg)  # its own backbone instance, like a separate process
    running = RunningServer(srv)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(server, method, path, body=None, headers=None, data: bytes | None = None):
    """One HTTP request; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=payload, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def _metric(server, name: str, **labels) -> float:
    _, text = raw(server, "GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def _mixed_passes(server, kind: str) -> float:
    """Forward passes of `kind` that held more than one prompt."""
    total = _metric(server, "prompttune_batch_prompts_count", kind=kind)
    return total - _metric(server, "prompttune_batch_prompts_bucket", kind=kind, le="1")


# ---- OpenAI-compatible endpoints ------------------------------------------------------------------------------------
def test_models_lists_backbone_and_every_prompt(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {BB} | {f"{BB}:{n}" for n in ("pt", "prefix", "dept", "ptuning", "deep", "gen", "tags", "disc")}


def test_completion_equals_the_prompts_own_greedy_generation(client, tuners):
    tuner = tuners[0]["gen"]
    for text in TEXTS[:2]:
        got = client.completions.create(model=f"{BB}:gen", prompt=text, max_tokens=8, temperature=0)
        assert got.choices[0].text == tuner.generate([text], max_new_tokens=8)[0]
        assert got.usage.completion_tokens == 8 or got.choices[0].finish_reason == "stop"


def test_logprobs_of_label_words_equal_verbalizer_scores(client, tuners):
    """What a discrete-search client does: max_tokens 1 + logprobs; the label words' log-probs are the scores."""
    expected = tuners[0]["pt"].predict_scores(TEXTS)  # (N, 2), no calibration
    for text, want in zip(TEXTS, expected, strict=True):
        got = client.completions.create(model=f"{BB}:pt", prompt=text, max_tokens=1, temperature=0, logprobs=512)
        top = got.choices[0].logprobs.top_logprobs[0]
        assert abs(top[" negative"] - float(want[0])) <= TOL
        assert abs(top[" positive"] - float(want[1])) <= TOL
        assert got.choices[0].logprobs.token_logprobs[0] == pytest.approx(max(top.values()), abs=1e-6)


def test_streaming_equals_non_streaming_with_stop_strings(client):
    common = {"model": f"{BB}:ptuning", "prompt": TEXTS[0], "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**common).choices[0].text
    assert len(full) > 4
    stop = full[3:5]
    expect = full[: full.index(stop)]
    whole = client.completions.create(**common, stop=[stop])
    assert whole.choices[0].text == expect and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**common, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expect
    assert chunks[-1].choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full
    assert streamed[-1].usage.completion_tokens == 24


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "You rate reviews."}, {"role": "user", "content": "good fun ."}]
    common = {"model": f"{BB}:pt", "messages": messages, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**common, logprobs=True, top_logprobs=2)
    content = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and content
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    stream = list(client.chat.completions.create(**common, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == content
    assert stream[-1].choices[0].finish_reason in ("stop", "length")


def test_sampling_is_reproducible_with_a_seed(client):
    common = {"model": BB, "prompt": "The movie", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    a = client.completions.create(**common).choices[0].text
    b = client.completions.create(**common).choices[0].text
    assert a == b
    many = client.completions.create(**{**common, "n": 3}).choices
    assert [c.index for c in many] == [0, 1, 2] and len({c.text for c in many}) > 1


def test_classify_matches_the_artifacts_scores(server, tuners):
    models, _, _ = tuners
    for name in ("pt", "prefix", "dept", "ptuning", "deep"):
        status, body = raw(server, "POST", "/v1/classify", {"model": f"{BB}:{name}", "input": TEXTS})
        assert status == 200, body
        expected = models[name].predict_scores(TEXTS)
        labels = models[name].predict(TEXTS)
        for item, want, label in zip(body["data"], expected, labels, strict=True):
            got = torch.tensor([item["scores"][k] for k in ("0", "1")])
            assert (got - want).abs().max() <= TOL, name
            assert item["label"] == label


def test_classify_multi_label_lists_labels_above_threshold(server, tuners):
    models, _, _ = tuners
    status, body = raw(server, "POST", "/v1/classify", {"model": f"{BB}:tags", "input": TEXTS[:2]})
    assert status == 200, body
    want = models["tags"].predict(TEXTS[:2])
    for item, labels in zip(body["data"], want, strict=True):
        assert item["labels"] == list(labels)
        assert set(item["scores"]) == {"a", "b", "c"}
    status, body = raw(server, "POST", "/v1/classify", {"model": f"{BB}:tags", "input": "bad .", "threshold": 0.0})
    assert body["data"][0]["labels"] == ["a", "b", "c"]


def test_discrete_prompt_is_its_text_in_the_template(server, client, tiny_llama):
    status, body = raw(server, "POST", "/v1/classify", {"model": f"{BB}:disc", "input": "good fun ."})
    assert status == 200, body
    text = "Decide if the review is positive or negative.\nReview: good fun . Sentiment:"
    got = client.completions.create(model=BB, prompt=text, max_tokens=1, temperature=0, logprobs=512)
    top = got.choices[0].logprobs.top_logprobs[0]
    assert abs(body["data"][0]["scores"]["1"] - top[" positive"]) <= TOL


# ---- mixed-prompt and continuous batching ---------------------------------------------------------------------------
def _concurrently(server, calls):
    """Queue every call while the engine is paused, then release them into one batch."""
    engine = server.server.engine
    engine.pause(True)
    try:
        pool = ThreadPoolExecutor(len(calls))
        futures = [pool.submit(call) for call in calls]
        deadline = time.monotonic() + 30
        while engine.queue_depth < len(calls) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.queue_depth == len(calls)
    finally:
        engine.pause(False)
    return [f.result(timeout=60) for f in futures]


def test_mixed_prompt_batch_equals_each_request_alone(server, client):
    names = ["pt", "prefix", "dept", "ptuning", "deep", "disc", "tags"]
    classify = [(n, t) for n in names for t in TEXTS[:2]]
    gens = [
        ("gen", TEXTS[0], 5),
        ("prefix", TEXTS[1], 9),
        ("dept", TEXTS[2], 3),
        ("pt", TEXTS[3], 7),
        ("", "The", 6),
        ("deep", TEXTS[1], 4),
    ]

    def score(name, text):
        return raw(server, "POST", "/v1/classify", {"model": f"{BB}:{name}", "input": text})[1]["data"][0]["scores"]

    def generate(name, text, n):
        model = f"{BB}:{name}" if name else BB
        got = client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0, logprobs=3)
        return got.choices[0].text, got.choices[0].logprobs.token_logprobs, got.choices[0].logprobs.top_logprobs

    alone_scores = [score(n, t) for n, t in classify]
    alone_gens = [generate(*g) for g in gens]
    before = {k: _mixed_passes(server, k) for k in ("classify", "prefill", "decode")}
    calls = [lambda a=a: score(*a) for a in classify] + [lambda g=g: generate(*g) for g in gens]
    results = _concurrently(server, calls)
    for got, want in zip(results[: len(classify)], alone_scores, strict=True):
        assert max(abs(got[k] - want[k]) for k in want) <= TOL
    for got, want in zip(results[len(classify) :], alone_gens, strict=True):
        assert got[0] == want[0]
        assert max(abs(a - b) for a, b in zip(got[1], want[1], strict=True)) <= TOL
        for top_got, top_want in zip(got[2], want[2], strict=True):
            assert top_got.keys() == top_want.keys()
            assert max(abs(top_got[k] - top_want[k]) for k in top_want) <= TOL
    for kind in ("classify", "prefill", "decode"):
        assert _mixed_passes(server, kind) > before[kind], f"no {kind} pass held several prompts"


def test_sequences_join_a_running_batch_and_leave_when_done(server, client):
    """A long generation is decoding when short ones arrive: they join it, finish first, and all equal alone."""
    jobs = [("prefix", TEXTS[0], 40), ("pt", TEXTS[1], 4), ("dept", TEXTS[2], 12)]

    def generate(name, text, n):
        got = client.completions.create(model=f"{BB}:{name}", prompt=text, max_tokens=n, temperature=0, logprobs=1)
        return got.choices[0].text, got.choices[0].logprobs.token_logprobs

    alone = [generate(*j) for j in jobs]
    engine = server.server.engine
    pool = ThreadPoolExecutor(3)
    first = pool.submit(generate, *jobs[0])
    deadline = time.monotonic() + 30
    while engine.active_sequences == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    rest = [pool.submit(generate, *j) for j in jobs[1:]]
    results = [first.result(60)] + [f.result(60) for f in rest]
    for got, want in zip(results, alone, strict=True):
        assert got[0] == want[0]
        assert max(abs(a - b) for a, b in zip(got[1], want[1], strict=True)) <= TOL


def test_full_queue_answers_429(server):
    engine = server.server.engine
    cfg = server.server.cfg
    body = {"model": f"{BB}:pt", "input": "good ."}
    engine.pause(True)
    try:
        pool = ThreadPoolExecutor(cfg.max_queue)
        waiting = [pool.submit(raw, server, "POST", "/v1/classify", body) for _ in range(cfg.max_queue)]
        deadline = time.monotonic() + 30
        while engine.queue_depth < cfg.max_queue and time.monotonic() < deadline:
            time.sleep(0.005)
        status, err = raw(server, "POST", "/v1/classify", body)
        assert status == 429 and err["error"]["code"] == "queue_full"
    finally:
        engine.pause(False)
    assert all(f.result(60)[0] == 200 for f in waiting)


# ---- hot loading ----------------------------------------------------------------------------------------------------
def test_hot_load_and_unload(server, tuners, tmp_path):
    _, _, root = tuners
    status, body = raw(server, "POST", "/v1/prompts", {"path": "late", "name": "late"})
    assert status == 200 and body["id"] == f"{BB}:late", body
    assert raw(server, "POST", "/v1/classify", {"model": f"{BB}:late", "input": "good ."})[0] == 200
    assert raw(server, "POST", "/v1/prompts", {"path": "late", "name": "late"})[0] == 409
    status, body = raw(server, "DELETE", "/v1/prompts/late")
    assert status == 200 and body["deleted"] is True
    assert raw(server, "POST", "/v1/classify", {"model": f"{BB}:late", "input": "good ."})[0] == 404
    assert raw(server, "DELETE", "/v1/prompts/late")[0] == 404
    # absolute path inside the allowed directory works too
    assert raw(server, "POST", "/v1/prompts", {"path": str(root / "hot" / "late"), "name": "late2"})[0] == 200
    assert raw(server, "DELETE", "/v1/prompts/late2")[0] == 200


@pytest.mark.parametrize(
    "request_body,status",
    [
        ({"path": "../pt"}, 403),  # traversal out of the allowed directory
        ({"path": "late/../../pt"}, 403),
        ({"path": "/etc"}, 403),
        ({"path": "missing"}, 404),
        ({"path": "late", "name": "../evil"}, 400),
        ({"path": "late", "name": "a" * 65}, 400),
        ({"path": "late", "name": 5}, 400),
        ({"path": ""}, 400),
        ({}, 400),
    ],
)
def test_hot_load_refuses_paths_outside_allowed_dirs(server, request_body, status):
    got, body = raw(server, "POST", "/v1/prompts", request_body)
    assert got == status, body
    assert body["error"]["message"]


def test_hot_load_of_a_broken_artifact_is_422(server, tuners):
    _, _, root = tuners
    broken = root / "hot" / "broken"
    broken.mkdir()
    (broken / "artifact.json").write_text('{"format_version": 1, "kind": "soft"}')
    (broken / "prompt.safetensors").write_bytes(b"not safetensors")
    status, body = raw(server, "POST", "/v1/prompts", {"path": "broken"})
    assert status == 422 and body["error"]["code"] == "invalid_artifact", body
    assert raw(server, "GET", "/health")[0] == 200


def test_hot_load_refuses_a_symlink_out_of_the_allowed_dir(server, tuners):
    _, _, root = tuners
    link = root / "hot" / "escape"
    link.symlink_to(root / "pt")
    try:
        assert raw(server, "POST", "/v1/prompts", {"path": "escape"})[0] == 403
    finally:
        link.unlink()


# ---- malformed requests ---------------------------------------------------------------------------------------------
M = f"{BB}:pt"
BAD = [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"[1, 2]", 400),
    ("POST", "/v1/completions", b"\xff\xfe", 400),
    ("POST", "/v1/completions", b"[" * 10_001 + b"]" * 10_001, 413),
    ("POST", "/v1/completions", b"[" * 5000 + b"]" * 5000, 400),
    ("POST", "/v1/completions", {"prompt": "x"}, 400),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("POST", "/v1/completions", {"model": f"{BB}:nope", "prompt": "x"}, 404),
    ("POST", "/v1/completions", {"model": M}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": 5}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": []}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": [1, 2]}, 400),  # token ids need the bare backbone
    ("POST", "/v1/completions", {"model": BB, "prompt": [10**9]}, 400),
    ("POST", "/v1/completions", {"model": BB, "prompt": ""}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 0}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 65}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": "5"}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "temperature": -1}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "temperature": "hot"}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "top_p": 0}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "logprobs": 513}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "logprobs": True}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "n": 0}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "stop": [""]}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "echo": True}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "stream": "yes"}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "x", "presence_penalty": 1.0}, 400),
    ("POST", "/v1/completions", {"model": M, "prompt": "good " * 200}, 400),  # over max_input_tokens
    ("POST", "/v1/completions", {"model": M, "prompt": "x" * 30_000}, 413),  # over max_body_bytes
    ("POST", "/v1/chat/completions", {"model": M, "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": 3}]}, 400),
    ("POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": M, "messages": "hi"}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"model": M, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
    ),
    ("POST", "/v1/classify", {"model": M}, 400),
    ("POST", "/v1/classify", {"model": M, "input": []}, 400),
    ("POST", "/v1/classify", {"model": M, "input": [1]}, 400),
    ("POST", "/v1/classify", {"model": M, "input": {"a": "x", "b": "y"}}, 400),
    ("POST", "/v1/classify", {"model": M, "input": ["x"] * 65}, 400),
    ("POST", "/v1/classify", {"model": f"{BB}:gen", "input": "x"}, 400),
    ("POST", "/v1/classify", {"model": BB, "input": "x"}, 400),
    ("POST", "/v1/classify", {"model": M, "input": "x", "threshold": 2}, 400),
    ("GET", "/v1/completions", None, 405),
    ("GET", "/v1/nothing", None, 404),
    ("DELETE", "/v1/prompts/..", None, 400),
    ("DELETE", "/v1/prompts/not-loaded", None, 404),
]


@pytest.mark.parametrize("method,path,body,status", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_malformed_request_gets_a_4xx_json_error(server, method, path, body, status):
    data = body if isinstance(body, bytes) else None
    got, answer = raw(server, method, path, None if data is not None else body, data=data)
    assert got == status, answer
    assert isinstance(answer, dict) and answer["error"]["message"] and answer["error"]["type"], answer


def test_server_survives_bad_headers_and_stays_healthy(server):
    too_large = {"endpoint": "completions", "status": "413"}
    before = _metric(server, "prompttune_requests_total", **too_large)
    # Headers only, no body: a server that answers before reading a sent body closes with unread bytes, and the
    # kernel may then reset the connection before the client reads the answer.
    assert raw(server, "POST", "/v1/completions", headers={"Content-Length": "abc"})[0] == 400  # the HTTP layer's
    assert raw(server, "POST", "/v1/completions", headers={"Content-Length": str(10**9)})[0] == 413  # never sent
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert _metric(server, "prompttune_requests_total", **too_large) == before + 1
    text = raw(server, "GET", "/metrics")[1]
    assert "prompttune_request_latency_seconds_bucket" in text and "prompttune_queue_depth" in text


# ---- authentication -------------------------------------------------------------------------------------------------
def test_api_key_is_required_when_configured(tuners, tiny_llama, tmp_path):
    _, paths, _ = tuners
    key_file = tmp_path / "keys"
    key_file.write_text("\nsecret-one\nsecret-two\n")
    from prompttune.serve import read_api_keys

    srv = RunningServer(PromptServer(tiny_llama, {"pt": paths["pt"]}, ServeConfig(), read_api_keys(key_file)))
    try:
        body = {"model": f"{BB}:pt", "input": "good ."}
        assert raw(srv, "POST", "/v1/classify", body)[0] == 401
        assert raw(srv, "POST", "/v1/classify", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert raw(srv, "POST", "/v1/classify", body, {"Authorization": "Basic secret-one"})[0] == 401
        assert raw(srv, "GET", "/v1/models")[0] == 401
        assert raw(srv, "POST", "/v1/classify", body, {"Authorization": "Bearer secret-two"})[0] == 200
        assert raw(srv, "GET", "/health")[0] == 200  # liveness probes need no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="secret-one", max_retries=0)
        assert good.completions.create(model=BB, prompt="The", max_tokens=2, temperature=0).choices[0].text is not None
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        srv.stop()


def test_server_without_key_is_open(server):
    assert raw(server, "GET", "/v1/models")[0] == 200


# ---- the CLI verb: startup, serving, graceful shutdown -------------------------------------------------------------
def test_cli_serve_finishes_in_flight_requests_on_sigterm(tuners, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    _, paths, _ = tuners
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "prompttune",
        "serve",
        "--model",
        BB,
        "--prompts",
        f"sst={paths['pt']}",
        "--port",
        str(port),
        "--max-new-tokens",
        "150",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = type("S", (), {"host": "127.0.0.1", "port": port})()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if raw(target, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        result: dict = {}
        body = {"model": f"{BB}:sst", "prompt": "good", "max_tokens": 150, "temperature": 0}
        worker = threading.Thread(target=lambda: result.update(r=raw(target, "POST", "/v1/completions", body)))
        worker.start()
        time.sleep(0.3)  # the request is being decoded
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        status, answer = result["r"]
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 150 or answer["choices"][0]["finish_reason"] == "stop"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the real model (slow) ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_chat_template_and_mixed_batch(tmp_path):
    """SmolLM2 has a chat template and sdpa attention: chat stops at its turn end, and mixed batches still agree."""
    from prompttune.backbones import load_backbone

    torch.set_num_threads(2)
    backbone = load_backbone("smollm2-135m")
    names = {}
    for method in ("prompt_tuning", "prefix_tuning"):
        tuner = PromptTuner(
            "smollm2-135m",
            method,
            backbone=backbone,
            template=TEMPLATE,
            num_virtual_tokens=8,
            verbalizer={"0": [" negative"], "1": [" positive"]},
            max_steps=1,
            batch_size=2,
        )
        tuner.fit([{"text": t, "label": str(i % 2)} for i, t in enumerate(TEXTS)], quiet=True)
        names[method] = tuner.save(tmp_path / method)
    srv = RunningServer(PromptServer(backbone, names, ServeConfig(batch_wait_ms=2)))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        chat = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=40, temperature=0
        )
        assert chat.choices[0].message.content and "<|im_end|>" not in chat.choices[0].message.content

        def one(model, text):
            got = client.completions.create(model=model, prompt=text, max_tokens=6, temperature=0, logprobs=2)
            return got.choices[0].text, got.choices[0].logprobs.token_logprobs

        jobs = [(f"smollm2-135m:{m}", t) for m in names for t in TEXTS[:2]] + [("smollm2-135m", TEXTS[2])]
        alone = [one(*j) for j in jobs]
        mixed = _concurrently(srv, [lambda j=j: one(*j) for j in jobs])
        for (text_a, lp_a), (text_m, lp_m) in zip(alone, mixed, strict=True):
            assert text_a == text_m
            assert max(abs(a - b) for a, b in zip(lp_a, lp_m, strict=True)) <= TOL
    finally:
        srv.stop()


def test_discrete_prompt_with_demonstrations_serves_its_whole_filled_template(server, client, tuners):
    """In-context demonstrations live in prompt.json's filled `template`; serving only `text` would drop them."""
    _, _, root = tuners
    path = _write_discrete(root / "hot" / "demos", "")
    demos = "Review: a joy .\nSentiment: positive\n\n"
    saved = json.loads((path / "prompt.json").read_text())
    saved.update(demos=demos, template=demos + "Review: {text} Sentiment:{answer}")
    (path / "prompt.json").write_text(json.dumps(saved))
    status, body = raw(server, "POST", "/v1/prompts", {"path": "demos"})
    assert status == 200, body
    status, body = raw(server, "POST", "/v1/classify", {"model": f"{BB}:demos", "input": "good fun ."})
    assert status == 200, body
    got = client.completions.create(
        model=BB, prompt=demos + "Review: good fun . Sentiment:", max_tokens=1, temperature=0, logprobs=512
    )
    assert abs(body["data"][0]["scores"]["1"] - got.choices[0].logprobs.top_logprobs[0][" positive"]) <= TOL


def test_discrete_prompt_with_per_example_parts_is_refused(server, tuners):
    _, _, root = tuners
    _write_discrete(root / "hot" / "hinted", "Keywords: {hint}")
    status, body = raw(server, "POST", "/v1/prompts", {"path": "hinted"})
    assert status == 422 and "per-example parts" in body["error"]["message"], body
    assert raw(server, "GET", "/health")[0] == 200
