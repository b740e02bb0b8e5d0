"""Every shipped run config parses, builds, and trains (on tiny-llama, two steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompttune import PromptTuner, RunConfig
from prompttune.api import make_config
from prompttune.cli import read_run_config
from prompttune.registry import METHODS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_documented_configs_exist():
    names = {p.stem for p in CONFIGS}
    expected = {"sst2_prompt_tuning", "sst2_prefix_tuning", "sst2_p_tuning", "sst2_dept", "tiny_llama_demo"}
    assert expected <= names


def _first_rows(split: str | None, folder: Path, rows: int = 24) -> str | None:
    """The first rows of a JSON-lines/CSV/TSV data file (a directory stays as it is): the test checks the wiring, and
    a large file (thousands of comments) would only slow it down."""
    if split is None or Path(split).is_dir():
        return split
    lines = Path(split).read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and lines[0].lstrip().startswith("["):  # a JSON array: keep it whole
        return split
    folder.mkdir()
    head = folder / Path(split).name
    head.write_text("".join(lines[: rows + (Path(split).suffix in (".csv", ".tsv"))]), encoding="utf-8")
    return str(head)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_builds_and_trains(path, tiny_llama, tmp_path, monkeypatch):
    cfg = read_run_config(path)
    assert isinstance(cfg, RunConfig) and cfg.method in METHODS
    assert cfg.data.train and cfg.out and (cfg.task.verbalizer or cfg.task.head != "verbalizer")
    monkeypatch.chdir(REPO)  # data paths in the configs are relative to the repository root
    for split in (cfg.data.train, cfg.data.dev, cfg.data.test):
        if split and not Path(split).exists() and not Path(split).resolve().is_relative_to(REPO):
            pytest.skip(f"{path.name}: its data ({split}) lives outside the repository and is not on this machine")
        assert split is None or Path(split).exists(), f"{path.name}: {split} is missing"
    files = {k: _first_rows(getattr(cfg.data, k), tmp_path / k) for k in ("train", "dev", "test")}
    tiny = make_config("tiny-llama", cfg.method, base=cfg, max_steps=2, eval_every=1, **files)
    assert tiny.method_config == cfg.method_config  # method fields survive the override
    tuner = PromptTuner(config=tiny, backbone=tiny_llama)
    result = tuner.fit(out=tmp_path / "run", quiet=True)
    assert result.steps == 2 and result.best_dev is not None  # the dev split was found and used
    saved = tuner.save(tmp_path / "artifact")
    loaded = PromptTuner.load(saved, backbone=tiny_llama)
    prediction = loaded.predict([{field: "a great film" for field in loaded.model.template.fields}])[0]
    labels = set(cfg.task.verbalizer or loaded.model.head.labels)
    assert (set(prediction) if isinstance(prediction, tuple) else {prediction}) <= labels


def test_label_words_that_mix_a_leading_space_warn():
    from prompttune.config import parse_verbalizer

    with pytest.warns(UserWarning, match=r"\['great'\] have no leading space"):
        assert parse_verbalizer("0= bad,1= good|great") == {"0": [" bad"], "1": [" good", "great"]}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent words, with or without the space, say nothing
        parse_verbalizer("0= bad,1= good| great")
        parse_verbalizer({"a": "yes", "b": "no"})
