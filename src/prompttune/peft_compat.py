"""Hugging Face PEFT interop: export prompts as PEFT adapters, import PEFT prompt-tuning adapters.

The files follow what PEFT 0.21.2's `save_pretrained` writes (`adapter_config.json` + `adapter_model.safetensors`
with one tensor, `prompt_embeddings`), so `PeftModel.from_pretrained(base, dir)` loads them unchanged:

- prompt tuning (and P-tuning, whose encoder output is the prompt): `PROMPT_TUNING`, `prompt_embeddings` (N, D).
- prefix tuning: `PREFIX_TUNING` without projection, `prompt_embeddings` (P, layers * 2 * kv_heads * head_dim)
  ordered (layer, key/value, head, dim), the layout PEFT's `get_prompt` views back; PEFT rewrites `token_dim` and
  `num_attention_heads` to the key/value sizes for grouped-query models, so we write those directly.

PEFT always puts soft tokens in front of the whole input; a prompt the template places elsewhere is still exported,
with a warning that predictions will differ. With a tokenizer that adds BOS (Llama, Gemma; not SmolLM2 or GPT-2)
prompttune's `{soft}` follows the BOS while PEFT's prompt precedes it, so the two differ there too. Nothing here
imports peft or loads pickles.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from . import artifacts
from .config import build_section
from .data.templates import Template
from .errors import PromptTuneError
from .registry import METHODS, lookup
from .types import BackboneSpec

PEFT_VERSION = "0.21.2"  # the adapter layout written here was checked against this PEFT release
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_COMMON = {"auto_mapping": None, "inference_mode": True, "modules_to_save": None, "revision": None}


def soft_in_front(template: str) -> bool:
    """True when every soft token of `template` sits at the very start of the prompt, where PEFT puts them."""
    parsed = Template(template, require_answer=False)
    if parsed.soft_markers == 0:  # no marker: soft tokens go first
        return True
    first = parsed.segments[0]
    return parsed.soft_markers == 1 and isinstance(first, list) and not "".join(first)


def front_warnings(template: str) -> list[str]:
    """The warning (if any) that PEFT will place this template's soft tokens elsewhere than prompttune does."""
    if soft_in_front(template):
        return []
    return [
        f"template {template!r} does not start with {{soft}}: PEFT puts the soft tokens in front of the whole "
        "input, so its predictions will differ from prompttune's"
    ]


