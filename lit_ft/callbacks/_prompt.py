"""Shared plumbing for prompt techniques (``docs/architecture.md``, "Prompts").

:class:`PromptCallback` installs a technique's :class:`~lit_ft.core.prompts.PromptSource` at ``setup`` (any stage,
before the optimizer exists and before a checkpoint is restored), registers it as a submodule of the
LightningModule (``pl_module.lit_ft_prompts[<name>]``: moved, checkpointed and DDP-synchronised with the module),
activates it in the HF model's :class:`~lit_ft.core.prompts.PromptInjector`, freezes the backbone through the
shared parameter-plan registry (composes with every other parameter callback; never unfreezes what the user froze),
gives the technique's tensors their own learning rates at ``on_fit_start``, logs, and writes the prompt artifact
(``prompt.safetensors`` + ``prompt_config.json``) when training ends.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks._owned_tensors import OwnedTensorsCallback
from lit_ft.core.introspect import find_hf_model
from lit_ft.core.pictures import log_html
from lit_ft.core.prompts import (
    HOST_ATTR,
    claim_injector,
    install_source,
    load_tokenizer,
    model_geometry,
    ModelGeometry,
    PromptError,
    PromptInjector,
    PromptSource,
    save_prompt,
    uninstall_source,
)
from lit_ft.core.validate import check_optional_lr, check_optional_wd, check_str  # noqa: F401  (re-exported)


class PromptCallback(OwnedTensorsCallback):
    """Base class of prompt techniques.

    Subclasses implement :meth:`build_source` and may override :meth:`extra_trainable` (tensors of the model that
    train with the prompt, e.g. a classification head), :meth:`group_hparams` (more learning rates) and the usual
    Lightning hooks (call ``super()``).

    Common arguments (subclasses expose them):
        freeze_backbone: freeze every model tensor except the technique's (default). ``False`` trains the prompt
            together with whatever the module itself trains.
        learning_rate: lr of the prompt's tensors (their own param group); ``None`` = the optimizer's lr. Each
            technique defaults it to its paper's (or authors' code's) value, since a prompt at a fine-tuning lr
            barely moves; the value goes through :func:`~lit_ft.core.optim.assign_group_hparams` at ``on_fit_start``
            like an explicit one (a resumed run restores the checkpoint's rates unless ``ConfiguredLearningRate``
            re-applies this run's).
        weight_decay: weight decay of the prompt's tensors; ``None`` = that of the group they came from.
        save_dir: write the prompt artifact here when ``fit`` ends (rank 0); a relative path is relative to the
            trainer's ``default_root_dir``; ``None`` = do not.
        tokenizer: tokenizer (local folder or lit_ft asset name) for text initialisation when the DataModule has no
            ``tokenizer`` attribute.
        picture_every_n_steps: after every that many optimizer steps, an HTML table of each virtual token's nearest
            vocabulary tokens (cosine similarity to the input embedding matrix), ``<log_dir>/<technique_name>/
            prompt_tokens_step{N}.html`` and a W&B ``Html`` when a ``WandbLogger`` is attached
            (:mod:`lit_ft.core.picture_prompts`); 0 = never (default). Only prompts in the input-embedding space
            that are the same for every input have such neighbours (a prefix source is skipped, with a note).
    """

    #: a prompt makes the step cost more, not less (extra positions, a full backward through the frozen trunk):
    #: no flops_fraction claim to measure
    flops_every_n_steps = 0

    technique_name = "prompt"
    #: name of the source under ``pl_module.lit_ft_prompts``
    source_name = "prompt"

    #: nearest vocabulary tokens shown per virtual token in the prompt picture
    picture_top_k: int = 5

    owned_what = "the prompt"
    #: the saved prompt is also written as a PEFT adapter when its source can be (PromptTuning, PrefixTuning);
    #: False where the technique trains more than the prompt (a head, the model), which PEFT's prompt would lack
    exports_peft: bool = False

    def __init__(self, freeze_backbone: bool = True, learning_rate: float | None = None,
                 weight_decay: float | None = None, save_dir: str | None = None, tokenizer: str | None = None,
                 picture_every_n_steps: int = 0) -> None:
        owner = type(self).__name__
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, picture_every_n_steps)
        # a tokenizer folder or asset name, loaded at setup: a non-string would fail there without naming it
        self.tokenizer = check_str(owner, "tokenizer", tokenizer, allow_none=True, null_means="the datamodule's")
        self.source: PromptSource | None = None
        self.injector: PromptInjector | None = None
        self._host: pl.LightningModule | None = None

    # -- to implement ----------------------------------------------------------------------------------------------
    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: torch.nn.Module,
                     geometry: ModelGeometry) -> PromptSource:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------------
    def tokenizer_for(self, trainer: pl.Trainer) -> Any:
        """The DataModule's tokenizer, else ``tokenizer`` loaded (``None`` when neither is available)."""
        dm = getattr(trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None) if dm is not None else None
        if tok is None and self.tokenizer is not None:
            tok = load_tokenizer(self.tokenizer)
        return tok

    def source_param_names(self, pl_module: pl.LightningModule, name: str | None = None) -> list[str]:
        prefix = f"{HOST_ATTR}.{name or self.source_name}."
        return [n for n, _ in pl_module.named_parameters() if n.startswith(prefix)]

    def owned_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        return self.source_param_names(pl_module)

    @property
    def installed(self) -> bool:
        return self.source is not None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies

        refuse_sharded_strategies(trainer, type(self).__name__, "the prompt module sits outside the sharded model, so "
                                  "its gradients would not be averaged across ranks (each rank would train its own "
                                  "prompt)")
        if self.source is None or self._host is not pl_module:
            self.install(trainer, pl_module)
        super().setup(trainer, pl_module, stage)  # parameter plan (fit only)

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        hf = find_hf_model(pl_module)
        inj = claim_injector(hf, owner, self.source)
        geometry = model_geometry(hf)
        source = self.build_source(trainer, pl_module, hf, geometry)
        install_source(pl_module, self.source_name, source, inj, hf)
        self.source, self.injector, self._host = source, inj, pl_module
        n_params = sum(t.numel() for t in source.parameters())
        rank_zero_info(f"{owner}: {type(source).__name__} ({source.kind}, {source.num_virtual_tokens} virtual tokens, "
                       f"{n_params:,} parameters) installed")

    def remove(self) -> None:
        """Take the prompt out of the model (its tensors leave the LightningModule)."""
        uninstall_source(self._host, self.source_name, self.injector)
        self.source = self.injector = self._host = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.source is not None:
            norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in self.source.parameters()))
            pl_module.log(f"lit_ft/{self.technique_name}/prompt_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def draw_pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """The prompt picture at optimizer step ``step`` (every rank calls; rank 0 computes and writes): each
        virtual token's nearest vocabulary tokens."""
        page = None
        if trainer.is_global_zero and self.source is not None:
            from lit_ft.core.introspect import find_input_embeddings
            from lit_ft.core.picture_prompts import nearest_tokens, nearest_tokens_html, static_prompt_embeddings
            from lit_ft.core.picture_tokens import find_tokenizer

            prompt = static_prompt_embeddings(self.source)
            if prompt is None:
                if not getattr(self, "_picture_skip_noted", False):
                    self._picture_skip_noted = True
                    rank_zero_info(f"{type(self).__name__}: no prompt picture: its {type(self.source).__name__} "
                                   f"({self.source.kind}) has no per-token embeddings shared by every input")
            else:
                vocab = find_input_embeddings(find_hf_model(pl_module)).weight
                ids, sims = nearest_tokens(prompt, vocab, k=self.picture_top_k)
                tok = find_tokenizer(trainer, pl_module)
                if tok is None and self.tokenizer is not None:  # loaded once, at the first picture
                    if "_picture_tokenizer" not in self.__dict__:
                        self._picture_tokenizer = self.tokenizer_for(trainer)
                    tok = self._picture_tokenizer
                self.last_nearest_ids = ids.tolist()  # plain ints: no tensor outlives the picture
                page = nearest_tokens_html(ids, sims, tok, title=f"{type(self).__name__}: nearest vocabulary "
                                                                  f"tokens of the prompt, step {step}")
        self.last_picture = log_html(trainer, page, self.technique_name, "prompt_tokens", step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir and self.source is not None and trainer.is_global_zero:
            out = self.resolved_save_dir(trainer)
            save_prompt(self.source, out, metadata=self.artifact_metadata(pl_module), peft=self.exports_peft)
            rank_zero_info(f"{type(self).__name__}: prompt saved to {out}")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source_name)

    def load_source_state(self, path: str) -> dict[str, torch.Tensor]:
        """Tensors of a saved artifact (``prompt.safetensors`` in a folder)."""
        from pathlib import Path

        from safetensors.torch import load_file

        f = Path(path)
        f = f / "prompt.safetensors" if f.is_dir() else f
        if not f.is_file():
            raise PromptError(f"{type(self).__name__}: no prompt weights at {path}")
        return load_file(str(f))


_SAFE = re.compile(r"[^0-9A-Za-z_]")


def safe_module_key(text: str) -> str:
    """A ``ModuleDict`` key from arbitrary text."""
    return _SAFE.sub("_", text)
