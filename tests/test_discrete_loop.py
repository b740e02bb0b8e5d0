"""The discrete contract and its one loop, on tiny-llama in-process: template `{prompt}`, the objective against the
soft path's verbalizer scores, caching and the budget, and — for every registered optimiser — same seed same
result, a killed search resuming to the uninterrupted result, and an artifact that `prompttune eval` scores."""

from __future__ import annotations

import json

import pytest
import torch

import prompttune.discrete.checkpoint as checkpoint_mod
from prompttune import PromptTuneError, PromptTuner
from prompttune.api import build_model, make_config
from prompttune.cli import main
from prompttune.config import TaskConfig
from prompttune.data.examples import load_examples
from prompttune.data.templates import Template
from prompttune.discrete.api import search
from prompttune.discrete.artifact import DiscretePrompt
from prompttune.discrete.base import Candidate, example_key
from prompttune.discrete.loop import CHECKPOINT, make_context
from prompttune.llm.base import BackendConfig, Budget, BudgetExhausted
from prompttune.llm.hf import HFBackend
from prompttune.registry import OPTIMIZERS, _ensure_loaded

_ensure_loaded()

TEMPLATE = "Review: {text}\n{prompt}Sentiment:{answer}"
VERBALIZER = "0= negative,1= positive"
# Small, fast settings per optimiser; an optimiser not listed runs with its defaults (keep those cheap, or add it).
FAST: dict[str, dict] = {
    "random": {"per_step": 2},
    "icl": {"k": 2, "per_step": 2},
    "promptquine": {"population": 3, "offspring": 2},
    "opro": {"per_step": 2, "max_new_tokens": 6, "init": ["Be smart."]},
    "manual": {"prompts": ["Be smart.", "Answer well."]},
}


def backend(tiny_llama, budget: Budget | None = None) -> HFBackend:
    return HFBackend(BackendConfig(model="tiny-llama", batch_size=4), budget, backbone=tiny_llama)


def run_search(tiny_llama, sst_train, sst_dev, name: str, out=None, resume=False, **kwargs):
    options = {"budget": 150, "select_top": 2, "seed": 5, **FAST.get(name, {}), **kwargs}
    return search(
        sst_train, sst_dev, sst_dev, optimizer=name, out=out, resume=resume, llm=backend(tiny_llama),
        template=TEMPLATE, verbalizer=VERBALIZER, **options,
    )  # fmt: skip


# ---- template and objective ---------------------------------------------------------------------------------------
def test_template_prompt_marker():
    t = Template("Review: {text}\n{prompt}Sentiment:{answer}")
    ex = load_examples([{"text": "good {x}", "label": "1"}])[0]
    assert t.has_prompt and t.fields == ["text"]
    assert t.render_text(ex, "Think.\n") == "Review: good {x}\nThink.\nSentiment:"
    assert t.render_text(ex) == "Review: good {x}\nSentiment:"  # soft methods: `{prompt}` holds nothing
    assert not Template("{text}{answer}").has_prompt


def test_objective_matches_the_soft_path_verbalizer(tiny_llama, sst_train, multi_words):
    """Class scores through the backend equal the manual method + verbalizer head on the filled template."""
    task = TaskConfig(template=TEMPLATE, verbalizer=multi_words)
    examples = load_examples(sst_train)
    _, objective = make_context(task, backend(tiny_llama), examples, [], 0)
    text = "Answer {carefully}.\n"
    scored = objective.score([Candidate(text)])[0]
    filled = TEMPLATE.replace("{prompt}", text.replace("{", "{{").replace("}", "}}"))
    cfg = make_config("tiny-llama", "manual", template=filled, verbalizer=multi_words)
    model = build_model(cfg, tiny_llama, list(multi_words))
    expected = model.scores(examples)  # (N, C)
    torch.testing.assert_close(scored.logprobs, expected, atol=1e-5, rtol=0)
    assert scored.metrics["primary_metric"] == "accuracy"
    gold = torch.tensor([int(e.label) for e in examples])
    assert scored.score == pytest.approx((expected.argmax(-1) == gold).float().mean().item())
    assert scored.keys == tuple(example_key(e) for e in examples)


