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


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_builds_and_trains(path, tiny_llama, tmp_path, monkeypatch):
    cfg = read_run_config(path)
    assert isinstance(cfg, RunConfig) and cfg.method in METHODS
    assert cfg.data.train and cfg.task.verbalizer and cfg.out
    monkeypatch.chdir(REPO)  # data paths in the configs are relative to the repository root
    for split in (cfg.data.train, cfg.data.dev, cfg.data.test):
        assert split is None or Path(split).exists(), f"{path.name}: {split} is missing"
    tiny = make_config("tiny-llama", cfg.method, base=cfg, max_steps=2, eval_every=1)
    assert tiny.method_config == cfg.method_config  # method fields survive the override
    tuner = PromptTuner(config=tiny, backbone=tiny_llama)
    result = tuner.fit(out=tmp_path / "run", quiet=True)
    assert result.steps == 2 and result.best_dev is not None  # the dev split was found and used
    saved = tuner.save(tmp_path / "artifact")
    assert PromptTuner.load(saved, backbone=tiny_llama).predict(["a great film"])[0] in cfg.task.verbalizer
