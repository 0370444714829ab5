"""Prompt artifacts that HF PEFT can load as well as lit_ft: ``adapter_config.json`` + ``adapter_model.safetensors``
beside ``prompt.safetensors``, so ``PeftModel.from_pretrained(base_model, folder)`` runs the trained prompt.

Only sources whose tensors PEFT has a module for export (a source says so through ``peft_export()``):
``PromptTuning`` (PEFT ``PROMPT_TUNING``: the ``[n, D]`` embeddings) and ``PrefixTuning`` (PEFT ``PREFIX_TUNING``:
the ``[n, 2 L kv]`` key/value table; with the re-parameterisation MLP the table it computes is exported, as PEFT's
own ``save_pretrained`` does, so the folder loads with ``prefix_projection`` off). The other prompt techniques
(DePT, EPT, IAPT, CPT, ...) change the model in ways PEFT has no module for, and write only lit_ft's artifact.

The config names only what PEFT cannot read off the base model; PEFT fills ``token_dim``, ``num_layers`` and
``num_attention_heads`` from the model it is loaded onto, exactly as for its own saves. Writing needs no ``peft``
install.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "write_peft_adapter"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def write_peft_adapter(peft_type: str, tensors: Mapping[str, torch.Tensor], num_virtual_tokens: int,
                       directory: str | Path, base_model: str = "", extra: Mapping[str, Any] | None = None) -> Path:
    """Write a PEFT prompt-learning adapter (``peft_type`` ``PROMPT_TUNING`` or ``PREFIX_TUNING``, causal LM) into
    ``directory``: ``tensors`` as ``adapter_model.safetensors`` and its ``adapter_config.json``. Returns the
    config's path."""
    from safetensors.torch import save_file

    if peft_type not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise ValueError(f"write_peft_adapter: peft_type must be 'PROMPT_TUNING' or 'PREFIX_TUNING', got {peft_type!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(d / PEFT_WEIGHTS))
    cfg: dict[str, Any] = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(num_virtual_tokens),
        "num_transformer_submodules": 1,
        "base_model_name_or_path": base_model or None,
        "inference_mode": True,
    }
    cfg.update(extra or {})
    path = d / PEFT_CONFIG
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path
