"""PromptTuning: soft-prompt tuning (Lester et al., 2021), the baseline of the prompt family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.core.registry import technique
from lit_ft.core.prompts import ModelGeometry, PromptError, PromptInputs, PromptSource, init_token_ids
from lit_ft.core.validate import check_choice, check_int, check_str

INITS = ("vocab", "text", "random")
#: the prompt's lr: Lester et al. (2021) train the prompt at 0.3 (Adafactor, 30k steps)
DEFAULT_LEARNING_RATE = 0.3


class PromptEmbedding(PromptSource):
    """``n`` trainable virtual-token embeddings prepended to the input (PEFT's ``PromptEmbedding``).

    ``embedding.weight`` is ``[n, D]``; it is the whole prompt (input-independent, broadcast to the batch as a view).
    """

    kind = "embeddings"

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 20) -> None:
        super().__init__(geometry, num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, geometry.hidden_size)

    def prompt_embeddings(self, inputs: PromptInputs) -> torch.Tensor:
        return self.embedding.weight

    def peft_export(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
        """PEFT ``PROMPT_TUNING``: the same ``[n, D]`` table under PEFT's key (``prompt_embeddings``). Subclasses
        (DePT's embedding update, ...) compute more than PEFT's prompt embedding does: they export nothing unless
        they override this."""
        if type(self) is not PromptEmbedding:
            return None
        return "PROMPT_TUNING", {"prompt_embeddings": self.embedding.weight}, {"prompt_tuning_init": "RANDOM"}

    @torch.no_grad()
    def initialise(self, how: str, word_embeddings: nn.Module, token_ids: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> None:
        """Copy the embeddings of ``token_ids`` (text / vocab init) or draw rows ~ N(0, std of the vocabulary
        embeddings) (random init)."""
        w = word_embeddings.weight
        if token_ids is not None:
            self.embedding.weight.copy_(w[token_ids.to(w.device)].float())
        else:
            std = float(w.float().std())
            self.embedding.weight.copy_(torch.randn(self.embedding.weight.shape, generator=generator) * std)


def load_peft_prompt_embeddings(path: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``prompt_embeddings`` ``[n, D]`` and the config of a PEFT prompt-tuning save (``save_pretrained`` folder)."""
    d = Path(path)
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        raise PromptError(f"PromptTuning: {path} is not a PEFT save (no adapter_config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise PromptError(f"PromptTuning: {path} holds a PEFT {cfg.get('peft_type')} adapter, not PROMPT_TUNING")
    st, bn = d / "adapter_model.safetensors", d / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st))
    elif bn.is_file():
        state = torch.load(str(bn), map_location="cpu", weights_only=True)
    else:
        raise PromptError(f"PromptTuning: no adapter_model.safetensors / .bin in {path}")
    if "prompt_embeddings" not in state:
        raise PromptError(f"PromptTuning: {path} has no 'prompt_embeddings' tensor (keys: {sorted(state)[:4]})")
    return state["prompt_embeddings"], cfg


@technique(name="prompt_tuning", family="prompt",
           paper="The Power of Scale for Parameter-Efficient Prompt Tuning", arxiv="2104.08691")
class PromptTuning(PromptCallback):
    """Soft-prompt tuning: ``n`` trainable vectors prepended to every input; the backbone stays frozen.

    Paper: Lester, Al-Rfou & Constant, *The Power of Scale for Parameter-Efficient Prompt Tuning* (EMNLP 2021).
    Behaviour matches HF PEFT's ``PROMPT_TUNING`` for causal LMs (same outputs on the user's tokens, tested), and a
    PEFT-saved prompt loads with ``peft_weights``. Unlike PEFT, the prompt positions are removed from the model's
    outputs, so logits and labels keep the user's length (no -100 padding needed; same loss).

    Algorithm: ``inputs_embeds = [P; E[x]]``, ``attention_mask = [1^n; m]``, positions ``0..n-1`` for the prompt and
    ``n + pos(x)`` for the tokens; only ``P`` (``n x D``) trains.

    Args:
        num_virtual_tokens: prompt length ``n`` (>= 1).
        init: ``"vocab"`` (embeddings of ``n`` tokens sampled from the vocabulary; default), ``"text"`` (embeddings
            of ``init_text``'s tokens, repeated or cut to ``n``, as PEFT's TEXT), or ``"random"`` (N(0, sigma^2) with
            sigma the std of the vocabulary embeddings; PEFT's RANDOM uses sigma = 1).
        init_text: the text for ``init="text"`` (e.g. ``"Classify the sentiment of this review:"``).
        peft_weights: folder of a PEFT prompt-tuning ``save_pretrained``; its ``prompt_embeddings`` initialise the
            prompt (``num_virtual_tokens`` must match; ``init`` is then ignored).
        seed: seed of the vocabulary / random initialisation.
        freeze_backbone: freeze every model tensor except the prompt (default true).
        learning_rate: the prompt's lr (own param group). Default 0.3, the paper's (Lester et al., Adafactor;
            DePT uses the same 0.3 for its prompt with AdamW). ``None`` = the optimizer's lr, which for a typical
            fine-tuning lr (1e-5..1e-4) barely moves a prompt.
        weight_decay: the prompt's weight decay; ``None`` = the optimizer's.
        save_dir: write ``prompt.safetensors`` + ``prompt_config.json`` here when fit ends (relative paths: under
            the trainer's ``default_root_dir``).
        tokenizer: tokenizer for ``init="text"`` when the DataModule has none.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "prompt_tuning"
    exports_peft = True  # the prompt is the whole trained state (ProMoT, which also tunes the model, turns it off)

    def __init__(self, num_virtual_tokens: int = 20, init: str = "vocab", init_text: str | None = None,
                 peft_weights: str | None = None, seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = DEFAULT_LEARNING_RATE, weight_decay: float | None = None,
                 save_dir: str | None = None, tokenizer: str | None = None, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__  # ProMoT builds on this constructor
        check_int(owner, "num_virtual_tokens", num_virtual_tokens, minimum=1)
        check_choice(owner, "init", init, INITS)
        check_str(owner, "init_text", init_text, allow_none=True)
        check_str(owner, "peft_weights", peft_weights, allow_none=True, null_means="initialise with `init`")
        if init == "text" and not init_text and peft_weights is None:
            raise ValueError("PromptTuning: init='text' needs `init_text` (the words whose embeddings start the prompt)")
        self.num_virtual_tokens = num_virtual_tokens
        self.init = init
        self.init_text = init_text
        self.peft_weights = peft_weights
        self.seed = check_int(owner, "seed", seed)

    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> PromptEmbedding:
        return build_prompt_embedding(self, trainer, hf_model, geometry)


def build_prompt_embedding(cb: Any, trainer: pl.Trainer, hf_model: nn.Module, geometry: ModelGeometry,
                           num_virtual_tokens: int | None = None) -> PromptEmbedding:
    """A :class:`PromptEmbedding` initialised as ``cb`` (``init``, ``init_text``, ``seed``, ``peft_weights``) asks;
    shared by every technique with a vanilla soft prompt (ProMoT, PTEC, ...)."""
    from lit_ft.core.introspect import find_input_embeddings

    owner = type(cb).__name__
    n = num_virtual_tokens or cb.num_virtual_tokens
    source = PromptEmbedding(geometry, n)
    peft = getattr(cb, "peft_weights", None)
    if peft is not None:
        w, _ = load_peft_prompt_embeddings(peft)
        if tuple(w.shape) != (n, geometry.hidden_size):
            raise PromptError(f"{owner}: the PEFT prompt in {peft} is {tuple(w.shape)}, expected "
                              f"({n}, {geometry.hidden_size}) (num_virtual_tokens x hidden size)")
        with torch.no_grad():
            source.embedding.weight.copy_(w.float())
        return source
    g = torch.Generator().manual_seed(cb.seed)
    tok = cb.tokenizer_for(trainer) if cb.init == "text" else None
    ids = init_token_ids(cb.init, n, geometry.vocab_size, tok, cb.init_text, g, owner=owner)
    source.initialise(cb.init, find_input_embeddings(hf_model), ids, g)
    return source
