"""The OpenAI-compatible HTTP backend against real servers on 127.0.0.1: prompttune's own server serving tiny-llama
(started in a thread by the test), and tiny `http.server` endpoints that misbehave on purpose (slow, malformed,
failing) to check timeouts, retries and error messages. Nothing is mocked."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from prompttune import PromptTuneError
from prompttune.discrete.api import search
from prompttune.discrete.artifact import DiscretePrompt
from prompttune.llm.base import BackendConfig, BackendError, Budget, BudgetExhausted
from prompttune.llm.hf import HFBackend
from prompttune.llm.openai_http import OpenAIBackend, _answer_word, _piece, _word_logprob

PROMPTS = ["Review: a great movie .\nSentiment:", "Review: bad .\nSentiment:", "Review: the film\nSentiment:"]
WORDS = [" negative", " positive", " good"]


@pytest.fixture(scope="module")
def server(tiny_llama):
    app = pytest.importorskip("prompttune.serve.app")
    from prompttune.serve.config import ServeConfig

    # tiny-llama's whole 512-token vocabulary fits in one top-k list, so multi-token scoring can be checked exactly.
    running = app.RunningServer(app.PromptServer(tiny_llama, config=ServeConfig(max_logprobs=512)))
    yield running
    running.stop()


def client(url: str, **kwargs) -> OpenAIBackend:
    options = {"backend": "openai", "model": "tiny-llama", "base_url": url + "/v1", "top_logprobs": 100, **kwargs}
    return OpenAIBackend(BackendConfig(**options))


# ---- against prompttune serve -------------------------------------------------------------------------------------
def test_logprobs_agree_with_the_local_model(server, tiny_llama):
    remote = client(server.url).label_logprobs(PROMPTS, WORDS)  # (N, W)
    local = HFBackend(BackendConfig(model="tiny-llama"), backbone=tiny_llama).label_logprobs(PROMPTS, WORDS)
    tok = tiny_llama.tokenizer
    word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    assert all(len(ids) == 1 for ids in word_ids)  # single tokens: the top-k list can hold them exactly
    checked = 0
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            top = set(tiny_llama.model(input_ids=ids).logits[0, -1].topk(100).indices.tolist())
        for j, (w,) in enumerate(word_ids):
            if w in top:  # returned by the server: the exact value
                assert remote[i, j].item() == pytest.approx(local[i, j].item(), abs=1e-4)
                checked += 1
            else:  # not returned: the floor, or the log-prob of a shorter token that begins the word
                assert remote[i, j].item() != pytest.approx(local[i, j].item(), abs=1e-4)
    assert checked >= 2


def test_generation_matches_the_local_model(server, tiny_llama):
    remote = client(server.url)
    local = HFBackend(BackendConfig(model="tiny-llama"), backbone=tiny_llama)
    assert remote.generate(PROMPTS[:2], 6) == local.generate(PROMPTS[:2], 6)
    assert remote.budget.by_kind == {"generate": 2} and remote.budget.tokens > 0


def test_text_scoring_through_chat(server):
    rows = client(server.url, scoring="text").label_logprobs(PROMPTS[:1], WORDS)
    assert rows.shape == (1, 3) and set(rows[0].tolist()) <= {0.0, -30.0}
    assert _answer_word("Positive.", WORDS) == 1
    assert _answer_word("I think it is negative overall", WORDS) == 0
    assert _answer_word("good or positive?", WORDS) == 2  # the first word decides
    assert _answer_word("no idea", WORDS) is None
    assert _piece(" positive", {" pos": -1.0, " positive": -2.0, "x": 0.0}) == " positive"  # longest prefix
    assert _piece(" awful", {" pos": -1.0}) is None


def test_word_pieces_by_hand():
    tops = {
        "P:": {" won": -1.0, " w": -0.5, " x": -0.1},
        "P: won": {"der": -2.0, "d": -0.2},
        "P: wonder": {"ful": -3.0},
    }
    asked: list[str] = []

    def top(context):
        asked.append(context)
        return tops.get(context, {})

    assert _word_logprob("P:", " wonderful", top, -30.0) == pytest.approx(-6.0)  # -1 - 2 - 3, longest pieces
    assert asked == ["P:", "P: won", "P: wonder"]
    assert _word_logprob("P:", " wonders", top, -30.0) == pytest.approx(-33.0)  # "s" never returned: + floor
    assert _word_logprob("P:", " awful", top, -30.0) == -30.0


def test_multi_token_words_are_scored_piece_by_piece(server, tiny_llama):
    tok = tiny_llama.tokenizer
    vocab = {tok.decode([i]) for i in range(len(tok))} - {""}

    def longest_first(word: str) -> list[str]:
        pieces = []
        while word:
            pieces.append(max((v for v in vocab if word.startswith(v)), key=len))
            word = word[len(pieces[-1]) :]
        return pieces

    # Words whose tokenizer segmentation is also the longest-first one: there the remote score is exact.
    words = [
        w
        for w in (" wonderful", " negativity", " unwatchable", " terrific", " awful")
        if len(tok(w, add_special_tokens=False)["input_ids"]) > 1
    ]
    exact = [
        w for w in words if longest_first(w) == [tok.decode([i]) for i in tok(w, add_special_tokens=False)["input_ids"]]
    ]
    assert len(exact) >= 3, exact  # 5-7 tokens each
    remote = client(server.url, top_logprobs=512)
    got = remote.label_logprobs(PROMPTS[:2], exact)  # (2, W)
    local = HFBackend(BackendConfig(model="tiny-llama"), backbone=tiny_llama).label_logprobs(PROMPTS[:2], exact)
    torch.testing.assert_close(got, local, atol=1e-3, rtol=0)
    assert remote.budget.calls == 2  # one call per prompt scored, as on the local backends
    assert remote.budget.tokens > 0


def test_unknown_model_is_a_clear_error(server):
    with pytest.raises(BackendError, match=r"HTTP 404: model 'nope' does not exist"):
        client(server.url, model="nope").label_logprobs(PROMPTS[:1], WORDS)


def test_search_over_http_writes_an_artifact_eval_reuses(server, sst_train, sst_dev, tmp_path):
    llm = client(server.url, concurrency=2)
    result = search(
        sst_train, sst_dev, sst_dev, optimizer="random", out=tmp_path / "run", llm=llm, budget=60, select_top=1,
        template="Review: {text}\n{prompt}Sentiment:{answer}", verbalizer="0= negative,1= positive", per_step=2,
    )  # fmt: skip
    assert result.calls <= 60 and result.test is not None
    loaded = DiscretePrompt.load(tmp_path / "run")  # rebuilds the HTTP backend from run.yaml
    assert loaded.backend.kind == "openai"
    assert loaded.evaluate(sst_dev)["accuracy"] == pytest.approx(result.test["accuracy"])


# ---- misbehaving endpoints ------------------------------------------------------------------------------------------
class _Endpoint:
    """A real HTTP server in a thread whose answer is set per test; records what it received."""

    def __init__(self):
        self.status, self.body, self.delay = 200, b"{}", 0.0
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                endpoint.requests.append(
                    {"path": self.path, "auth": self.headers.get("authorization"), "body": self.rfile.read(length)}
                )
                time.sleep(endpoint.delay)
                try:
                    self.send_response(endpoint.status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(endpoint.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, status: int, body, delay: float = 0.0):
        self.status, self.delay = status, delay
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.requests.clear()


@pytest.fixture(scope="module")
def endpoint():
    e = _Endpoint()
    yield e
    e.httpd.shutdown()


def fast(url, **kwargs):
    return client(url, timeout=0.3, retries=2, backoff=0.01, **kwargs)


def test_timeout_is_retried_then_reported(endpoint):
    endpoint.answer(200, {}, delay=1.0)
    with pytest.raises(BackendError, match=r"no answer within 0.3 s \(after 3 attempts\)"):
        fast(endpoint.url).label_logprobs(PROMPTS[:1], WORDS)
    assert len(endpoint.requests) == 3


def test_server_errors_are_retried_client_errors_are_not(endpoint):
    endpoint.answer(503, {"error": {"message": "overloaded"}})
    with pytest.raises(BackendError, match=r"HTTP 503: overloaded \(after 3 attempts\)"):
        fast(endpoint.url).label_logprobs(PROMPTS[:1], WORDS)
    assert len(endpoint.requests) == 3
    endpoint.answer(400, {"error": {"message": "'logprobs' must be <= 5"}})
    with pytest.raises(BackendError, match=r"/v1/completions: HTTP 400: 'logprobs' must be <= 5"):
        fast(endpoint.url).label_logprobs(PROMPTS[:1], WORDS)
    assert len(endpoint.requests) == 1


def test_malformed_responses_name_the_field(endpoint):
    endpoint.answer(200, {"choices": [{"text": " yes"}]})
    with pytest.raises(BackendError, match=r"malformed response: field 'choices\[0\].logprobs' missing"):
        fast(endpoint.url).label_logprobs(PROMPTS[:1], WORDS)
    endpoint.answer(200, {"choices": [{"logprobs": {"top_logprobs": [[" a", -1.0]]}}]})
    with pytest.raises(BackendError, match=r"'choices\[0\].logprobs.top_logprobs\[0\]' should map tokens"):
        fast(endpoint.url).label_logprobs(PROMPTS[:1], WORDS)
    endpoint.answer(200, b"<html>oops</html>")
    with pytest.raises(BackendError, match="malformed response: not JSON"):
        fast(endpoint.url).label_logprobs(PROMPTS[:1], WORDS)
    endpoint.answer(200, {"choices": []})
    with pytest.raises(BackendError, match=r"field 'choices\[0\]' missing"):
        fast(endpoint.url).generate(PROMPTS[:1], 4)


def test_api_key_is_sent_as_bearer(endpoint, tmp_path):
    key = tmp_path / "key"
    key.write_text("secret\n")
    endpoint.answer(200, {"choices": [{"logprobs": {"top_logprobs": [{" positive": -0.5}]}}], "usage": {}})
    rows = fast(endpoint.url, api_key_file=str(key)).label_logprobs(PROMPTS[:1], WORDS)
    assert rows.tolist() == [[-30.0, -0.5, -30.0]]
    sent = endpoint.requests[0]
    assert sent["auth"] == "Bearer secret" and sent["path"] == "/v1/completions"
    body = json.loads(sent["body"])
    assert body["max_tokens"] == 1 and body["logprobs"] == 100 and body["prompt"] == PROMPTS[0]
    with pytest.raises(PromptTuneError, match="API key file not found"):
        fast(endpoint.url, api_key_file=str(tmp_path / "missing"))


def test_budget_exhausted_sends_nothing(endpoint):
    endpoint.answer(200, {"choices": [{"logprobs": {"top_logprobs": [{" positive": -0.5}]}}]})
    llm = OpenAIBackend(BackendConfig(backend="openai", model="m", base_url=endpoint.url + "/v1"), Budget(max_calls=2))
    llm.label_logprobs(PROMPTS[:2], WORDS)
    with pytest.raises(BudgetExhausted, match="2 of 2 LLM calls used"):
        llm.label_logprobs(PROMPTS[:1], WORDS)
    assert len(endpoint.requests) == 2


def test_bad_endpoint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError, match="connection refused; is the server running"):
        fast(f"http://127.0.0.1:{port}").label_logprobs(PROMPTS[:1], WORDS)
    with pytest.raises(PromptTuneError, match="must start with http"):
        client("127.0.0.1:8000")
    with pytest.raises(PromptTuneError, match="no endpoint"):
        OpenAIBackend(BackendConfig(backend="openai"))
