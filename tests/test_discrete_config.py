"""Search configs in YAML: the layout of an artifact's `run.yaml`, read by `prompttune search --config` and
`read_search_config`; flags override the file, a finished search reruns from its own run.yaml, bad files name the
file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prompttune import PromptTuneError, read_search_config, search
from prompttune.cli import main

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\n{prompt}Sentiment:{answer}"


def write_tsv(path, rows):
    path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    return str(path)


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture
def files(tmp_path, sst_train, sst_dev):
    return write_tsv(tmp_path / "train.tsv", sst_train), write_tsv(tmp_path / "dev.tsv", sst_dev)


def config(train: str, dev: str, **search_fields) -> dict:
    return {
        "search": {"optimizer": "promptquine", "optimizer_config": {"population": 3, "offspring": 2},
                   "budget": 80, "seed": 3, "select_top": 2, **search_fields},
        "backend": {"backend": "hf", "model": "tiny-llama", "batch_size": 4},
        "task": {"template": TEMPLATE, "verbalizer": {0: " negative", 1: " positive"}},
        "data": {"train": train, "dev": dev, "test": dev},
    }  # fmt: skip


def run_cli(capsys, *argv) -> dict:
    assert main(["search", *map(str, argv), "--quiet", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_search_reruns_from_its_own_run_yaml(tmp_path, files, capsys, tiny_llama):
    first = run_cli(capsys, "--config", write_yaml(tmp_path / "s.yaml", config(*files)), "--out", tmp_path / "a")
    again = run_cli(capsys, "--config", tmp_path / "a" / "run.yaml", "--out", tmp_path / "b")
    assert again["best"] == first["best"] and again["test"] == first["test"] and again["calls"] == first["calls"]
    assert yaml.safe_load((tmp_path / "b" / "run.yaml").read_text())["search"]["optimizer"] == "promptquine"


def test_flags_override_the_file_field_by_field(tmp_path, files, capsys, tiny_llama):
    path = write_yaml(tmp_path / "s.yaml", {**config(*files), "out": str(tmp_path / "from-yaml")})
    # No --optimizer: the file's optimiser decides which flags exist, so --population parses.
    summary = run_cli(capsys, "--config", path, "--budget", 40, "--population", 2)
    run = yaml.safe_load((tmp_path / "from-yaml" / "run.yaml").read_text())
    assert summary["calls"] <= 40 and run["search"]["budget"] == 40
    assert run["search"]["optimizer_config"]["population"] == 2  # the flag
    assert run["search"]["optimizer_config"]["offspring"] == 2  # the file, kept
    assert run["search"]["seed"] == 3 and run["backend"]["batch_size"] == 4


def test_another_optimizer_on_the_command_line_drops_the_files_optimizer_options(tmp_path, files, capsys, tiny_llama):
    path = write_yaml(tmp_path / "s.yaml", config(*files))
    run_cli(capsys, "--config", path, "--optimizer", "random", "--per-step", 2, "--budget", 30, "--out", tmp_path / "r")
    run = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    assert run["search"]["optimizer"] == "random" and run["search"]["optimizer_config"]["per_step"] == 2
    assert "population" not in run["search"]["optimizer_config"]


def test_python_api_takes_the_same_file(tmp_path, files, tiny_llama):
    kwargs = read_search_config(write_yaml(tmp_path / "s.yaml", config(*files)))
    assert kwargs["optimizer"] == "promptquine" and kwargs["optimizer_config"] == {"population": 3, "offspring": 2}
    result = search(**{**kwargs, "budget": 40})
    assert result.calls <= 40 and result.test is not None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model="x"), "unknown section(s) ['model']"),
        (lambda c: c["backend"].update(modle="x"), "backend.modle: unknown key"),
        (lambda c: c["search"].update(optimizer_config=[1, 2]), "search.optimizer_config: expected a mapping"),
        (lambda c: c["task"].update(head="classifier"), "task.head: a discrete search does not use it"),
        (lambda c: c["data"].update(test="<memory>"), "data.test: the search used in-memory data"),
        (lambda c: c.update(backend=["hf"]), "section 'backend': expected a mapping"),
    ],
)
def test_bad_files_name_the_file_and_the_field(tmp_path, edit, message):
    data = config("train.tsv", "dev.tsv")
    edit(data)
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(PromptTuneError) as err:
        read_search_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_run_yaml_task_fields_at_their_defaults_are_accepted(tmp_path):
    data = config("train.tsv", "dev.tsv")
    data["task"].update(head="verbalizer", pooling="answer", head_config={}, calibrate="auto")  # as run.yaml lists
    assert "head" not in read_search_config(write_yaml(tmp_path / "run.yaml", data))


def test_yaml_syntax_errors_name_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  budget: [1, 2\n")
    assert main(["search", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "invalid YAML" in err
    assert main(["search", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "search").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_search_configs_run(path, tiny_llama, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # data paths in the configs are relative to the repository root
    kwargs = read_search_config(path)
    assert kwargs["out"] and Path(kwargs["train"]).is_file() and Path(kwargs["dev"]).is_file()
    # The wiring, not the quality: the tiny model, a few calls, and no artifact in the repository.
    kwargs.update(model="tiny-llama", budget=140, select_top=1, out=None)  # 2 x 32 dev calls + the search
    if kwargs["optimizer"] == "opro":
        kwargs["max_new_tokens"] = 4  # the proposer's; tiny-llama writes noise either way
    result = search(**kwargs)
    assert result.calls <= 140 and result.best is not None


def test_verbs_on_a_text_prompt(tmp_path, files, capsys, tiny_llama):
    # `predict` works on a searched text prompt as on a soft one (texts or a file); `generate` and `export` say why
    # they do not apply instead of failing inside (the manual optimiser shares its name with the soft `manual`).
    cfg = config(*files)
    cfg["search"].update(optimizer="manual", optimizer_config={}, budget=20)
    run_cli(capsys, "--config", write_yaml(tmp_path / "s.yaml", cfg), "--out", tmp_path / "a")
    assert main(["predict", str(tmp_path / "a"), "this film was great .", "--json"]) == 0
    (single,) = json.loads(capsys.readouterr().out)["predictions"]
    assert main(["predict", str(tmp_path / "a"), "--data", files[1], "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == "this film was great ." and rows[0]["prediction"] == single["label"]
    assert set(single["scores"]) == {"0", "1"}
    capsys.readouterr()
    for argv, message in (
        (["generate", str(tmp_path / "a"), "fun"], "generation needs a soft prompt"),
        (["export", str(tmp_path / "a"), "--out", str(tmp_path / "e")], "has no PEFT form"),
        (["ensemble", str(tmp_path / "a"), "--data", files[1]], "members are soft prompts"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
