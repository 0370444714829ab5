"""ssToken: self-modulated, semantic-aware token selection (history-model excess loss + attention to the prompt)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str
from lit_ft.core.batch import IGNORE_INDEX, refuse_packed
from lit_ft.core.attention import attention_mass_on_keys
from lit_ft.core.attention import check_attention_layout as _check_attention_layout
from lit_ft.core.introspect import ModelLayoutError, find_decoder_layers, find_hf_model
from lit_ft.core.frozen import FrozenModel, frozen_model_property
from lit_ft.core.layer_hooks import ORDER_READ, register_layer_pre_hook
from lit_ft.core.loss import (
    TokenDecision,
    TokenScores,
    causal_lm_token_nll,
    per_response_min_max,
)
from lit_ft.callbacks.token_selection._sstoken_keep import end_of_turn_ids, protected_topk_mask

_HISTORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HISTORY_DEVICES = ("same", "cpu")
_NO_ATTENTION_HINT = "set gamma=1.0 to use the loss-based score only"
#: the release's warm-up: samples with dataset index < 10000 are scored by attention only (``pre_ratio=0``), read
#: in order (``shuffle=False``) at 3 per GPU x 8 GPUs x 2 accumulation = 48 per optimizer step: 10000 / 48 ≈ 208
RELEASE_WARMUP_STEPS = 208


def check_attention_layout(layer: torch.nn.Module) -> None:
    """:func:`lit_ft.core.attention.check_attention_layout` with SSToken's name and its way around the score."""
    _check_attention_layout(layer, "SSToken", _NO_ATTENTION_HINT)