def test_cache_and_budget(tiny_llama, sst_train):
    task = TaskConfig(template=TEMPLATE, verbalizer=VERBALIZER)
    examples = load_examples(sst_train)
    llm = backend(tiny_llama, Budget(max_calls=20))
    _, objective = make_context(task, llm, examples, [], 0)
    first = objective.score([Candidate("a\n")])[0]
    assert llm.budget.calls == 8
    again = objective.score([Candidate("a\n")])[0]  # cached: free
    assert llm.budget.calls == 8 and torch.equal(first.logprobs, again.logprobs)
    with pytest.raises(BudgetExhausted) as err:
        objective.score([Candidate("b\n"), Candidate("c\n")])  # 16 more calls needed, 12 left
    assert [s.candidate.text for s in err.value.partial] == ["b\n"]
    assert llm.budget.calls == 16 and "20 LLM calls" in str(err.value)


def test_demos_and_hints_render(tiny_llama, sst_train):
    task = TaskConfig(template=TEMPLATE, verbalizer=VERBALIZER)
    ex = load_examples(sst_train)[:2]
    _, objective = make_context(task, backend(tiny_llama), ex, [], 0)
    c = Candidate("Hint: {hint}\n", "Demo.\n\n").specialized(hints={example_key(ex[0]): "upbeat"})
    texts = objective.prompt_texts(c, ex)
    assert texts[0] == f"Demo.\n\nReview: {ex[0].fields['text']}\nHint: upbeat\nSentiment:"
    assert texts[1] == f"Demo.\n\nReview: {ex[1].fields['text']}\nHint: \nSentiment:"
    assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_clear_errors(tiny_llama, sst_train, sst_dev):
    with pytest.raises(PromptTuneError, match=r"no \{prompt\} marker"):
        search(sst_train, sst_dev, llm=backend(tiny_llama), template="{text}{answer}", verbalizer=VERBALIZER)
    with pytest.raises(PromptTuneError, match="cannot pay for dev selection"):
        run_search(tiny_llama, sst_train, sst_dev, "random", budget=10)
    with pytest.raises(PromptTuneError, match="unknown optimizer 'nope'"):
        run_search(tiny_llama, sst_train, sst_dev, "nope")
    with pytest.raises(PromptTuneError, match="unknown option 'colour'"):
        run_search(tiny_llama, sst_train, sst_dev, "random", colour="red")


def test_budget_exhaustion_keeps_partial_results(tiny_llama, sst_train, sst_dev, tmp_path):
    result = run_search(tiny_llama, sst_train, sst_dev, "random", out=tmp_path / "run", budget=60)
    assert result.stopped == "budget" and result.calls <= 60
    assert (tmp_path / "run" / "prompt.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "search.jsonl").read_text().splitlines()]
    assert "stopped" in log[-1] and "budget exhausted" in log[-1]["stopped"]


def test_p1_optimises_on_the_highest_variance_subset(tiny_llama, sst_train, sst_dev, tmp_path):
    result = run_search(tiny_llama, sst_train, sst_dev, "random", out=tmp_path / "run", p1=4)
    state = json.loads((tmp_path / "run" / CHECKPOINT).read_text())["state"]
    keys = state["p1"]
    assert len(keys) == 4
    chosen = [e for e in load_examples(sst_train) if example_key(e) in keys]
    assert sorted(e.label for e in chosen) == ["0", "0", "1", "1"]  # class-stratified
    history = [h for h in state["history"].values() if h["step"] > 0]
    assert history and all(h["n"] == 4 for h in history)  # the search scored on the subset only
    assert result.dev is not None


# ---- every registered optimiser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_same_seed_same_result(name, tiny_llama, sst_train, sst_dev):
    a = run_search(tiny_llama, sst_train, sst_dev, name)
    b = run_search(tiny_llama, sst_train, sst_dev, name)
    assert a.best == b.best and a.dev == b.dev and a.calls == b.calls and a.candidates == b.candidates


class _Killed(Exception):
    pass


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_killed_search_resumes_to_the_uninterrupted_result(name, tiny_llama, sst_train, sst_dev, tmp_path, monkeypatch):
    full = run_search(tiny_llama, sst_train, sst_dev, name, out=tmp_path / "full")
    saved, calls = checkpoint_mod.save, []

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # after the first step
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_mod, "save", save_then_die)
        try:
            run_search(tiny_llama, sst_train, sst_dev, name, out=tmp_path / "run")
        except _Killed:
            pass
    resumed = run_search(tiny_llama, sst_train, sst_dev, name, out=tmp_path / "run", resume=True)
    assert resumed.best == full.best and resumed.dev == full.dev and resumed.test == full.test
    assert (resumed.calls, resumed.tokens, resumed.steps) == (full.calls, full.tokens, full.steps)
    a = json.loads((tmp_path / "full" / CHECKPOINT).read_text())
    b = json.loads((tmp_path / "run" / CHECKPOINT).read_text())
    assert a["optimizer"] == b["optimizer"] and a["state"]["history"] == b["state"]["history"]
    log_a = (tmp_path / "full" / "search.jsonl").read_text().splitlines()
    log_b = (tmp_path / "run" / "search.jsonl").read_text().splitlines()
    assert len(log_a) == len(log_b)


