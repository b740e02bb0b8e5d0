"""Data files and templates: every format loads the same examples; every user mistake fails with a message that
names the file, row or field."""

from __future__ import annotations

import json

import pytest

from prompttune import PromptTuneError, TaskConfig
from prompttune.data.examples import find_split, load_examples
from prompttune.data.templates import Template
from prompttune.types import Example

ROWS = [("a great movie , great fun .", "1"), ("bad .", "0"), ('he said "no" ; it was\tnot good', "0")]


def _write_tsv(path, rows=ROWS, header="sentence\tlabel"):
    path.write_text(header + "\n" + "".join(f"{t.replace(chr(9), ' ')}\t{lab}\n" for t, lab in rows))
    return path


def _write_csv(path, rows=ROWS):
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def _write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps({"text": t, "label": int(lab)}) + "\n" for t, lab in rows))
    return path


def _message(excinfo) -> str:
    return str(excinfo.value)


# ---- formats ------------------------------------------------------------------------------------------------------
def test_tsv_csv_jsonl_and_json_load_the_same_examples(tmp_path):
    tsv = load_examples(_write_tsv(tmp_path / "d.tsv"))
    csv_ = load_examples(_write_csv(tmp_path / "d.csv"))
    jsonl = load_examples(_write_jsonl(tmp_path / "d.jsonl"))
    (tmp_path / "d.json").write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS]))
    json_ = load_examples(tmp_path / "d.json")
    for loaded in (csv_, jsonl, json_):
        assert [e.fields["text"] for e in loaded] == [t for t, _ in ROWS]
        assert [e.label for e in loaded] == ["1", "0", "0"]  # JSON ints become the same label strings
    assert [e.fields["sentence"] for e in tsv] == [t.replace("\t", " ") for t, _ in ROWS]
    assert [e.source for e in tsv] == [f"{tmp_path / 'd.tsv'}:{n}" for n in (2, 3, 4)]  # line 1 is the header
    assert [e.source for e in jsonl] == [f"{tmp_path / 'd.jsonl'}:{n}" for n in (1, 2, 3)]  # no header in JSONL


def test_row_sources_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    assert [e.source for e in load_examples(path)] == [f"{path}:1", f"{path}:3"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\na\t1\n\nb\t0\n")
    assert [e.source for e in load_examples(tsv)] == [f"{tsv}:2", f"{tsv}:4"]


def test_quoted_csv_field_keeps_its_line_break(tmp_path):
    # Spreadsheet exports quote a cell that holds a line break; the break is part of the text (it was dropped when
    # the file was split into lines before parsing). A BOM and CRLF line ends are read as well.
    path = tmp_path / "d.csv"
    path.write_bytes('\ufefftext,label\r\n"works fine\nno issues",1\r\nbad,0\r\n'.encode())
    loaded = load_examples(path)
    assert [e.fields["text"] for e in loaded] == ["works fine\nno issues", "bad"]
    assert [e.source for e in loaded] == [f"{path}:3", f"{path}:4"]  # the line each row ends on


def test_nested_json_objects_become_dotted_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"review": {"title": "Great", "body": "fun"}, "meta": {"stars": 5}}\n')
    (example,) = load_examples(path, label_field="meta.stars")
    assert example.fields == {"review.title": "Great", "review.body": "fun"} and example.label == "5"
    template = Template("Title: {review.title}\n{review.body}{answer}")
    assert template.render_text(example) == "Title: Great\nfun"
    assert load_examples([{"x": {"text": "a"}, "labels": ["p", "q"]}])[0].label == ("p", "q")


