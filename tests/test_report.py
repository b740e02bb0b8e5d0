"""`benchmarks/report.py`: the README's benchmark block is regenerated from the result records, never typed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    if str(ROOT / "benchmarks") not in sys.path:  # report.py imports its sibling discrete.py
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(dataset, seed, method, acc):
    return {"dataset": dataset, "seed": seed, "method": method, "test_accuracy": acc, "trainable_params": 16}


def test_readme_block_is_rewritten_between_its_markers_only(tmp_path):
    report = _report()
    records = [_record("sst-2", s, m, a) for s in (13, 21) for m, a in (("prompt_tuning", 0.8), ("ept", 0.85))]
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- BENCHMARK -->\nold numbers\n<!-- /BENCHMARK -->\n## next\n")
    assert report.update_readme(readme, report.readme_block(records))
    text = readme.read_text()
    assert text.startswith("# title\n<!-- BENCHMARK -->\n") and text.endswith("<!-- /BENCHMARK -->\n## next\n")
    assert "old numbers" not in text
    assert "| ept | 85.0 (2/5) | – | – | – | 16 |" in text  # mean over the seeds run, and how many of 5
    assert "| ept | 2 | +5.0 (0.0) | 2/0/0 |" in text  # paired against prompt tuning on the same cells
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers here\n")
    assert not report.update_readme(plain, "x") and plain.read_text() == "no markers here\n"


def test_verbalizer_rows_are_paired_per_cell_across_datasets():
    report = _report()

    def run(dataset, seed, ref, ens):
        rows = [("16-shot", "prompt_tuning + verbalizer", ref)]
        rows.append(("ensemble", "ensemble of 6 learned prompts (mean)", ens))
        return {"dataset": dataset, "seed": seed, "rows": [dict(group=g, row=r, test_accuracy=a) for g, r, a in rows]}

    runs = [run("sst-2", 13, 0.80, 0.82), run("sst-2", 21, 0.80, 0.79), run("mr", 13, 0.70, 0.75)]
    (line,) = [x for x in report.verbalizer_pooled(runs) if x.startswith("| ensemble")]
    # Three cells: +2, -1 and +5 points; the SST-2 column averages its two seeds, MR its one.
    assert line.startswith("| ensemble | ensemble of 6 learned prompts (mean) | 3 | +2.0 (3.0) | 2/0/1 | 1.00 |")
    assert "| +0.5 (n=2) | +5.0 (n=1) | no clear difference |" in line
