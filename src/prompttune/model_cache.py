"""The on-disk model cache (`$PROMPTTUNE_CACHE`, else `~/.cache/prompttune`): GGUF files dequantized once into fp32
Hugging Face directories under `models/<name>-<sha256[:16]>/`, chunked GGUF files joined under `gguf/`, and a memo of
file hashes. Every write is atomic (temporary name, then rename), so concurrent processes never see a partial file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .artifacts import write_file_atomically

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """`$PROMPTTUNE_CACHE`, else `~/.cache/prompttune`."""
    return Path(os.environ.get("PROMPTTUNE_CACHE") or Path.home() / ".cache" / "prompttune").expanduser()


def sha256(path: Path) -> str:
    """Hex sha256 of a file, memoised in `cache_dir()/sha256.json` keyed by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = cache_dir() / "sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    memo[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    # A concurrent writer may drop our entry (last rename wins); that only costs a rehash later.
    write_file_atomically(memo_file, json.dumps(memo, indent=1))
    return digest.hexdigest()


def converted_dir(gguf: Path, name: str) -> Path:
    return cache_dir() / "models" / f"{name}-{sha256(gguf)[:16]}"


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into an fp32 HF directory (safetensors + tokenizer) and return it.

    The directory is written under a temporary name and renamed into place, so readers never see a partial
    copy; if a concurrent process finished first, its copy is kept and ours discarded.
    """
    target = converted_dir(gguf, name)
    if target.is_dir():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to an fp32 model in %s (once; ~30 s)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # save_pretrained refuses "quantized with gguf" models, but the weights are already plain fp32 here.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def assembled_gguf(module: str, name: str) -> Path:
    """A GGUF file that ships in chunks (`module.assemble(path)` joins them), joined once into the cache."""
    path = cache_dir() / "gguf" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            importlib.import_module(module).assemble(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path