def test_resume_refuses_other_settings(tiny_llama, sst_train, sst_dev, tmp_path):
    run_search(tiny_llama, sst_train, sst_dev, "random", out=tmp_path / "run", max_steps=1)
    with pytest.raises(PromptTuneError, match="checkpoint was made with seed=5"):
        run_search(tiny_llama, sst_train, sst_dev, "random", out=tmp_path / "run", max_steps=1, resume=True, seed=6)
    with pytest.raises(PromptTuneError, match="no checkpoint to resume from"):
        run_search(tiny_llama, sst_train, sst_dev, "random", out=tmp_path / "other", resume=True)
    # Another task from the middle of a search: other training data, template or label words.
    with pytest.raises(PromptTuneError, match=r"other training data: 8 examples \(sha256 \w+\), this run 7"):
        run_search(tiny_llama, sst_train[:7], sst_dev, "random", out=tmp_path / "run", max_steps=1, resume=True)
    options = {"optimizer": "random", "out": tmp_path / "run", "resume": True, "llm": backend(tiny_llama)}
    options.update(budget=150, select_top=2, seed=5, max_steps=1, **FAST.get("random", {}))
    with pytest.raises(PromptTuneError, match="other template"):
        search(sst_train, sst_dev, template="Text: {text}\n{prompt}Label:{answer}", verbalizer=VERBALIZER, **options)
    with pytest.raises(PromptTuneError, match="other labels"):
        search(sst_train, sst_dev, template=TEMPLATE, verbalizer="0= bad,1= good", **options)


# ---- artifact and CLI ---------------------------------------------------------------------------------------------
def write_tsv(path, rows):
    path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    return path


