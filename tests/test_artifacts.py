"""The atomic writers every saved file goes through: a reader, or a run killed mid-write, sees the old file or
the new one; nothing half-written and no temporaries are left; what is written stays readable by other users."""

from __future__ import annotations

import stat

import pytest
import torch
from safetensors import safe_open

from prompttune import artifacts
from prompttune.artifacts import ARTIFACT_FILES, write_dir_atomically, write_file_atomically


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_write_file_atomically_writes_text_bytes_and_tensors(tmp_path):
    write_file_atomically(tmp_path / "sub" / "a.json", '{"x": 1}')
    write_file_atomically(tmp_path / "b.bin", b"\x00\x01")
    t = torch.arange(6.0).view(2, 3).t()  # not contiguous: the writer makes it so
    write_file_atomically(tmp_path / "c.safetensors", {"t": t}, metadata={"step": "3"})

    assert (tmp_path / "sub" / "a.json").read_text() == '{"x": 1}'
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "3"}
        assert torch.equal(f.get_tensor("t"), t)
    assert _mode(tmp_path / "b.bin") == 0o644
    assert not [p for p in tmp_path.rglob(".*")]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.safetensors"
    write_file_atomically(path, {"t": torch.zeros(2)})
    before = path.read_bytes()
    with pytest.raises(AttributeError):
        write_file_atomically(path, {"t": "not a tensor"})  # fails inside the safetensors write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_dir_atomically_replaces_the_artifact_keeps_extras_and_is_readable_by_others(tmp_path):
    out = tmp_path / "artifact"
    write_dir_atomically(out, {"artifact.json": "{}", "head.safetensors": {"prior": torch.ones(2)}})
    (out / "train_log.jsonl").write_text("{}\n")  # written by training, not part of the artifact
    write_dir_atomically(out, {"artifact.json": '{"v": 2}'})

    assert (out / "artifact.json").read_text() == '{"v": 2}'
    assert (out / "train_log.jsonl").is_file()  # the run's own files stay beside the artifact
    assert not (out / "head.safetensors").exists()  # a stale part of the old artifact does not
    assert _mode(out) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_artifact_files_name_every_file_a_soft_artifact_writes(tiny_llama, make_model, tmp_path):
    # A name missing from ARTIFACT_FILES would be carried over from an older artifact on a re-save.
    out = artifacts.save(make_model("prompt_tuning", tiny_llama), {"model": "tiny-llama"}, tmp_path / "a")
    assert "head.safetensors" in {p.name for p in out.iterdir()}
    assert {p.name for p in out.iterdir()} <= ARTIFACT_FILES


def test_write_dir_atomically_refuses_a_file_the_directory_does_not_own(tmp_path):
    # Every writer (soft artifact, discrete artifact, PEFT export) goes through this check, so a file name missing from
    # the owned set fails at once instead of outliving a later re-save that no longer writes it.
    with pytest.raises(ValueError, match="notes.txt"):
        write_dir_atomically(tmp_path / "a", {"artifact.json": "{}", "notes.txt": "x"})
    assert not (tmp_path / "a").exists()
    out = write_dir_atomically(tmp_path / "b", {"adapter_config.json": "{}"}, owned=frozenset({"adapter_config.json"}))
    assert (out / "adapter_config.json").read_text() == "{}"
