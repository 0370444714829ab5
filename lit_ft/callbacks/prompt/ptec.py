"""PTEC: prompt-tuned embedding classification (Buchner et al., 2024) — a soft prompt plus a trained linear
classification head on a frozen decoder LM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback, check_optional_lr, check_optional_wd
from lit_ft.core.registry import technique
from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding, build_prompt_embedding
from lit_ft.core.introspect import find_hf_model, find_input_embeddings, module_param_names
from lit_ft.core.prompts import ModelGeometry, PromptError, attach_prompt
from lit_ft.core.validate import check_choice, check_int, check_str

INITS = ("labels", "vocab", "text", "random")
#: attribute names of the classification head on Hugging Face ``*ForSequenceClassification`` models
HEAD_NAMES = ("score", "classifier", "classification_head")
HEAD_WEIGHTS = "classification_head.safetensors"


def find_classification_head(hf_model: nn.Module, name: str | None = None, owner: str = "PTEC") -> tuple[str, nn.Module]:
    """``(attribute name, module)`` of the sequence-classification head of ``hf_model`` (``score`` on decoders such
    as LlamaForSequenceClassification, ``classifier`` on BERT-like encoders); ``name`` forces one attribute."""
    names = (name,) if name else HEAD_NAMES
    for n in names:
        m = getattr(hf_model, n, None)
        if isinstance(m, nn.Module) and any(True for _ in m.parameters()):
            return n, m
    raise PromptError(
        f"{owner}: {type(hf_model).__name__} has no classification head (looked for attribute(s) {list(names)}). "
        "PTEC trains a soft prompt with the head of an AutoModelForSequenceClassification model: use "
        "lit_ft.modules.ClassificationModule (or a module holding such a model), or name the head with `head`."
    )


@technique(name="ptec", family="prompt",
           paper="Prompt Tuned Embedding Classification for Industry Sector Allocation", arxiv="2309.12075")
class PTEC(PromptCallback):
    """Prompt-tuned embedding classification: a soft prompt and the classification head train, the LM is frozen.

    Paper: Buchner, Schmidt, Pachinger et al., *Prompt Tuned Embedding Classification for Industry Sector
    Allocation* (NAACL 2024 industry track); code ``EQTPartners/PTEC`` (``ptec_tuner.py``, ``model.py``).

    Algorithm: ``n`` virtual tokens ``P`` are prepended to the input embeddings (as :class:`PromptTuning`); the
    decoder's last real token's hidden state goes through the linear head of ``AutoModelForSequenceClassification``
    (``score``), one logit per label — no text generation, no vocabulary projection. The loss is the module's: with
    ``ClassificationModule(multi_label=True, pos_weight=...)`` the paper's ``BCEWithLogitsLoss(pos_weight)``
    (``pos_weight="balanced"`` = the code's max-count / count weights), otherwise softmax cross-entropy. Only ``P``
    and the head train, with two learning rates (prompt ``learning_rate``, head ``head_learning_rate``).

    The injector removes the prompt positions from the trunk's outputs, so Hugging Face's pooling (the rightmost
    token that is not padding, found from ``input_ids``) still picks the last real token, with left or right padding.

    Artifacts: the prompt (``prompt.safetensors`` + ``prompt_config.json``) and the head
    (``classification_head.safetensors``) go to ``save_dir`` when fit ends; :func:`load_ptec` puts both back on a
    model.

    Args:
        num_virtual_tokens: prompt length ``n`` (>= 1; the code's default ``sp_len`` is 100, searched in 50..200).
        init: ``"labels"`` (default, as the code: embeddings of the tokens of the DataModule's label names joined by
            spaces — cut to a seeded random subset when longer than ``n``, padded with sampled vocabulary tokens when
            shorter; without label names it falls back to ``"vocab"``), ``"vocab"``, ``"text"`` (``init_text``) or
            ``"random"`` (see :class:`PromptTuning`).
        init_text: the text for ``init="text"``.
        peft_weights: folder of a PEFT prompt-tuning save whose ``prompt_embeddings`` initialise the prompt.
        seed: seed of the initialisation.
        head: attribute of the HF model holding the head; None = the first of ``score``, ``classifier``,
            ``classification_head``.
        head_learning_rate: lr of the head's tensors (own param group); the code's ``ch_lr`` default is 1e-5.
            None = the optimizer's lr.
        head_weight_decay: weight decay of the head's tensors; None = that of the group they came from.
        freeze_backbone: freeze every model tensor except the prompt and the head (default true).
        learning_rate: the prompt's lr (the code's default is 3e-3); None = the optimizer's.
        weight_decay: the prompt's weight decay; None = the optimizer's.
        save_dir: write the prompt and head artifacts here when fit ends (relative: under ``default_root_dir``).
        tokenizer: tokenizer for ``init="labels"/"text"`` when the DataModule has none.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "ptec"

    def __init__(self, num_virtual_tokens: int = 100, init: str = "labels", init_text: str | None = None,
                 peft_weights: str | None = None, seed: int = 0, head: str | None = None,
                 head_learning_rate: float | None = 1e-5, head_weight_decay: float | None = None,
                 freeze_backbone: bool = True, learning_rate: float | None = 3e-3, weight_decay: float | None = None,
                 save_dir: str | None = None, tokenizer: str | None = None, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        check_int("PTEC", "num_virtual_tokens", num_virtual_tokens, minimum=1)
        check_choice("PTEC", "init", init, INITS)
        check_str("PTEC", "init_text", init_text, allow_none=True)
        check_str("PTEC", "peft_weights", peft_weights, allow_none=True, null_means="initialise with `init`")
        if init == "text" and not init_text and peft_weights is None:
            raise ValueError("PTEC: init='text' needs `init_text` (the words whose embeddings start the prompt)")
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"PTEC: `head` must be an attribute name (e.g. 'score') or null, got {head!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.init = init
        self.init_text = init_text
        self.peft_weights = peft_weights
        self.seed = check_int("PTEC", "seed", seed)
        self.head = head
        self.head_learning_rate = check_optional_lr(head_learning_rate, "head_learning_rate", "PTEC")
        self.head_weight_decay = check_optional_wd(head_weight_decay, "head_weight_decay", "PTEC")

    # -- source ----------------------------------------------------------------------------------------------------
    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> PromptEmbedding:
        find_classification_head(hf_model, self.head)  # fail early on a model without a head
        if self.init != "labels" or self.peft_weights is not None:
            return build_prompt_embedding(self, trainer, hf_model, geometry)
        n = self.num_virtual_tokens
        g = torch.Generator().manual_seed(self.seed)
        ids = self.label_token_ids(trainer, geometry.vocab_size, g)
        source = PromptEmbedding(geometry, n)
        source.initialise("text", find_input_embeddings(hf_model), ids, g)
        return source

    def label_token_ids(self, trainer: pl.Trainer, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
        """The ``n`` token ids of the ``"labels"`` initialisation (see the class docstring)."""
        n = self.num_virtual_tokens
        dm = getattr(trainer, "datamodule", None)
        names = getattr(dm, "label_names", None) if dm is not None else None
        tok = self.tokenizer_for(trainer) if names else None
        ids: list[int] = []
        if names and tok is not None:
            ids = [i for i in tok(" ".join(str(x) for x in names), add_special_tokens=False)["input_ids"]
                   if 0 <= i < vocab_size]
        else:
            rank_zero_info("PTEC: no label names / tokenizer for init='labels'; initialising from sampled vocabulary")
        t = torch.tensor(ids, dtype=torch.long)
        if len(ids) > n:
            return t[torch.randperm(len(ids), generator=generator)[:n]]
        fill = torch.randint(0, vocab_size, (n - len(ids),), generator=generator)
        return torch.cat([t, fill])

    # -- head ------------------------------------------------------------------------------------------------------
    def head_module(self, pl_module: pl.LightningModule) -> nn.Module:
        return find_classification_head(find_hf_model(pl_module), self.head)[1]

    def head_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        return module_param_names(pl_module, [self.head_module(pl_module)], owner="PTEC")

    def extra_trainable(self, pl_module: pl.LightningModule) -> list[str]:
        return self.head_param_names(pl_module)

    def group_hparams(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        out = super().group_hparams(pl_module)
        hp: dict[str, float] = {}
        if self.head_learning_rate is not None:
            hp["lr"] = self.head_learning_rate
        if self.head_weight_decay is not None:
            hp["weight_decay"] = self.head_weight_decay
        if hp:
            out.update({n: dict(hp) for n in self.head_param_names(pl_module)})
        return out

    # -- logging and artifacts --------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        head = self.head_module(pl_module)
        norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in head.parameters()))
        pl_module.log("lit_ft/ptec/head_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.save_dir and self.source is not None and trainer.is_global_zero:
            resolve = getattr(self, "resolved_save_dir", None)
            out = resolve(trainer) if resolve is not None else self.save_dir
            save_head(find_hf_model(pl_module), out, self.head)


def save_head(hf_model: nn.Module, directory: str | os.PathLike, head: str | None = None) -> Path:
    """Write the classification head's tensors to ``directory/classification_head.safetensors``."""
    from safetensors.torch import save_file

    _, module = find_classification_head(hf_model, head)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(d / HEAD_WEIGHTS))
    return d / HEAD_WEIGHTS


def load_ptec(model: nn.Module, directory: str | os.PathLike, head: str | None = None, host: nn.Module | None = None):
    """Install a PTEC artifact (prompt + head) on ``model`` (an ``AutoModelForSequenceClassification`` or a module
    holding one); returns the prompt injector. The head's weights are copied into the model's head."""
    from safetensors.torch import load_file

    f = Path(directory) / HEAD_WEIGHTS
    if not f.is_file():
        raise PromptError(f"load_ptec: no {HEAD_WEIGHTS} in {directory} (a PTEC save_dir holds it with the prompt)")
    hf = find_hf_model(model)
    _, module = find_classification_head(hf, head, owner="load_ptec")
    state = load_file(str(f))
    ref = next(module.parameters())
    module.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()})
    return attach_prompt(model, directory, host=host)