def test_cli_search_then_eval_scores_the_artifact(tiny_llama, sst_train, sst_dev, tmp_path, capsys):
    train, dev = write_tsv(tmp_path / "train.tsv", sst_train), write_tsv(tmp_path / "dev.tsv", sst_dev)
    out = tmp_path / "pq"
    argv = [
        "search", "--backend", "hf", "--model", "tiny-llama", "--optimizer", "promptquine", "--budget", "100",
        "--train", train, "--dev", dev, "--test", dev, "--template", TEMPLATE, "--verbalizer", VERBALIZER,
        "--out", out, "--seed", "3", "--population", "3", "--quiet", "--json",
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calls"] <= 100 and summary["test"]["primary_metric"] == "accuracy"
    files = {p.name for p in out.iterdir()}
    assert {"artifact.json", "prompt.json", "template.json", "head.json", "run.yaml", "metrics.json"} <= files
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["kind"] == "discrete" and manifest["method"] == "promptquine"
    assert main(["eval", str(out), "--data", str(dev), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    loaded = PromptTuner.load(out, backbone=tiny_llama)
    assert isinstance(loaded, DiscretePrompt)
    assert loaded.predict(["a great movie ."])[0] in ("0", "1")
    assert main(["search", "--optimizer", "random", "--train", str(train), "--template", TEMPLATE]) == 2
    assert "no output directory" in capsys.readouterr().err


def test_overlong_prompts_lose_their_beginning_not_the_search(tiny_llama):
    llm = backend(tiny_llama)
    long = "word " * 700 + "Sentiment:"
    fitted = llm._fit(long, 500)
    assert long.endswith(fitted) and len(tiny_llama.tokenizer(fitted)["input_ids"]) <= 500
    torch.testing.assert_close(
        llm.label_logprobs([long], [" positive"]), llm.label_logprobs([llm._fit(long, 511)], [" positive"])
    )


def test_reused_prompt_beginnings_give_the_same_scores(tiny_llama, sst_train, multi_words):
    plain = HFBackend(BackendConfig(model="tiny-llama", prefix_cache=0), backbone=tiny_llama)
    cached = HFBackend(BackendConfig(model="tiny-llama", prefix_cache=4), backbone=tiny_llama)
    words = [w for ws in multi_words.values() for w in ws]  # multi-token words: several rows per prompt
    prefixes = [f"Review: {r['text']}\n" for r in sst_train]
    prompts = [p + cand + "Sentiment:" for cand in ("", "Think.\n", "a b c\n") for p in prefixes]
    expected = plain.label_logprobs(prompts, words)
    torch.testing.assert_close(cached.label_logprobs(prompts, words, prefixes * 3), expected, atol=1e-5, rtol=0)
    assert len(cached._prefixes) == 4  # least recently used beginnings are dropped
    before = list(cached._prefixes)
    cached.label_logprobs(prompts[:2], words, prefixes[:2])
    assert list(cached._prefixes) == before  # each beginning used once in the call: a plain batch, nothing cached
    assert cached._shared(cached.tokenizer("abc")["input_ids"], "a") == 0  # too short to be worth a cache entry
    ids = tuple(cached.tokenizer("Review: good fun .\nSentiment:")["input_ids"])
    assert cached._shared(ids, "Review: good fu") == 0  # the cut splits a token: tokenised alone it differs


def test_artifact_template_is_the_whole_prompt(tiny_llama, sst_train, sst_dev, tmp_path):
    result = run_search(tiny_llama, sst_train, sst_dev, "icl", out=tmp_path / "icl", budget=400)
    prompt = json.loads((tmp_path / "icl" / "prompt.json").read_text())
    filled = Template(prompt["template"])
    loaded = DiscretePrompt.load(tmp_path / "icl", backbone=tiny_llama)
    examples = load_examples(sst_dev)
    assert [filled.render_text(e) for e in examples] == loaded.prompt_texts(examples)
    assert result.best.demos  # the demonstrations are part of that template


def test_an_optimiser_out_of_new_candidates_stops(tiny_llama, sst_train, sst_dev):
    # 8 training examples, one demonstration per class: few distinct sets, re-proposals are cached and free.
    result = run_search(tiny_llama, sst_train, sst_dev, "icl", budget=2000, max_idle_steps=3)
    assert result.stopped == "stalled" and result.calls < 2000


def test_token_budget_and_held_back_calls():
    budget = Budget(max_calls=10, max_tokens=100, held_back=4)
    assert budget.remaining_calls() == 6
    budget.add(5, 120, "score")
    with pytest.raises(BudgetExhausted, match="token budget exhausted: 120 of 100"):
        budget.reserve(1)
    budget.max_tokens = 0
    with pytest.raises(BudgetExhausted, match=r"5 of 10 LLM calls used \(4 held back for dev selection\), 2 more"):
        budget.reserve(2)
    budget.reserve(1)


def test_a_backend_serves_several_searches_each_with_its_own_budget(tiny_llama, sst_train, sst_dev):
    llm = backend(tiny_llama)
    options = {"optimizer": "random", "budget": 100, "select_top": 1, "per_step": 2, "llm": llm}
    first = search(sst_train, sst_dev, template=TEMPLATE, verbalizer=VERBALIZER, **options)
    second = search(sst_train, sst_dev, template=TEMPLATE, verbalizer=VERBALIZER, **options)
    assert first.calls == second.calls and first.best == second.best
