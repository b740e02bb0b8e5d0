"""The `prompttune` CLI, in-process on tiny-llama: every verb, YAML + flags, resume, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prompttune import train as train_module
from prompttune.cli import main

TEMPLATE = "{soft}Review: {text} Sentiment:{answer}"
VERBALIZER = "0= negative,1= positive"
ROWS = [("great movie", "1"), ("bad film", "0"), ("a good and fun story", "1"), ("terrible plot", "0")]
VERBS = ["models", "train", "eval", "predict", "generate", "export", "import-peft"]


def write_tsv(path, rows, header="text\tlabel"):
    path.write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "dev", "test"):
        write_tsv(d / f"{split}.tsv", ROWS)
    return d


def train_args(data, out, *extra):
    return [
        "train", "--model", "tiny-llama", "--train", str(data), "--template", TEMPLATE, "--verbalizer", VERBALIZER,
        "--num-virtual-tokens", "3", "--max-steps", "2", "--eval-every", "1", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(capsys, verb):
    code, out, _ = run(capsys, verb, "--help")
    assert code == 0 and f"usage: prompttune {verb}" in out


def test_train_help_lists_config_and_method_flags(capsys):
    _, out, _ = run(capsys, "train", "--method", "prefix_tuning", "--help")
    for flag in ("--template", "--max-steps", "--train", "--projection, --no-projection", "--cache-prefix"):
        assert flag in out
    assert "Prefix length" in out  # the field's attribute docstring is the help text


def test_text_flags_read_backslash_escapes_and_paths_stay_as_typed():
    # A shell's single quotes keep `\n` as two characters; the README's templates must mean what they mean in Python.
    from prompttune.cli import build_parser

    argv = ["train", "--template", r"Review: {text}\n{soft}Sentiment:\t{answer}", "--init-text", r"a\\nb",
            "--train", r"data\new"]  # fmt: skip
    args = build_parser(argv).parse_args(argv)
    assert args.template == "Review: {text}\n{soft}Sentiment:\t{answer}"
    assert args.init_text == "a\\nb"  # an escaped backslash is one backslash, the n stays a letter
    assert args.train == "data\\new"  # a path is taken as typed
    argv = ["select", "--pool", "p.tsv", "--out", "o.tsv", "--template", r"{text}\n{answer}"]
    assert build_parser(argv).parse_args(argv).template == "{text}\n{answer}"


def test_method_flags_follow_the_yaml_method(capsys, tmp_path):
    (tmp_path / "run.yaml").write_text("method: {name: prefix_tuning, projection: true, init: random}\n")
    code, out, _ = run(capsys, "train", "--config", tmp_path / "run.yaml", "--help")
    assert code == 0 and "method prefix_tuning:" in out and "--projection-hidden" in out


def test_quiet_silences_progress_bars(capsys, data, tmp_path):
    code, _, err = run(capsys, *train_args(data, tmp_path / "art"))
    assert code == 0 and "train:" not in err and "%|" not in err


def test_console_entry_point():
    proc = subprocess.run([sys.executable, "-m", "prompttune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(verb in proc.stdout for verb in VERBS)


def test_models(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and "smollm2-135m" in {m["name"] for m in json.loads(out)["models"]}


def test_train_eval_predict_export_import(capsys, data, tmp_path):
    art = tmp_path / "art"
    code, out, err = run(capsys, *train_args(data, art, "--calibrate", "none", "--json"))
    assert code == 0, err
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert summary["steps"] == 2 and summary["test"]["primary_metric"] == "accuracy"
    assert json.loads((art / "metrics.json").read_text())["trainable_params"] == summary["trainable_params"] > 0

    code, out, _ = run(capsys, "eval", art, "--data", data / "test.tsv", "--json", "--batch-size", "2")
    assert code == 0 and json.loads(out)["accuracy"] == summary["test"]["accuracy"]

    code, out, _ = run(capsys, "predict", art, "great movie", "terrible plot")
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()] == ["great movie", "terrible plot"]
    code, out, _ = run(capsys, "predict", art, "great movie", "--json")
    original = json.loads(out)["predictions"][0]
    assert original["label"] in ("0", "1") and set(original["scores"]) == {"0", "1"}
    # A file of inputs: the same labels as the texts given one by one, written next to each row and its gold label.
    code, out, _ = run(capsys, "predict", art, "--data", data / "test.tsv", "--out", tmp_path / "pred.jsonl")
    assert code == 0 and out.startswith("wrote 4 predictions")
    written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    code, out, _ = run(capsys, "predict", art, *[t for t, _ in ROWS], "--json")
    assert [r["prediction"] for r in written] == [p["label"] for p in json.loads(out)["predictions"]]
    assert [(r["text"], r["label"]) for r in written] == ROWS
    code, out, _ = run(capsys, "predict", art, "great movie", "--out", tmp_path / "one.tsv")  # texts to a file
    assert code == 0 and (tmp_path / "one.tsv").read_text().splitlines()[1].startswith("great movie\t")

    code, out, err = run(capsys, "export", art, "--format", "peft", "--out", tmp_path / "peft")
    assert code == 0 and "warning" not in err
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    imported = tmp_path / "imported"
    code, out, err = run(
        capsys, "import-peft", tmp_path / "peft", "--model", "tiny-llama", "--template", TEMPLATE,
        "--verbalizer", VERBALIZER, "--out", imported,
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = run(capsys, "predict", imported, "great movie", "--json")
    again = json.loads(out)["predictions"][0]
    assert again["label"] == original["label"]
    assert again["scores"] == pytest.approx(original["scores"], abs=1e-4)


def test_label_names_are_the_default_label_words(capsys, tmp_path):
    # A new user's CSV: own column names, label names that are words, no verbalizer given.
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\n" + "".join(f'"{t}",{"pos" if y == "1" else "neg"}\n' for t, y in ROWS))
    art = tmp_path / "art"
    code, out, err = run(
        capsys, "train", "--model", "tiny-llama", "--train", path, "--dev", path, "--label-field", "sentiment",
        "--template", "Review: {review}{soft} Sentiment:{answer}", "--max-steps", "1", "--out", art, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    # One line for a person, not the library line that raised it.
    assert err.strip() == "warning: no verbalizer given: the label names are the label words " + (
        "{'neg': [' neg'], 'pos': [' pos']}; set `verbalizer` to choose words the model reads as the labels' meaning"
    )
    assert json.loads((art / "head.json").read_text())["words"] == {"neg": [" neg"], "pos": [" pos"]}
    code, out, err = run(capsys, "predict", art, "great movie", "--json")  # the saved words: no second warning
    assert code == 0 and err == "" and json.loads(out)["predictions"][0]["label"] in ("neg", "pos")


def test_export_warns_for_soft_tokens_not_in_front(capsys, data, tmp_path):
    args = train_args(data, tmp_path / "art", "--template", "Review: {text}{soft} Sentiment:{answer}")
    assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, "export", tmp_path / "art", "--out", tmp_path / "peft")
    assert code == 0 and err.startswith("warning:") and "{soft}" in err


def test_config_yaml_with_flag_override(capsys, data, tmp_path):
    config = {
        "model": "tiny-llama",
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 2, "init": "random"},
        "task": {"template": TEMPLATE, "verbalizer": {"0": [" negative"], "1": [" positive"]}},
        "train": {"max_steps": 5, "eval_every": 1, "lr": 0.01},
        "data": {"train": str(data / "train.tsv"), "dev": str(data / "dev.tsv")},
        "out": str(tmp_path / "from_yaml"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run(capsys, "train", "--config", path, "--max-steps", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 2 and json.loads(out)["test"] is None  # progress and dev lines: stderr
    assert "train:" in err and "dev accuracy" in err
    saved = yaml.safe_load((tmp_path / "from_yaml" / "run.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["lr"] == 0.01  # flag wins, YAML kept otherwise
    assert saved["method_config"]["num_virtual_tokens"] == 2 and saved["method_config"]["init"] == "random"
    assert load_file(str(tmp_path / "from_yaml" / "prompt.safetensors"))["prompt"].shape[0] == 2


def test_resume_equals_an_uninterrupted_run(capsys, data, tmp_path, monkeypatch):
    extra = ("--max-steps", "4", "--eval-every", "2", "--calibrate", "none")
    assert run(capsys, *train_args(data, tmp_path / "full", *extra))[0] == 0

    save = train_module.save_checkpoint

    def save_then_stop(*args, **kwargs):  # the process "dies" right after the step-2 checkpoint
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    code, _, err = run(capsys, *train_args(data, tmp_path / "cut", *extra))
    assert code == 130 and err.strip() == "error: interrupted"
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file() and not (tmp_path / "cut" / "artifact.json").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    code, _, err = run(capsys, *train_args(data, tmp_path / "cut", *extra, "--resume"))
    assert code == 0, err

    full, cut = (load_file(str(tmp_path / d / "prompt.safetensors")) for d in ("full", "cut"))
    torch.testing.assert_close(cut["prompt"], full["prompt"], rtol=0, atol=1e-6)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut")]
    assert metrics[0]["dev"] == metrics[1]["dev"] and metrics[0]["test"] == metrics[1]["test"]


def test_generate_text_to_text(capsys, tmp_path):
    d = tmp_path / "qa"
    d.mkdir()
    write_tsv(d / "train.tsv", [("is it good", "yes"), ("is it bad", "no")] * 2, header="question\tanswer")
    art = tmp_path / "gen"
    code, _, err = run(
        capsys, "train", "--model", "tiny-llama", "--train", d / "train.tsv", "--head", "generation",
        "--template", "{soft}Question: {question} Answer:{answer}", "--num-virtual-tokens", "2",
        "--max-steps", "2", "--max-new-tokens", "4", "--out", art, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = run(capsys, "generate", art, "is it good", "is it bad", "--max-new-tokens", "3")
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = run(capsys, "generate", art, "is it good", "--json")
    assert code == 0 and isinstance(json.loads(out)["generations"][0]["generation"], str)
    code, out, _ = run(capsys, "eval", art, "--data", d / "train.tsv", "--json")
    assert code == 0 and "exact_match" in json.loads(out)


def _bad_inputs(tmp_path, data):
    write_tsv(tmp_path / "nolabel.tsv", [("great", "x")], header="text\tscore")
    (tmp_path / "empty.tsv").write_text("")
    write_tsv(tmp_path / "unknown.tsv", [("great", "1"), ("meh", "2")])
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    base = ["--model", "tiny-llama", "--template", TEMPLATE, "--verbalizer", VERBALIZER, "--out", tmp_path / "o"]
    return {
        "missing_file": (["train", "--train", tmp_path / "nope.tsv", *base], "nope.tsv"),
        "missing_column": (["train", "--train", tmp_path / "nolabel.tsv", *base], "nolabel.tsv: no label column"),
        "empty_file": (["train", "--train", tmp_path / "empty.tsv", *base], "empty.tsv: file is empty"),
        "unknown_label": (["train", "--train", tmp_path / "unknown.tsv", *base], "unknown.tsv:3: label '2'"),
        "no_answer": (["train", "--train", data, *base, "--template", "{soft}{text}"], "'template'"),
        "bad_flag_value": (["train", "--train", data, *base, "--lr", "fast"], "--lr"),
        "bad_field_value": (["train", "--train", data, *base, "--schedule", "zigzag"], "'schedule'"),
        "unknown_method": (["train", "--method", "lora", "--train", data, *base], "unknown method 'lora'"),
        "bad_yaml": (["train", "--config", tmp_path / "bad.yaml"], "bad.yaml:2:1: invalid YAML"),
        "no_artifact": (["eval", tmp_path / "none", "--data", data / "test.tsv"], "none: no such artifact"),
        "export_bad_dir": (["export", tmp_path / "none", "--out", tmp_path / "x"], "none: no such artifact"),
        "missing_field": (["train", "--train", data, *base, "--template", "{review}{answer}"], "train.tsv:2: template"),
        "not_an_adapter": (
            ["import-peft", data, "--model", "tiny-llama", "--out", tmp_path / "x"],
            "not a PEFT adapter",
        ),
        "predict_nothing": (["predict", tmp_path / "none"], "either TEXTs or --data FILE"),
        "predict_both": (["predict", tmp_path / "none", "a", "--data", data / "test.tsv"], "either TEXTs or --data"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing_file", "missing_column", "empty_file", "unknown_label", "no_answer", "bad_flag_value",
     "bad_field_value", "unknown_method", "bad_yaml", "no_artifact", "export_bad_dir", "missing_field",
     "not_an_adapter", "predict_nothing", "predict_both"],
)  # fmt: skip
def test_user_errors_are_one_line(capsys, tmp_path, data, case):
    argv, expected = _bad_inputs(tmp_path, data)[case]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err + out