def _load_method(artifact_dir: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(manifest, run config, method with the saved state) without loading the backbone."""
    manifest = artifacts.read_manifest(artifact_dir)
    if manifest.get("kind") == "discrete":  # its method names a search optimiser, which may share a soft method's name
        raise PromptTuneError(
            f"{artifact_dir}: a text prompt found by `search` has no PEFT form; its text is in prompt.json"
        )
    run = yaml.safe_load((artifact_dir / "run.yaml").read_text()) if (artifact_dir / "run.yaml").is_file() else {}
    method_cls = lookup(METHODS, manifest["method"], "method")
    config = build_section(
        method_cls.config_cls, artifacts.read_json(artifact_dir / "method_config.json"), f"{artifact_dir}"
    )
    sizes = manifest["backbone"]

    def no_embeddings(ids: torch.Tensor) -> torch.Tensor:  # export never initialises, so never embeds
        raise PromptTuneError("export does not load the backbone's embeddings")

    spec = BackboneSpec(
        **{k: sizes[k] for k in ("kind", "name", "hidden_size", "num_layers", "num_heads", "num_kv_heads")},
        head_dim=sizes["head_dim"],
        vocab_size=sizes["vocab_size"],
        max_positions=1 << 20,
        embed_tokens=no_embeddings,
    )
    method = method_cls(config, spec)
    method.load_state_dict(artifacts.load_tensors(artifact_dir / "prompt.safetensors"))
    return manifest, run or {}, method


def _prompt_config(tensor: torch.Tensor, sizes: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_attention_heads": sizes["num_heads"],
        "num_layers": sizes["num_layers"],
        "num_transformer_submodules": 1,
        "num_virtual_tokens": tensor.shape[0],
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",  # TEXT/SAMPLE_VOCAB would make PEFT load a tokenizer on load
        "prompt_tuning_init_text": None,
        "token_dim": sizes["hidden_size"],
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def _prefix_config(tensor: torch.Tensor, sizes: dict[str, Any]) -> dict[str, Any]:
    kv_dim = sizes["num_kv_heads"] * sizes["head_dim"]  # PEFT rewrites token_dim/heads to key/value sizes (GQA)
    return {
        "encoder_hidden_size": kv_dim,
        "init_weights": None,
        "num_attention_heads": sizes["num_kv_heads"],
        "num_layers": sizes["num_layers"],
        "num_transformer_submodules": 1,
        "num_virtual_tokens": tensor.shape[0],
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,  # any projection is applied already; PEFT loads the resulting prefix as is
        "token_dim": kv_dim,
    }


_CONFIGS = {"PROMPT_TUNING": _prompt_config, "PREFIX_TUNING": _prefix_config}  # keyed by PEFT's type


def export_peft(artifact_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write a prompttune artifact as a PEFT adapter directory.

    Args:
        artifact_dir: a saved prompttune artifact (prompt_tuning, p_tuning or prefix_tuning on a causal LM).
        out_dir: where `adapter_config.json` and `adapter_model.safetensors` are written (atomically).
    Returns:
        warnings about behaviour PEFT will not reproduce (also issued with `warnings.warn`).
    Raises:
        PromptTuneError: not an artifact, a method PEFT has no equivalent for, or an encoder backbone.
    """
    artifact_dir = Path(artifact_dir)
    manifest, run, method = _load_method(artifact_dir)
    exported = method.peft_export()
    if exported is None:
        raise PromptTuneError(
            f"{artifact_dir}: method {manifest['method']!r} has no PEFT equivalent (PEFT export "
            f"covers prompt tuning, P-tuning and prefix tuning)"
        )
    sizes = manifest["backbone"]
    if sizes["kind"] != "causal_lm":
        raise PromptTuneError(f"{artifact_dir}: PEFT export supports causal LMs only, this prompt is for an encoder")
    peft_type, tensor = exported
    config = _CONFIGS[peft_type](tensor, sizes)
    config = {
        **_COMMON,
        "base_model_name_or_path": run.get("model", sizes.get("name")),
        "peft_version": PEFT_VERSION,
        "task_type": "CAUSAL_LM",
        **config,
    }
    notes = []
    if method.num_soft_slots:
        template = artifacts.read_json(artifact_dir / "template.json")["template"]
        notes += front_warnings(template)
    if manifest.get("head") == "classifier":
        notes.append("the classifier head is not part of a PEFT adapter; only the prompt is exported")
    head_file = artifact_dir / "head.safetensors"
    prior = artifacts.load_tensors(head_file).get("prior") if head_file.is_file() else None
    if prior is not None and bool(prior.any()):
        notes.append("the verbalizer's contextual calibration is not part of a PEFT adapter; PEFT's logits are raw")
    files = {CONFIG: json.dumps(dict(sorted(config.items())), indent=2) + "\n", WEIGHTS: {"prompt_embeddings": tensor}}
    artifacts.write_dir_atomically(out_dir, files, owned=frozenset(files))
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes


def read_adapter(peft_dir: str | Path) -> tuple[dict[str, Any], torch.Tensor]:
    """(adapter_config, prompt_embeddings (N, D)) of a PEFT PROMPT_TUNING adapter directory.

    Raises:
        PromptTuneError: missing files, another peft_type, a pickled `adapter_model.bin`, or unexpected tensors.
    """
    peft_dir = Path(peft_dir)
    if not (peft_dir / CONFIG).is_file():
        raise PromptTuneError(f"{peft_dir}: not a PEFT adapter directory (no {CONFIG}; see PEFT's save_pretrained)")
    config = artifacts.read_json(peft_dir / CONFIG)
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise PromptTuneError(
            f"{peft_dir / CONFIG}: peft_type {peft_type!r} cannot be imported; only PROMPT_TUNING adapters can"
        )
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise PromptTuneError(
            f"{peft_dir / CONFIG}: encoder-decoder adapters (2 transformer submodules) are not supported"
        )
    weights = peft_dir / WEIGHTS
    if not weights.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise PromptTuneError(
                f"{peft_dir}/adapter_model.bin is a pickle, which prompttune never loads; re-save the adapter with "
                "save_pretrained(dir, safe_serialization=True) to get adapter_model.safetensors"
            )
        raise PromptTuneError(f"{weights}: missing")
    tensors = load_file(str(weights))
    if "prompt_embeddings" not in tensors:
        raise PromptTuneError(f"{weights}: no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    prompt = tensors["prompt_embeddings"]
    n = config.get("num_virtual_tokens")
    if prompt.dim() != 2 or (n is not None and prompt.shape[0] != n):
        raise PromptTuneError(f"{weights}: prompt_embeddings has shape {tuple(prompt.shape)}, expected ({n}, hidden)")
    return config, prompt


def import_peft(
    peft_dir: str | Path,
    model: str,
    template: str,
    verbalizer: Any = None,
    out: str | Path | None = None,
    *,
    backbone: Any = None,
    **task: Any,
) -> Path:
    """Turn a PEFT prompt-tuning adapter into a prompttune `prompt_tuning` artifact.

    Args:
        peft_dir: directory with `adapter_config.json` and `adapter_model.safetensors`.
        model: the base model the adapter was trained for (embedded name, path or hub id).
        template: the prompttune template; start it with `{soft}` to reproduce PEFT's predictions.
        verbalizer: label words for the verbalizer head (e.g. `'0= negative,1= positive'`).
        out: artifact directory to write.
        backbone: an already loaded Backbone for `model` (skips loading it again).
        **task: further TaskConfig fields (e.g. `head="generation"`).
    Returns:
        the artifact directory.
    Raises:
        PromptTuneError: see `read_adapter`; or the prompt's width differs from the model's hidden size.
    """
    from .api import PromptTuner, build_model, resolve_labels

    if out is None:
        raise PromptTuneError("import_peft: pass out= (the artifact directory to write)")
    config, prompt = read_adapter(peft_dir)
    tuner = PromptTuner(
        model, "prompt_tuning", backbone=backbone, template=template, verbalizer=verbalizer,
        num_virtual_tokens=prompt.shape[0], **task,
    )  # fmt: skip
    hidden = tuner.backbone.spec.hidden_size
    if prompt.shape[1] != hidden:
        raise PromptTuneError(
            f"{peft_dir}: prompt width {prompt.shape[1]} does not match {model!r}'s hidden size {hidden}; "
            f"was the adapter trained for {config.get('base_model_name_or_path')!r}?"
        )
    tuner.config.out = str(out)
    tuner.model = build_model(tuner.config, tuner.backbone, resolve_labels(tuner.config.task, None))
    with torch.no_grad():
        tuner.model.method.prompt.copy_(prompt)
    for note in front_warnings(template):
        warnings.warn(note, stacklevel=2)
    return tuner.save(out, {"imported_from": str(peft_dir)})


__all__ = ["export_peft", "front_warnings", "import_peft", "read_adapter", "soft_in_front"]