def prompt_attention_mass(layer: torch.nn.Module, hidden_states: torch.Tensor,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mass each query puts on the prompt keys (:func:`lit_ft.core.attention.attention_mass_on_keys`)."""
    return attention_mass_on_keys(layer, hidden_states, position_embeddings, key_mask, attention_mask, "SSToken")


# ---------------------------------------------------------------------------------------------------------------------
# per-response selection
# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------------------------------
# -- resuming with changed arguments (lit_ft.core.resume): the saved history weights do not depend on keep_ratio,
# the layer or the mixing weight, so those restore; the history's *kind* is what the weights are, so a change to
# another kind of saved history is refused (a loaded model is simply reloaded).
_SAVED_HISTORIES = ("ema", "initial")


def _history_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> str | None:
    if new not in _SAVED_HISTORIES:
        return None  # a loaded model: reloaded from `new`, the saved weights are not needed
    if saved in _SAVED_HISTORIES:
        return (f"the saved history weights are the {'EMA of the training weights' if saved == 'ema' else 'initial weights'}"
                f", not {'an EMA' if new == 'ema' else 'the initial weights'}")
    return "no history weights were saved (a loaded model), so they would start from the trained weights"


def _gamma_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> str | None:
    if float(saved) == 0.0 and float(new) > 0.0 and state.get("history") in _SAVED_HISTORIES \
            and state.get("history_state") is None:
        return "with gamma=0 no history model was kept, so it would start from the trained weights"
    return None


@technique(name="sstoken", family="token_selection",
           paper="ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning", arxiv="2510.18250")
class SSToken(TokenScorerCallback):
    """ssToken — self-modulated and semantic-aware token selection (ICLR 2026; code: jianke0604/ssToken).

    Algorithm, every training step, for each response (= each row of the batch) ``i`` with ``n_i`` valid targets:

    1. ``REL_t = ℓ_his,t − ℓ_θ,t``: per-token NLL of a *history model* minus the current model's (how much the model
       improved on token ``t``), min-max normalised within the response → ``REL'_t ∈ [0, 1]``;
    2. ``a_t`` = attention mass that the query predicting target ``t`` puts on the prompt keys (input positions with
       ``attention_mask = 1`` and ``labels = -100``), averaged over heads, in one decoder layer. The layer's input
       is captured with a forward pre-hook during the training forward and only its attention probabilities are
       recomputed (:func:`prompt_attention_mass`) — never ``output_attentions=True`` for the whole model;
    3. ``score_t = γ·REL'_t + (1 − γ)·a_t``; keep the top ``⌈ρ·n_i⌉`` tokens of each response;
    4. loss = mean NLL over the kept tokens (normalised by the global kept-token count of the accumulation window).

    As the release: the history is the fixed base model (``history="initial"``), and the first ``warmup_steps``
    optimizer steps score by attention alone (``γ = 0``; the release does this for its first 10000 samples).
    Added by lit-ft so that selection cannot starve what it drops (a dropped token never improves, so its REL stays
    low): every response keeps its EOS / end-of-turn tokens and at least ``min_keep_per_response`` tokens, and
    optionally a random ``explore_ratio`` share of its kept slots.

    Alignment: in target space position ``t`` predicts token ``t+1`` from the hidden state at input position ``t``,
    so target ``t`` uses attention row ``t``. (The authors' release pairs attention row ``t`` with the loss of
    token ``t``, i.e. one position off.) Evaluation losses are never filtered.

    Args:
        keep_ratio: ρ, fraction of each response's valid tokens kept, in (0, 1] (paper default 0.6).
        gamma: γ ∈ [0, 1], weight of the loss-based score against the attention score (paper default 0.5).
            ``1.0`` = loss only (no attention work, any decoder layout); ``0.0`` = attention only (no history model).
        attention_layer: index of the decoder layer whose attention is used (negative counts from the end; ``-1`` =
            last layer, as in the paper). Needs a Llama-style layer (Llama, Mistral, Qwen2/3, SmolLM2).
        history: the history model. ``"initial"`` (default, the release) = frozen copy of the weights when
            training starts (the release precomputes the base model's losses; this computes them live);
            ``"ema"`` = exponential moving average of the training weights, updated after every optimizer step
            (``θ_his ← decay·θ_his + (1 − decay)·θ``; the paper's optional variant); otherwise a local HF folder or
            a ``lit_ft.assets`` name (frozen; must share the tokenizer). ``"ema"`` and ``"initial"`` weights are
            stored in the checkpoint.
        ema_decay: decay of the EMA history, in [0, 1] (only for ``history="ema"``; 0 = the current weights, 1 =
            the initial weights).
        history_device: ``"same"`` (history model on the training device) or ``"cpu"`` (kept in CPU memory between
            steps; moved to the training device for its forward and back, and the EMA update copies the weights to
            the CPU every step — lower peak GPU memory, more host↔device traffic).
        history_dtype: ``"float32"`` or ``"bfloat16"`` (halves its memory; an EMA in bfloat16 accumulates rounding
            error, prefer float32 for ``history="ema"``).
        integration: ``"auto"`` (best available), ``"mixin"``, ``"hook"`` (HF ``loss_function`` of a plain module)
            or ``"batch"`` (labels of dropped tokens set to -100 before the forward; costs an extra no-grad forward
            of the current model, whose pass through the chosen layer also provides the attention).
        warmup_steps: optimizer steps (``trainer.global_step < warmup_steps``) scored by attention alone, as the
            release's first 10000 samples (≈ 208 of its 48-sample steps: the default). With ``gamma=1.0`` (no
            attention score) the warm-up keeps every token instead. ``0`` = no warm-up.
        min_keep_per_response: every response keeps at least ``min(n_i, this)`` tokens (short responses: with the
            default 8 a response of up to 8 tokens is trained whole). ``0`` = only ``⌈ρ·n_i⌉``.
        always_keep_eos: keep every EOS / end-of-turn target (model config and generation config
            ``eos_token_id``, the datamodule tokenizer's ``eos_token_id`` and its chat end-of-turn special token)
            inside the response's budget, so the model learns to stop.
        explore_ratio: share of each response's non-forced kept slots given to uniformly random tokens not picked
            by the score (stochastically rounded per response), in [0, 1). Seeded by ``seed`` and the step.
        seed: seed of the exploration draws.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    token_needs = frozenset({"nll"})
    scorer_name = "sstoken"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): the EMA / initial history weights and the
    #: EMA step are restored unless the new ``history`` / ``gamma`` needs weights that were not saved
    resume_decisions = {
        "keep_ratio": RESTORE, "gamma": _gamma_decision, "attention_layer": RESTORE, "history": _history_decision,
        "ema_decay": RESTORE, "history_device": RESTORE, "history_dtype": RESTORE, "integration": RESTORE,
        # functions of the restored global step / of each batch: the new value applies from the resumed step
        "warmup_steps": RESTORE, "min_keep_per_response": RESTORE, "always_keep_eos": RESTORE,
        "explore_ratio": RESTORE, "seed": RESTORE,
    }

    def __init__(
        self,
        keep_ratio: float = 0.6,
        gamma: float = 0.5,
        attention_layer: int = -1,
        history: str = "initial",
        ema_decay: float = 0.99,
        history_device: str = "same",
        history_dtype: str = "float32",
        integration: str = "auto",
        warmup_steps: int = RELEASE_WARMUP_STEPS,
        min_keep_per_response: int = 8,
        always_keep_eos: bool = True,
        explore_ratio: float = 0.0,
        seed: int = 0,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(integration=integration, picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_number(owner, "keep_ratio", keep_ratio, low=0, high=1, low_open=True)
        check_number(owner, "gamma", gamma, low=0, high=1)
        check_int(owner, "attention_layer", attention_layer)  # a layer index, -1 = last
        check_str(owner, "history", history)  # 'ema', 'initial', or a local model folder / lit_ft asset name
        check_number(owner, "ema_decay", ema_decay, low=0, high=1)
        check_choice(owner, "history_device", history_device, list(_HISTORY_DEVICES))
        check_choice(owner, "history_dtype", history_dtype, sorted(_HISTORY_DTYPES))
        check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        check_int(owner, "min_keep_per_response", min_keep_per_response, minimum=0)
        check_bool(owner, "always_keep_eos", always_keep_eos)
        check_number(owner, "explore_ratio", explore_ratio, low=0, high=1, high_open=True)
        check_int(owner, "seed", seed, minimum=0)
        self.keep_ratio = float(keep_ratio)
        self.gamma = float(gamma)
        self.attention_layer = attention_layer
        self.history = history
        self.ema_decay = float(ema_decay)
        self.history_device = history_device
        self.history_dtype = history_dtype
        self.warmup_steps = warmup_steps
        self.min_keep_per_response = min_keep_per_response
        self.always_keep_eos = always_keep_eos
        self.explore_ratio = float(explore_ratio)
        self.seed = seed
        self.eos_ids: frozenset[int] = frozenset()  # resolved at setup (model config + datamodule tokenizer)
        self._warming_up = False  # this batch is a warm-up step (set in prepare_batch)
        self._explore_micro = (-1, 0)  # (optimizer step, micro-batch index in it) of the last exploration draw

        # "ema" / "initial": a copy of the weights when training starts (stored in checkpoints); else a loaded model
        self._history = FrozenModel(
            None if history in ("ema", "initial") else history, owner="SSToken", dtype=history_dtype,
            offload=history_device == "cpu",
        )
        self._ema_step: int | None = None  # the global step the EMA weights correspond to
        self._trained_model_ref: Any = None
        self._trainer_ref: Any = None
        self._history_nll: torch.Tensor | None = None
        self._prompt_keys: torch.Tensor | None = None
        self._layer: torch.nn.Module | None = None
        self._hook_handle: Any = None
        self._armed = False
        self._captured: tuple[torch.Tensor, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            keep_ratio=self.keep_ratio, gamma=self.gamma, attention_layer=self.attention_layer, history=self.history,
        )

    @property
    def uses_history(self) -> bool:
        return self.gamma > 0.0

    @property
    def uses_attention(self) -> bool:
        return self.gamma < 1.0

    # -- batch order (lit_ft.core.loss.batch_order, checked when a participant attaches) ---------------------------
    #: prepare_batch reads the rows (history NLL, prompt keys per row), the tokens and the labels
    batch_start_reads = frozenset({"rows", "input_ids", "labels"})

    @property
    def batch_start_needs_unedited(self) -> frozenset[str]:
        # the attention score reads the prompt/response split from the labels: a label editor (QTuning's pruning)
        # would turn pruned response tokens into prompt keys. The loss-only score (gamma=1) reads them edited fine.
        return frozenset({"labels"}) if self.uses_attention else frozenset()

    history_model = frozen_model_property("_history", "The history model (``None`` before setup or when ``gamma == 0``).")

    #: the name tests (and code written before FrozenModel) inject a history model under
    _history_model = history_model

    # -- setup / teardown ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.uses_attention:
            from lit_ft.core.strategy import refuse_sharded_strategies

            refuse_sharded_strategies(trainer, "SSToken", "its attention score applies a decoder layer's norm and "
                                      "q/k projections outside that layer's forward, where sharded weights are not "
                                      "gathered (gamma=0 does not use it)")
        hf_model = find_hf_model(pl_module, require_lm_head=True)
        self._trained_model_ref = weakref.ref(hf_model)
        self._trainer_ref = weakref.ref(trainer)
        if stage == "fit" and self.uses_history and self._history.model is None:
            self._history.build(hf_model)
        if self.always_keep_eos:
            # the datamodule is set up before the callbacks (Lightning's order), so its tokenizer is loaded here
            tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
            self.eos_ids = end_of_turn_ids(hf_model, tokenizer)
        super().setup(trainer, pl_module, stage)
        if self.uses_attention and self._hook_handle is None:
            layers = find_decoder_layers(hf_model)
            n = len(layers)
            if not -n <= self.attention_layer < n:
                raise ValueError(
                    f"SSToken: attention_layer must be in [-{n}, {n - 1}] for this model ({n} decoder layers), got "
                    f"{self.attention_layer}"
                )
            layer = layers[self.attention_layer]
            check_attention_layout(layer)
            self._layer = layer
            # a reader: after per-layer prompt makers, before token eliminators (lit_ft.core.layer_hooks)
            self._hook_handle = register_layer_pre_hook(
                hf_model, self._capture_layer_input, order=ORDER_READ, layers=[self.attention_layer]
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
        self._hook_handle = None
        self._layer = None
        self._armed = False
        self._captured = None
        self._history_nll = None
        self._history.release()
        super().teardown(trainer, pl_module, stage)

    def _capture_layer_input(self, index: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._armed:
            return None
        hs = kwargs.get("hidden_states", args[0] if args else None)
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 5:
            pe = args[5]
        self._captured = (hs.detach(), None if pe is None else tuple(t.detach() for t in pe))
        return None

    # -- history model ------------------------------------------------------------------------------------------------
    def _history_forward(self, pl_module: pl.LightningModule, batch: Mapping[str, Any]) -> torch.Tensor:

        self._history.ensure(pl_module)
        with self._history.on(batch["input_ids"].device) as model:  # history_device="cpu": visits, then back
            return causal_lm_token_nll(model, batch)

    def _sync_history(self) -> None:
        """Bring the EMA up to the trainer's global step: one update per optimizer step since the last sync
        (``n`` missed steps = one update with ``decay**n``). Idempotent within a step."""
        if self.history != "ema" or self._history.model is None:
            return
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            return
        step = int(trainer.global_step)
        if self._ema_step is None:
            self._ema_step = step
            return
        if step <= self._ema_step:
            return
        trained = self._trained_model_ref() if self._trained_model_ref is not None else None
        if trained is not None:
            self._history.update(trained, self.ema_decay ** (step - self._ema_step))
        self._ema_step = step

    # -- per batch ----------------------------------------------------------------------------------------------------
    def prepare_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any], training: bool) -> None:
        self._captured = None
        self._armed = False
        self._history_nll = None
        self._prompt_keys = None
        self._warming_up = False
        if not training:
            return
        refuse_packed(batch, "SSToken", "its attention score is recomputed with a row-wide causal mask and its "
                      "per-response budget counts a row as one response")
        self._sync_history()
        self._warming_up = self._in_warmup()
        # during the warm-up the score is attention only: the history losses are not needed (nor computed)
        if self.uses_history and not self._warming_up:
            self._history_nll = self._history_forward(pl_module, batch)
        if self.uses_attention:
            labels = batch["labels"]
            am = batch.get("attention_mask")
            attended = torch.ones_like(labels, dtype=torch.bool) if am is None else am.bool()
            # snapshot now: a batch-level editor running later may set dropped response labels to -100
            self._prompt_keys = attended & (labels == IGNORE_INDEX)
            self._armed = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._armed = False
        self._captured = None
        self._sync_history()

    def _attention_scores(self, scores: TokenScores) -> torch.Tensor:
        if self._captured is None or self._prompt_keys is None:
            raise RuntimeError(
                "SSToken: the input of the attention layer was not captured in this training forward. Its "
                "on_train_batch_start must run before the forward (is the callback passed to the Trainer that trains, "
                f"and does the forward go through the model's decoder layers?). Or {_NO_ATTENTION_HINT}."
            )
        hidden, pos = self._captured
        self._captured = None
        self._armed = False
        if pos is None:
            raise ModelLayoutError(
                "SSToken: the decoder layer was called without `position_embeddings` (cos, sin); this transformers "
                f"layout is not supported for the attention score. {_NO_ATTENTION_HINT}."
            )
        am = scores.batch.get("attention_mask") if scores.batch is not None else None
        assert self._layer is not None
        keys = self._prompt_keys.to(hidden.device)
        am = None if am is None else am.to(hidden.device)
        B, T = keys.shape
        n = hidden.shape[1] - T
        if hidden.shape[0] != B or n < 0:
            raise RuntimeError(
                f"SSToken: the attention layer's input has shape {tuple(hidden.shape[:2])} (batch, positions) but "
                f"the batch's labels {(B, T)}; the layer must see the batch's rows and at least its positions."
            )
        if n:
            # a prompt technique prepended n virtual positions at the trunk (PromptTuning, DePT, ...: the prompt
            # injector, lit_ft.core.layer_hooks' rewrite band): the layer attends over them too, so they stay in
            # the softmax (attended keys) but are not the user's prompt tokens (not in the key mask); their own
            # query rows are dropped, leaving one row per user position as without the prompt
            pad = torch.ones(B, n, dtype=torch.bool, device=hidden.device)
            keys = torch.cat([~pad, keys], dim=1)
            am = None if am is None else torch.cat([pad.to(am.dtype), am], dim=1)
        mass = prompt_attention_mass(self._layer, hidden, pos, keys, am)
        return mass[:, n:].to(scores.valid.device)

    def _in_warmup(self) -> bool:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        return trainer is not None and int(trainer.global_step) < self.warmup_steps

    def nominal_keep_ratio(self) -> float:
        # the loss is averaged over the selected tokens: ρ of each response's supervised tokens (the minimum keep
        # and the forced EOS add a few on short responses; the engine's normaliser counts ρ·N). A loss-only warm-up
        # step keeps every token.
        if not self.uses_attention and self._in_warmup():
            return 1.0
        return self.keep_ratio

    def _generator(self) -> torch.Generator | None:
        # one stream per (seed, optimizer step, micro-batch of the step, rank): reproducible (a resumed run starts
        # at a step boundary) and different for every micro-batch of an accumulation window and on every rank
        if self.explore_ratio <= 0.0:
            return None
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        step = int(trainer.global_step) if trainer is not None else 0
        rank = int(trainer.global_rank) if trainer is not None else 0
        micro = self._explore_micro[1] + 1 if self._explore_micro[0] == step else 0
        self._explore_micro = (step, micro)
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 257 + micro) * 4099 + rank)

    def score_tokens(self, scores: TokenScores) -> TokenDecision:
        if not scores.training:
            return TokenDecision()
        if scores.nll is None:
            raise RuntimeError("SSToken needs the current per-token NLL; the loss path did not provide it")
        valid = scores.valid
        n_valid = valid.sum().clamp_min(1)
        metrics: dict[str, Any] = {"warmup": float(self._warming_up)}
        if self._warming_up and not self.uses_attention:
            return TokenDecision(metrics={**metrics, "kept_fraction": 1.0})  # gamma=1: no attention to warm up with
        gamma = 0.0 if self._warming_up else self.gamma  # the release's warm-up: attention only
        combined = torch.zeros_like(scores.nll, dtype=torch.float32)
        rel = None
        if self.uses_history and gamma > 0.0:
            if self._history_nll is None or self._history_nll.shape != scores.nll.shape:
                raise RuntimeError(
                    "SSToken: no history NLL for this batch. Its on_train_batch_start must run before the forward "
                    "(is the callback passed to the Trainer that trains?)"
                )
            his = self._history_nll.to(scores.nll.device)
            rel = torch.where(valid, his - scores.nll.float(), torch.zeros_like(his))
            combined = combined + gamma * per_response_min_max(rel, valid)
            metrics["rel_mean"] = rel.sum() / n_valid
            metrics["history_nll"] = (his * valid).sum() / n_valid
        attn = None
        if self.uses_attention:
            attn = self._attention_scores(scores)
            combined = combined + (1.0 - gamma) * torch.where(valid, attn, torch.zeros_like(attn))
        forced = None
        if self.eos_ids:
            eos = torch.tensor(sorted(self.eos_ids), device=scores.targets.device)
            forced = valid & torch.isin(scores.targets, eos)
            metrics["eos_kept"] = forced.sum().float()
        keep = protected_topk_mask(combined, valid, self.keep_ratio, forced=forced,
                                   min_keep=self.min_keep_per_response, explore_ratio=self.explore_ratio,
                                   generator=self._generator())
        kept = keep.sum().clamp_min(1)
        metrics["kept_fraction"] = (keep.sum() / n_valid).float()
        if rel is not None:
            metrics["rel_kept_mean"] = (rel * keep).sum() / kept
        if attn is not None:
            metrics["attn_mean"] = (attn * valid).sum() / n_valid
            metrics["attn_kept_mean"] = (attn * keep).sum() / kept
        return TokenDecision(keep=keep, metrics=metrics)

    # -- checkpoint ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._sync_history()
        state: dict[str, Any] = {
            "keep_ratio": self.keep_ratio, "gamma": self.gamma, "history": self.history, "ema_step": self._ema_step,
        }
        weights = self._history.state_dict()  # only for "ema" / "initial" (a loaded history is reloaded)
        if weights is not None:
            state["history_state"] = weights
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.history not in _SAVED_HISTORIES:
            return  # a loaded history model (possibly another than the checkpoint's: see resume_decisions)
        if state_dict.get("ema_step") is not None:
            self._ema_step = int(state_dict["ema_step"])
        self._history.load_state_dict(state_dict.get("history_state"))


__all__ = ["SSToken", "check_attention_layout", "prompt_attention_mass"]
