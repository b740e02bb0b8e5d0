"""Each simple discrete optimiser does what its paper describes (on tiny-llama, in-process)."""

from __future__ import annotations

import pytest

from prompttune.config import TaskConfig
from prompttune.data.examples import load_examples
from prompttune.discrete.base import Candidate, example_key
from prompttune.discrete.icl import ICL, RETRIEVED, ICLConfig, Retriever
from prompttune.discrete.loop import SearchConfig, build_optimizer, make_context
from prompttune.discrete.manual import Manual, ManualConfig
from prompttune.discrete.opro import OPRO, OPROConfig, parse_instruction
from prompttune.discrete.promptquine import PromptQuine, PromptQuineConfig
from prompttune.discrete.random import RandomConfig, RandomSearch
from prompttune.llm.base import BackendConfig
from prompttune.llm.hf import HFBackend

TEMPLATE = "Review: {text}\n{prompt}Sentiment:{answer}"


@pytest.fixture
def setup(tiny_llama, sst_train, sst_dev):
    task = TaskConfig(template=TEMPLATE, verbalizer="0= negative,1= positive")
    llm = HFBackend(BackendConfig(model="tiny-llama"), backbone=tiny_llama)
    return make_context(task, llm, load_examples(sst_train), load_examples(sst_dev), seed=3)


def test_random_samples_vocabulary_pieces(setup):
    ctx, _ = setup
    opt = RandomSearch(RandomConfig(num_tokens=3, per_step=5), ctx)
    cands = opt.ask()
    assert len(cands) == 5 and all(c.text.endswith("\n") for c in cands)
    vocab = set(ctx.vocabulary)
    assert all(p.isprintable() and "\ufffd" not in p for p in vocab)
    again = RandomSearch(RandomConfig(num_tokens=3, per_step=5), ctx).ask()
    assert cands == again  # seeded from ctx.seed


def test_icl_per_class_sets_are_balanced_demonstrations(setup):
    ctx, objective = setup
    opt = ICL(ICLConfig(k=4, per_step=3), ctx)
    for cand in opt.ask():
        demos = cand.demos.split("\n\n")[:-1]
        assert len(demos) == 4 and cand.text == ""
        assert sum(d.endswith(" positive") for d in demos) == 2 and sum(d.endswith(" negative") for d in demos) == 2
        assert all(d.startswith("Review: ") and "\nSentiment: " in d for d in demos)
    text = objective.prompt_texts(cand, ctx.dev[:1])[0]
    assert text.startswith(cand.demos) and text.endswith("\nSentiment:")


def test_icl_similarity_retrieves_per_input(setup):
    ctx, objective = setup
    opt = ICL(ICLConfig(k=2, selection="similarity"), ctx)
    objective.specialize = opt.specialize
    [cand] = opt.ask()
    assert cand.demos == RETRIEVED and opt.done
    probe = load_examples([{"text": "the plot was bad and the ending was worse .", "label": "0"}])[0]
    special = opt.specialize(cand, [probe])
    demos = special.context(example_key(probe))
    # The identical training text is never its own demonstration; the most similar one comes last (next to the input).
    assert "the plot was bad and the ending was worse ." not in demos
    assert demos.count("\nSentiment: ") == 2
    assert opt.specialize(Candidate(""), [probe]) == Candidate("")  # other candidates (the manual prompt) untouched
    r = Retriever(["red apple", "green pear", "red apple pie"], ["A", "B", "C"], 2, "|")
    assert r.nearest("red apple tart") == [2, 0]  # "red apple" is the closest: it comes last
    rebuilt = ICL.specializer(opt.export(cand), ctx.backend, "")
    assert rebuilt(cand, [probe]) == special  # prediction from the artifact retrieves the same demonstrations


def test_promptquine_children_are_token_deletions(setup):
    ctx, _ = setup
    cfg = PromptQuineConfig(population=4, offspring=6, max_deletions=2, min_tokens=3)
    opt = PromptQuine(cfg, ctx)
    full = "".join(opt.pieces)
    assert full.count("\nSentiment: ") == 2  # one demonstration per class
    gen0 = opt.ask()
    assert gen0[0].demos == full + "\n\n"  # the seed prompt itself is a member
    fake = [type("S", (), {"score": 0.5, "loglik": -float(i)})() for i in range(len(gen0))]
    opt.tell(fake)
    assert len(opt.members) == 4 and opt.members[0]["mask"] == "1" * len(opt.pieces)
    for child in opt.ask():
        kept = child.demos[: -len("\n\n")]
        it = iter(full)
        assert all(ch in it for ch in kept)  # a subsequence: tokens were only deleted
    for _ in range(50):
        assert opt.mutate("1" * 4 + "0" * (len(opt.pieces) - 4)).count("1") >= cfg.min_tokens


def test_opro_meta_prompt_and_proposals(setup):
    ctx, _ = setup
    opt = OPRO(OPROConfig(per_step=2, max_new_tokens=6, init=["Be kind.", "Be smart."]), ctx)
    assert [c.text for c in opt.ask()] == ["Be kind.\n", "Be smart.\n"]
    opt.tell([type("S", (), {"score": s, "loglik": 0.0})() for s in (0.75, 0.25)])
    meta = opt.meta_prompt()
    assert meta.index("text: Be smart.") < meta.index("text: Be kind.")  # ascending: the best nearest the request
    assert "accuracy: 75" in meta and "<INS>" in meta and "square brackets" in meta
    calls = ctx.backend.budget.by_kind.get("generate", 0)
    opt.ask()
    assert ctx.backend.budget.by_kind["generate"] == calls + 2
    assert parse_instruction("Sure! [Classify the review.] ok") == "Classify the review."
    assert parse_instruction('\n  instruction: "Decide the sentiment."\nmore') == "Decide the sentiment."


def test_opro_chain_of_thought_generates_a_reasoning_once(setup):
    ctx, objective = setup
    opt = OPRO(OPROConfig(cot=True, cot_tokens=3, init=["Be smart."]), ctx)
    objective.specialize = opt.specialize
    assert opt.calls_per_example == 2
    [cand] = opt.ask()
    assert cand.text == "Be smart. Let's think step by step.\n{hint}\n"
    budget = ctx.backend.budget
    objective.score([cand], ctx.train[:2])
    assert budget.by_kind["generate"] == 2 and budget.by_kind["score"] == 2
    objective.score([cand], ctx.train[:2])  # reasoning and scores both cached
    assert budget.by_kind["generate"] == 2 and budget.by_kind["score"] == 2
    texts = objective.prompt_texts(cand, ctx.train[:1])
    assert texts[0].startswith("Review: ") and "Let's think step by step.\n" in texts[0]
    assert objective.prompt_texts(Candidate(""), ctx.train[:1])[0].endswith("\nSentiment:")  # no CoT for others


def test_manual_scores_the_given_prompts_once(setup):
    ctx, _ = setup
    opt = Manual(ManualConfig(prompts=["A.", "B.", "A."]), ctx)
    assert [c.text for c in opt.ask()] == ["A.\n", "B.\n"] and opt.done


def test_build_optimizer_names_bad_fields(setup):
    ctx, _ = setup
    with pytest.raises(Exception, match="unknown key"):
        build_optimizer(SearchConfig(optimizer="random", optimizer_config={"tokens": 3}), ctx)