def test_multi_label_lists_and_float_labels(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a", "labels": ["x", "y"]}\n{"text": "b", "labels": 2.0}\n')
    loaded = load_examples(path)
    assert loaded[0].label == ("x", "y")
    assert loaded[1].label == "2"


def test_in_memory_data_and_label_field(tmp_path):
    loaded = load_examples([{"review": "good", "stars": 5}], label_field="stars")
    assert loaded[0].fields == {"review": "good"} and loaded[0].label == "5"
    assert load_examples(["just text"], require_label=False)[0].fields == {"text": "just text"}
    with pytest.raises(PromptTuneError, match="label column 'stars' not found"):
        load_examples([{"text": "good", "label": 1}], label_field="stars")


def test_directory_with_train_and_dev_files(tmp_path, tiny_llama, make_tuner):
    _write_tsv(tmp_path / "train.tsv")
    _write_jsonl(tmp_path / "dev.jsonl", ROWS[:2])
    assert find_split(tmp_path, "train") == tmp_path / "train.tsv"
    assert find_split(tmp_path, "dev") == tmp_path / "dev.jsonl"
    assert find_split(tmp_path, "test") is None
    assert [e.label for e in load_examples(tmp_path)] == ["1", "0", "0"]  # a directory means its train split
    tuner = make_tuner("prompt_tuning", tiny_llama, max_steps=1, eval_every=1)
    result = tuner.fit(tmp_path, quiet=True)
    assert result.best_dev is not None  # dev.jsonl next to train.tsv was found and used
    assert [r["dev"] for r in result.log if "dev" in r][-1]["primary_metric"] == "accuracy"


# ---- data errors --------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(PromptTuneError, match="no such file") as err:
        load_examples(tmp_path / "nope.tsv")
    assert "nope.tsv" in _message(err)


def test_directory_without_train_split(tmp_path):
    with pytest.raises(PromptTuneError, match="no train"):
        load_examples(tmp_path)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n  \n")
    with pytest.raises(PromptTuneError, match="file is empty") as err:
        load_examples(path)
    assert str(path) in _message(err)


def test_header_only_file(tmp_path):
    path = tmp_path / "h.tsv"
    path.write_text("text\tlabel\n")
    with pytest.raises(PromptTuneError, match="no data rows"):
        load_examples(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(PromptTuneError, match="unknown data format"):
        load_examples(path)


def test_missing_label_column(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tscore\ngood\t1\n")
    with pytest.raises(PromptTuneError, match="no label column") as err:
        load_examples(path)
    assert "score" in _message(err) and str(path) in _message(err)
    assert load_examples(path, require_label=False)[0].label is None
    headless = tmp_path / "h.tsv"  # no header row: its first example became the column names
    headless.write_text("a great film\t1\nbad\t0\n")
    with pytest.raises(PromptTuneError, match=r"columns are \['a great film', '1'\] \(the first line .* header\)"):
        load_examples(headless)


def test_texts_to_predict_need_not_carry_the_named_label_column(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("review\nnice one\n")
    with pytest.raises(PromptTuneError, match="label column 'sentiment' not found"):
        load_examples(path, label_field="sentiment")
    assert load_examples(path, label_field="sentiment", require_label=False)[0].fields == {"review": "nice one"}


def test_empty_label_value_names_the_row(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\ngood\t1\nbad\t\n")
    with pytest.raises(PromptTuneError, match=r"d\.tsv:3: missing value in label column 'label'"):
        load_examples(path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n{"text": "c", "label": 0}\n')
    with pytest.raises(PromptTuneError, match=r"d\.jsonl:2: not valid JSON"):
        load_examples(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n["b", 0]\n')
    with pytest.raises(PromptTuneError, match=r"d\.jsonl:2: expected a JSON object"):
        load_examples(path)


@pytest.mark.parametrize(
    "content,line", [("text,label\ngood,1\nbad,0,extra\n", 3), ("text,label\ngood,1\nbad\n", 3)], ids=["extra", "short"]
)
def test_csv_with_wrong_column_count(tmp_path, content, line):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(PromptTuneError, match=rf"d\.csv:{line}: expected 2 columns \(text, label\)"):
        load_examples(path)


def test_label_not_covered_by_the_verbalizer(tmp_path, tiny_llama, make_tuner):
    path = _write_tsv(tmp_path / "train.tsv", [("good", "1"), ("bad", "0"), ("meh", "2")])
    tuner = make_tuner("prompt_tuning", tiny_llama)
    with pytest.raises(PromptTuneError, match=r"train\.tsv:4: label '2' is not covered") as err:
        tuner.fit(path, quiet=True)
    assert "['0', '1']" in _message(err)


def test_unknown_dev_label_fails_before_training(tmp_path, tiny_llama, make_tuner):
    train = _write_tsv(tmp_path / "train.tsv", [("good", "1"), ("bad", "0")])
    dev = _write_jsonl(tmp_path / "dev.jsonl", [("fine", "1"), ("odd", "7")])
    tuner = make_tuner("prompt_tuning", tiny_llama, max_steps=50)
    with pytest.raises(PromptTuneError, match=r"dev\.jsonl:2: label '7' is not covered"):
        tuner.fit(train, dev, quiet=True)
    assert tuner.model is not None and tuner.result is None


# ---- templates ----------------------------------------------------------------------------------------------------
def test_template_without_answer():
    with pytest.raises(PromptTuneError, match=r"missing \{answer\}"):
        Template("Review: {text}{soft}")
    with pytest.raises(PromptTuneError, match="template"):
        TaskConfig(template="Review: {text}", head="verbalizer")
    assert Template("Review: {text}{soft}", require_answer=False).fields == ["text"]  # encoders read [CLS]
    TaskConfig(template="Review: {text}", head="classifier")


def test_text_after_answer_and_no_field():
    with pytest.raises(PromptTuneError, match="after \\{answer\\}"):
        Template("{text}{answer} thanks")
    with pytest.raises(PromptTuneError, match="no data field"):
        Template("Sentiment:{soft}{answer}")


def test_field_not_in_the_data(tiny_llama):
    template = Template("Title: {title}\nReview: {text}{answer}")
    example = Example({"text": "good"}, "1", "train.tsv:7")
    with pytest.raises(PromptTuneError, match=r"train\.tsv:7: template field \{title\} not in the data") as err:
        template.encode(example, tiny_llama.tokenizer, 0, 512)
    assert "['text']" in _message(err)


def test_text_field_falls_back_to_the_sentence_column(tiny_llama):
    template = Template("Review: {text}{answer}")
    tok = tiny_llama.tokenizer
    prompt = template.encode(Example({"sentence": "good fun"}), tok, 0, 512)
    assert list(prompt.ids) == tok("Review: good fun", add_special_tokens=False)["input_ids"]
    assert template.encode(Example({"x": "a"}), tok, 0, 512).ids == tuple(tok("Review: a")["input_ids"])


def test_field_names_are_any_column_name():
    # Spreadsheet headers have spaces and punctuation; spaces inside the braces are trimmed.
    template = Template("Review: {Review Text} ({ stars-given }){soft:2}{answer}")
    assert template.fields == ["Review Text", "stars-given"]
    example = Example({"Review Text": "good", "stars-given": "5"})
    assert template.render_chunks(example) == ["Review: good (5)", ""]
    # A JSON-like literal is not a field (a colon not followed by a count), and `{{`/`}}` stay literal braces.
    assert Template('Answer as {"label": x}. {text}{answer}').fields == ["text"]


def test_literal_braces():
    template = Template("{{json}} {text}{answer}")
    assert template.render_chunks(Example({"text": "a"})) == ["{json} a"]


def test_prompt_longer_than_the_context_names_the_row(tmp_path, tiny_llama, make_tuner):
    long_text = " ".join(["the movie was good and the story was great"] * 80)  # well over 512 tokens
    path = _write_tsv(tmp_path / "train.tsv", [("good", "1"), (long_text, "0")])
    tuner = make_tuner("prompt_tuning", tiny_llama)
    with pytest.raises(
        PromptTuneError, match=r"train\.tsv:3: prompt is \d+ tokens, longer than the model's limit of 512"
    ):
        tuner.fit(path, quiet=True)

    tuner = make_tuner("prompt_tuning", tiny_llama, truncate=True, max_steps=1)
    tuner.fit(path, quiet=True)
    (ex,) = load_examples(path)[1:]
    (row,) = tuner.model.encode([ex])[0]
    tok = tiny_llama.tokenizer
    suffix = tok(" Sentiment:", add_special_tokens=False)["input_ids"]
    assert len(row.ids) <= 512
    assert list(row.ids[-len(suffix) :]) == suffix  # the field was shortened, not the end of the template
    assert tok.decode(row.ids[:10]).startswith("Review: the movie was good")


def test_max_length_option_and_truncate(tiny_llama):
    template = Template("Review: {text}{soft} Sentiment:{answer}")
    example = Example({"text": "the plot was bad and the ending was worse . " * 3}, "0", "dev.tsv:9")
    with pytest.raises(PromptTuneError, match=r"dev\.tsv:9: prompt is \d+ tokens, longer than the model's limit of 20"):
        template.encode(example, tiny_llama.tokenizer, 4, 20)
    prompt = template.encode(example, tiny_llama.tokenizer, 4, 20, truncate=True)
    assert len(prompt.ids) <= 20 and len(prompt.soft) == 4


# ---- soft-token placement -----------------------------------------------------------------------------------------
def _n(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_soft_slots_in_front_after_an_instruction_and_in_the_middle(tiny_llama):
    tok = tiny_llama.tokenizer
    ex = Example({"text": "good fun ."})
    pad = tiny_llama.pad_id

    front = Template("{soft}Review: {text} Sentiment:{answer}").encode(ex, tok, 3, 512, placeholder=pad)
    assert front.soft == (0, 1, 2)
    assert list(front.ids[3:]) == tok("Review: good fun . Sentiment:", add_special_tokens=False)["input_ids"]

    no_marker = Template("Review: {text} Sentiment:{answer}").encode(ex, tok, 3, 512, placeholder=pad)
    assert no_marker == front  # without a marker the soft tokens go in front (Lester et al.)

    k = _n(tok, "Classify the review.")
    after = Template("Classify the review.{soft} Review: {text} Sentiment:{answer}").encode(
        ex, tok, 3, 512, placeholder=pad
    )
    assert after.soft == (k, k + 1, k + 2)
    assert all(after.ids[i] == pad for i in after.soft)

    m = _n(tok, "Review: good fun .")
    middle = Template("Review: {text}{soft} Sentiment:{answer}").encode(ex, tok, 3, 512, placeholder=pad)
    assert middle.soft == (m, m + 1, m + 2)
    assert len(middle.ids) == m + 3 + _n(tok, " Sentiment:")


def test_soft_tokens_split_between_markers(tiny_llama):
    tok = tiny_llama.tokenizer
    ex = Example({"text": "good"})
    split = Template("{soft}Review: {text}{soft} Sentiment:{answer}")
    assert split.soft_counts(5) == [3, 2]
    prompt = split.encode(ex, tok, 5, 512)
    m = _n(tok, "Review: good")
    assert prompt.soft == (0, 1, 2, 3 + m, 4 + m)

    explicit = Template("{soft:1}Review: {text}{soft:3} Sentiment:{answer}")
    assert explicit.encode(ex, tok, 4, 512).soft == (0, 1 + m, 2 + m, 3 + m)
    with pytest.raises(PromptTuneError, match="soft markers hold 4 tokens but the method has 5"):
        explicit.encode(ex, tok, 5, 512)
    assert explicit.encode(ex, tok, 0, 512).soft == ()  # the manual prompt: markers receive nothing


def test_encoder_soft_slots_follow_cls(tiny_bert):
    tok = tiny_bert.tokenizer
    ex = Example({"text": "good fun"})
    front = Template("{soft}Review: {text}", require_answer=False).encode(ex, tok, 2, 512, add_suffix=True)
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    assert front.ids[0] == cls_id and front.ids[-1] == sep_id
    assert front.soft == (1, 2)
    k = _n(tok, "Review: good fun")
    middle = Template("Review: {text}{soft}", require_answer=False).encode(ex, tok, 2, 512, add_suffix=True)
    assert middle.soft == (1 + k, 2 + k)
    assert len(middle.ids) == k + 4


def test_soft_slot_indices_reach_the_batch(tiny_llama, make_model):
    """Through the model: the method sees the template's slots at the right columns under left padding."""
    model = make_model("prompt_tuning", tiny_llama, template="Review: {text}{soft} Sentiment:{answer}")
    examples = load_examples(
        [{"text": "good fun ."}, {"text": "the plot was bad and the ending was worse ."}], require_label=False
    )
    (short,), (long,) = model.encode(examples)
    batch = model.make_batch([short, long])
    T = batch.input_ids.shape[1]
    assert T == len(long.ids)
    assert batch.soft_positions[1].tolist() == list(long.soft)
    assert batch.soft_positions[0].tolist() == [i + T - len(short.ids) for i in short.soft]
    assert batch.read_positions[:, 0].tolist() == [T - 1, T - 1]
    assert batch.attention_mask[0].tolist() == [0] * (T - len(short.ids)) + [1] * len(short.ids)
    assert batch.position_ids[0, T - len(short.ids) :].tolist() == list(range(len(short.ids)))
