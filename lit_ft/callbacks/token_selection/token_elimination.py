"""LeMo: layer-wise token elimination for long-context fine-tuning (fewer tokens through each layer, less activation
memory)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_ft.callbacks.token_selection._token_elimination_parts import (
    ScorePredictors,
    gather_layer_inputs,
    segment_topk,
    standardised_log_score,
    topk_agreement,
)
from lit_ft.core.attention import attention_received, check_attention_layout
from lit_ft.core.batch import refuse_packed, require_keys
from lit_ft.core.introspect import ModelLayoutError, find_decoder_layers, find_hf_model
from lit_ft.core.pictures import log_figure, new_figure
from lit_ft.core.layer_hooks import ORDER_ELIMINATE, register_layer_hook, register_layer_pre_hook
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE, ResumeRecorded
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number
from lit_ft.kernels.token_rows import gather_rows, merge_rows

SCORES = ("attention", "attention_sum")
_WHO = "TokenElimination"
_ATTN_IMPLS = ("eager", "sdpa")
_OWNER_ATTR = "_lit_ft_token_eliminator"  # in the decoder-layer list's __dict__: frozen copies drop it


def _predictor_hidden_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> str | None:
    if saved == new or not state.get("predictors"):
        return None
    return "the saved predictors have that hidden width; resume with the saved value or start a new run"


@technique(name="token_elimination", family="token_selection",
           paper="LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning", arxiv="2501.09767")
class TokenElimination(ResumeRecorded, Callback):
    """Layer-wise token elimination, LeMo (Wang et al. 2025, "LeMo: Enabling LEss Token Involvement for MOre Context
    Fine-tuning"; no public code).

    In a training forward, at every decoder layer from ``dense_layers`` on, only the most informative tokens of each
    sequence go through the layer; the others pass through on the residual stream (their hidden state leaves the
    layer unchanged), so the layer's activations are stored for the kept tokens only. Per layer and input:

    1. score every token's informativeness: ``score="attention"`` — the attention it receives as a key in this layer,
       averaged over heads and over the queries that may attend it (the layer's own norm and q/k projections,
       recomputed without gradient; ``"attention_sum"`` — the raw sum, which favours early tokens under the causal
       mask). During the first ``calibration_steps`` optimizer steps the exact score selects; a small per-layer
       predictor (two-layer MLP on the layer's input; LeMo's context-aware pattern prediction) learns it online and
       selects afterwards, with an exact check every ``check_every_n_steps`` steps (logged as agreement, and one
       more predictor update);
    2. segment-based, permutation-free selection: in each ``segment_size`` segment keep the top
       ``ceil(keep_ratio · length)`` tokens, as ascending positions (every row keeps the same count; padding goes
       first);
    3. gather the kept rows (and their rotary ``cos``/``sin``, position ids and 4-D mask rows/columns: RoPE keeps
       each token's own position), run the layer on them, merge its output rows back into the full residual stream
       (:mod:`lit_ft.kernels.token_rows`: autograd keeps only the index, never a ``[B, T, D]`` tensor).

    Eliminated tokens are not keys or values of the layer either (nothing of them is computed in it). Every token
    still reaches the final norm and the loss. Evaluation and ``generate()`` are untouched (``apply_in_eval``), and a
    forward with a KV cache is never edited.

    Args:
        keep_ratio: share of each segment's tokens a layer processes, in (0, 1]. The paper does not state its
            ratios; 0.5 is lit-ft's default (about 1.8× less layer activation memory with ``dense_layers=2`` of 30).
        layer_keep_ratios: one ratio per decoder layer (overrides ``keep_ratio`` and ``dense_layers``; 1.0 = the
            layer sees every token, still through the gather/merge path).
        dense_layers: the first layers see every token (early layers' attention is diffuse; the predictors need a
            contextual input), an int in [0, n_layers - 1].
        segment_size: tokens per selection segment (the last one may be shorter), >= 1.
        min_seq_len: sequences shorter than this are not edited (elimination is for long contexts), >= 1.
        score: ``"attention"`` (mean attention received) or ``"attention_sum"``.
        predictor: use the learned predictors after calibration (``False``: the exact score every step, slower).
        calibration_steps: optimizer steps that select with the exact score while the predictors learn, >= 0.
        check_every_n_steps: after calibration, compute the exact score every this many steps to log the
            predictor's agreement and update it (0 = never).
        predictor_hidden: hidden width of each predictor MLP, >= 1.
        predictor_lr: the predictors' Adam learning rate, > 0.
        predictor_rows: token rows per layer per step the predictors train on (a random subset, seeded), >= 1.
        apply_in_eval: also eliminate in validation / test forwards (predictor selection; never with a KV cache).
        plot_every_n_steps: write ``<log_dir>/token_elimination/kept_by_layer_step{N}.png`` (and a W&B image when a
            ``WandbLogger`` is attached) every this many steps, and once at the end of fit; 0 = never.
        seed: seed of the predictors' initialisation and of the rows they train on.

    Logged: ``lit_ft/token_elimination/kept_fraction`` (mean over eliminating layers of the kept share of
    non-padding tokens) and ``.../kept_fraction/layer_NN``; ``.../exact_score`` (1 on steps selecting with the exact
    score); ``.../predictor_agreement`` and ``.../predictor_agreement/layer_NN`` (the share of the exact selection the
    predictor recovers, on check steps); ``.../predictor_loss``.

    Needs a Llama-style decoder (``core.attention``) with eager or SDPA attention; refuses sharded strategies (its
    score runs a layer's projections outside the layer's forward).
    """

    resume_decisions = {
        **{a: RESTORE for a in ("keep_ratio", "layer_keep_ratios", "dense_layers", "segment_size", "min_seq_len",
                                "score", "predictor", "calibration_steps", "check_every_n_steps", "predictor_lr",
                                "predictor_rows", "apply_in_eval", "plot_every_n_steps")},
        "predictor_hidden": _predictor_hidden_decision,
        "seed": "the predictors were initialised and trained from the saved seed; resume with it",
    }

    def __init__(
        self,
        keep_ratio: float = 0.5,
        layer_keep_ratios: Sequence[float] | None = None,
        dense_layers: int = 2,
        segment_size: int = 256,
        min_seq_len: int = 1024,
        score: str = "attention",
        predictor: bool = True,
        calibration_steps: int = 20,
        check_every_n_steps: int = 50,
        predictor_hidden: int = 64,
        predictor_lr: float = 1e-3,
        predictor_rows: int = 512,
        apply_in_eval: bool = False,
        plot_every_n_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_number(_WHO, "keep_ratio", keep_ratio, low=0, high=1, low_open=True)
        if layer_keep_ratios is not None:
            if isinstance(layer_keep_ratios, (str, bytes)) or not isinstance(layer_keep_ratios, Sequence) \
                    or not layer_keep_ratios:
                raise ValueError(f"{_WHO}: `layer_keep_ratios` must be a non-empty list of numbers in (0, 1] (one "
                                 f"per decoder layer) or null (= keep_ratio from dense_layers on), got {layer_keep_ratios!r}")
            for i, r in enumerate(layer_keep_ratios):
                check_number(_WHO, f"layer_keep_ratios[{i}]", r, low=0, high=1, low_open=True)
        check_int(_WHO, "dense_layers", dense_layers, minimum=0)
        check_int(_WHO, "segment_size", segment_size, minimum=1)
        check_int(_WHO, "min_seq_len", min_seq_len, minimum=1)
        check_choice(_WHO, "score", score, SCORES)
        check_bool(_WHO, "predictor", predictor)
        check_int(_WHO, "calibration_steps", calibration_steps, minimum=0)
        check_int(_WHO, "check_every_n_steps", check_every_n_steps, minimum=0)
        check_int(_WHO, "predictor_hidden", predictor_hidden, minimum=1)
        check_number(_WHO, "predictor_lr", predictor_lr, low=0, low_open=True)
        check_int(_WHO, "predictor_rows", predictor_rows, minimum=1)
        check_bool(_WHO, "apply_in_eval", apply_in_eval)
        check_int(_WHO, "plot_every_n_steps", plot_every_n_steps, minimum=0)
        check_int(_WHO, "seed", seed, minimum=0)
        self.keep_ratio = float(keep_ratio)
        self.layer_keep_ratios = None if layer_keep_ratios is None else [float(r) for r in layer_keep_ratios]
        self.dense_layers = int(dense_layers)
        self.segment_size = int(segment_size)
        self.min_seq_len = int(min_seq_len)
        self.score = score
        self.predictor = bool(predictor)
        self.calibration_steps = int(calibration_steps)
        self.check_every_n_steps = int(check_every_n_steps)
        self.predictor_hidden = int(predictor_hidden)
        self.predictor_lr = float(predictor_lr)
        self.predictor_rows = int(predictor_rows)
        self.apply_in_eval = bool(apply_in_eval)
        self.plot_every_n_steps = int(plot_every_n_steps)
        self.seed = int(seed)

        self.ratios: list[float] = []  # per decoder layer, resolved at setup (1.0 = not eliminating)
        self.predictors: ScorePredictors | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._layers: Any = None
        self._active = False
        self._training = False
        self._exact_now = False
        self._predict_now = False
        self._pad: torch.Tensor | None = None
        self._open: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kept: dict[int, Any] = {}  # layer -> kept share (a tensor until logged)
        self._agreement: dict[int, float] = {}
        self._predictor_loss: float | None = None
        self._updates = 0
        self._step = 0
        self._last_plot_step = -1
        self._trainer_ref: Any = None
        self.last_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(keep_ratio=self.keep_ratio, dense_layers=self.dense_layers,
                                        segment_size=self.segment_size)

    # -- setup --------------------------------------------------------------------------------------------------------
    def eliminating_layers(self) -> list[int]:
        """Indices of the decoder layers that eliminate tokens (after setup)."""
        if self.layer_keep_ratios is not None:
            return list(range(len(self.ratios)))
        return list(range(self.dense_layers, len(self.ratios)))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies

        refuse_sharded_strategies(trainer, _WHO, "its score applies a decoder layer's norm and q/k projections outside "
                                  "that layer's forward, where sharded weights are not gathered")
        self._trainer_ref = weakref.ref(trainer)
        hf_model = find_hf_model(pl_module)
        impl = getattr(getattr(hf_model, "config", None), "_attn_implementation", None)
        if impl not in _ATTN_IMPLS:
            raise ModelLayoutError(
                f"{_WHO}: the model uses attn_implementation={impl!r}; token elimination restricts the layer's 4-D "
                f"mask (or SDPA's causal flag) to the kept tokens, which works with {list(_ATTN_IMPLS)} only. Load the "
                "model with attn_implementation='sdpa'"
            )
        layers = find_decoder_layers(hf_model)
        owner = layers.__dict__.get(_OWNER_ATTR)
        other = owner() if owner is not None else None
        if other is not None and other is not self:
            # two eliminators would nest (the second gathers from the first's kept rows) and their merges run in
            # registration order, not nested order: refused rather than composed wrongly
            raise ValueError(f"{_WHO}: this model's decoder layers already have a TokenElimination; one per model "
                             "(give one instance per-layer ratios with layer_keep_ratios)")
        layers.__dict__[_OWNER_ATTR] = weakref.ref(self)
        n = len(layers)
        if self.layer_keep_ratios is not None:
            if len(self.layer_keep_ratios) != n:
                raise ValueError(f"{_WHO}: `layer_keep_ratios` must have one ratio per decoder layer ({n} for this "
                                 f"model), got {len(self.layer_keep_ratios)}")
            self.ratios = list(self.layer_keep_ratios)
        else:
            if self.dense_layers >= n:  # no layer would eliminate: refuse rather than silently do nothing
                raise ValueError(f"{_WHO}: `dense_layers` must be an int in [0, {n - 1}] for this model ({n} decoder "
                                 f"layers), got {self.dense_layers}")
            self.ratios = [1.0] * self.dense_layers + [self.keep_ratio] * (n - self.dense_layers)
        eliminating = self.eliminating_layers()
        for i in eliminating:
            check_attention_layout(layers[i], _WHO, "token elimination scores tokens by this layer's attention")
        if self.predictors is None:
            dim = int(getattr(hf_model.config, "hidden_size", 0) or layers[0].self_attn.q_proj.in_features)
            self.predictors = ScorePredictors(eliminating, dim, self.predictor_hidden, self.seed)
            self._opt = None
        device = next(hf_model.parameters()).device
        self.predictors.to(device)
        if self._opt is None:
            self._opt = torch.optim.Adam(self.predictors.parameters(), lr=self.predictor_lr)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        if not self._handles:
            self._layers = layers
            self._handles = [
                register_layer_pre_hook(hf_model, self._before_layer, order=ORDER_ELIMINATE, layers=eliminating),
                register_layer_hook(hf_model, self._after_layer, order=ORDER_ELIMINATE, layers=eliminating),
            ]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._layers is not None and self._layers.__dict__.get(_OWNER_ATTR, lambda: None)() is self:
            del self._layers.__dict__[_OWNER_ATTR]
        self._layers = None
        self._active = False
        self._open.clear()
        self._samples.clear()

    # -- per batch ----------------------------------------------------------------------------------------------------
    def _arm(self, batch: Any, training: bool, step: int) -> None:
        self._open.clear()
        self._samples.clear()
        self._kept.clear()
        self._agreement.clear()
        if not isinstance(batch, Mapping):
            raise TypeError(f"{_WHO}: expected a dict batch, got {type(batch).__name__}")
        require_keys(batch, ("input_ids",), who=_WHO)
        refuse_packed(batch, _WHO, "its attention scores are recomputed with a row-wide causal mask, which would let "
                      "the examples of a packed row score each other")
        am = batch.get("attention_mask")
        self._pad = None if am is None else am.bool()
        calibrating = step < self.calibration_steps
        checking = self.check_every_n_steps > 0 and step % self.check_every_n_steps == 0
        self._exact_now = training and (not self.predictor or calibrating or checking)
        self._predict_now = self.predictor and not (training and calibrating)
        self._training = training
        self._active = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = int(trainer.global_step)
        self._arm(batch, training=True, step=self._step)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.apply_in_eval:
            self._arm(batch, training=False, step=self._step)
            self._exact_now, self._predict_now = not self.predictor, self.predictor

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self.on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._active = False
        self._open.clear()

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    # -- the layer hooks ----------------------------------------------------------------------------------------------
    def _valid_mask(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        pad = self._pad
        if pad is None or pad.shape[0] != B or pad.shape[1] > T:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        pad = pad.to(device)
        if pad.shape[1] < T:  # a prompt technique prepended virtual positions at the trunk: always attended
            pad = torch.cat([torch.ones(B, T - pad.shape[1], dtype=torch.bool, device=device), pad], dim=1)
        return pad

    def _before_layer(self, index: int, layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._open.pop(index, None)
        if not self._active:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and (not self._training or not torch.is_grad_enabled()
                                  or _cached_tokens(cache, layer) > 0):
            # generation (no grad, or a filled cache) would store the compacted keys and decode against them: never
            # edited. A training forward of a plain module gets an empty cache (config.use_cache) that nothing reads
            # back: edited
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        B, T, _ = hidden.shape
        if T < self.min_seq_len:
            return None
        valid = self._valid_mask(B, T, hidden.device)
        exact = None
        if self._exact_now:
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise ModelLayoutError(f"{_WHO}: the decoder layer was called without `position_embeddings` (cos, "
                                       "sin); this transformers layout is not supported")
            exact = attention_received(layer, hidden, pe, valid, normalize=self.score == "attention", who=_WHO)
            exact = exact.masked_fill(~valid, float("-inf"))
        ratio = self.ratios[index]
        predicted = None
        if self._predict_now:
            self._ensure_device(hidden.device)
            with torch.no_grad():
                predicted = self.predictors(index, hidden).masked_fill(~valid, float("-inf"))
        selecting = predicted if predicted is not None else exact
        assert selecting is not None
        idx = segment_topk(selecting, ratio, self.segment_size)
        if exact is not None and torch.is_grad_enabled():
            self._collect(index, hidden, exact, valid)
            if predicted is not None:
                self._agreement[index] = topk_agreement(idx, segment_topk(exact, ratio, self.segment_size), T)
        kept = torch.zeros(B, T, dtype=torch.bool, device=hidden.device).scatter_(1, idx, True)
        # a tensor until logged: reading it here would synchronise with the device at every layer
        self._kept[index] = (kept & valid).sum() / valid.sum().clamp_min(1)
        new_kwargs = gather_layer_inputs(kwargs, idx, T)
        rows = gather_rows(hidden, idx)
        if args:
            args = (rows, *args[1:])
        else:
            new_kwargs["hidden_states"] = rows
        self._open[index] = (hidden, idx)
        return args, new_kwargs

    def _after_layer(self, index: int, layer: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        opened = self._open.pop(index, None)
        if opened is None:
            return None
        hidden, idx = opened
        if isinstance(output, torch.Tensor):
            return merge_rows(hidden, output, idx)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (merge_rows(hidden, output[0], idx), *output[1:])
        raise ModelLayoutError(f"{_WHO}: a decoder layer returned {type(output).__name__}; expected a tensor or a "
                               "tuple starting with the hidden states")

    # -- the predictors -----------------------------------------------------------------------------------------------
    def _collect(self, index: int, hidden: torch.Tensor, exact: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep a seeded random subset of (input row, target) pairs of this layer for the predictor update."""
        target = standardised_log_score(exact.masked_fill(~valid, 0.0), valid)
        rows = valid.nonzero()
        if rows.shape[0] == 0:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step * 1009 + index)
        take = torch.randperm(rows.shape[0], generator=g)[: self.predictor_rows].to(rows.device)
        b, t = rows[take, 0], rows[take, 1]
        self._samples[index] = (hidden.detach()[b, t].clone(), target[b, t])

    def _ensure_device(self, device: torch.device) -> None:
        """Keep the predictors and their Adam state where the model runs (Lightning moves the model to its device
        after the callbacks' ``setup``, and a checkpoint's optimizer state loads on the CPU)."""
        assert self.predictors is not None
        p = next(self.predictors.parameters())
        if p.device == device:
            return
        self.predictors.to(device)
        if self._opt is not None:
            for st in self._opt.state.values():
                for k, v in list(st.items()):
                    if isinstance(v, torch.Tensor) and k != "step":
                        st[k] = v.to(device)

    def _update_predictors(self) -> None:
        assert self.predictors is not None and self._opt is not None
        self._opt.zero_grad(set_to_none=False)
        total = None
        for i, (x, y) in self._samples.items():
            with torch.enable_grad():
                pred = self.predictors(i, x.unsqueeze(0)).squeeze(0)
                loss = torch.nn.functional.mse_loss(pred, y.to(pred.device))
                loss.backward()
            total = float(loss.detach()) if total is None else total + float(loss.detach())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank updates the same predictors: average their gradients (ranks without samples send zeros)
            for p in self.predictors.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self._opt.step()
        self._updates += 1
        self._predictor_loss = None if total is None else total / max(1, len(self._samples))
        self._samples.clear()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._active = False
        self._open.clear()
        if self._exact_now:
            self._ensure_device(pl_module.device)
            self._update_predictors()  # after backward: a recomputed (checkpointed) layer selected the same tokens
        self._log(pl_module, batch)
        n = self.plot_every_n_steps
        if n and self._kept and self._step % n == 0 and self._step != self._last_plot_step:
            self._plot(trainer, self._step)

    def _log(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._kept:
            return
        self._kept = {i: float(v) for i, v in self._kept.items()}
        bs = batch["input_ids"].shape[0]
        metrics: dict[str, float] = {
            "lit_ft/token_elimination/kept_fraction": sum(self._kept.values()) / len(self._kept),
            "lit_ft/token_elimination/exact_score": float(self._exact_now),
        }
        metrics.update({f"lit_ft/token_elimination/kept_fraction/layer_{i:02d}": v for i, v in self._kept.items()})
        if self._agreement:
            metrics["lit_ft/token_elimination/predictor_agreement"] = sum(self._agreement.values()) / len(self._agreement)
            metrics.update({f"lit_ft/token_elimination/predictor_agreement/layer_{i:02d}": v
                            for i, v in self._agreement.items()})
        if self._predictor_loss is not None and self._exact_now:
            metrics["lit_ft/token_elimination/predictor_loss"] = self._predictor_loss
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=bs)
        self.last_metrics = metrics

    # -- plot ---------------------------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot_every_n_steps and self._kept and self._step != self._last_plot_step:
            self._plot(trainer, self._step)

    def _plot(self, trainer: pl.Trainer, step: int) -> None:
        self._last_plot_step = step
        log_figure(trainer, kept_by_layer_figure(self.ratios, self._kept, self._agreement, step), "token_elimination",
                   "kept_by_layer", step)

    # -- checkpoint ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ratios": list(self.ratios),
            "predictors": None if self.predictors is None else {k: v.detach().cpu() for k, v in
                                                               self.predictors.state_dict().items()},
            "predictor_layers": None if self.predictors is None else list(self.predictors.layers),
            "optimizer": None if self._opt is None else self._opt.state_dict(),
            "updates": self._updates,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied at setup, once the predictors exist on the model's device
        self._pending_state = dict(state_dict)
        if self.predictors is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def _restore(self, state: Mapping[str, Any]) -> None:
        assert self.predictors is not None
        saved_layers = state.get("predictor_layers")
        weights = state.get("predictors")
        if weights is not None:
            if saved_layers is not None and list(saved_layers) != list(self.predictors.layers):
                raise ValueError(
                    f"{_WHO}: the checkpoint's predictors are for layers {list(saved_layers)} but this run eliminates "
                    f"at layers {self.predictors.layers} (changed dense_layers / layer_keep_ratios / keep_ratio=1); "
                    "resume with the saved arguments or start a new run"
                )
            self.predictors.load_state_dict(weights)
        if state.get("optimizer") is not None and self._opt is not None:
            self._opt.load_state_dict(state["optimizer"])
            for group in self._opt.param_groups:
                group["lr"] = self.predictor_lr  # a changed predictor_lr applies from the resumed step on
        self._updates = int(state.get("updates", 0))


def _cached_tokens(cache: Any, layer: torch.nn.Module) -> int:
    """Tokens already in ``layer``'s part of a KV cache (earlier layers of this forward have filled theirs); a cache
    it cannot read (a legacy tuple) counts as filled."""
    fn = getattr(cache, "get_seq_length", None)
    layer_idx = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
    try:
        return int(fn(layer_idx)) if callable(fn) and isinstance(layer_idx, int) else 1
    except Exception:  # noqa: BLE001 - a cache layout we do not know: do not edit
        return 1


def kept_by_layer_figure(ratios: Sequence[float], kept: Mapping[int, float], agreement: Mapping[int, float],
                         step: int = 0) -> Any:
    """Bar chart of the kept share of tokens per decoder layer (grey: dense layers), with the predictor's agreement
    with the exact selection where measured."""
    fig = new_figure(7, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(ratios)))
    ax.bar(xs, [kept.get(i, 1.0) for i in xs], color=["#1f77b4" if i in kept else "#bbbbbb" for i in xs],
           label="kept share of tokens (grey: dense layer)")
    if agreement:
        ax.plot(sorted(agreement), [agreement[i] for i in sorted(agreement)], "o-", color="#d62728",
                label="predictor agreement with exact selection")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share")
    ax.set_title(f"TokenElimination, step {step}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


__all__ = ["TokenElimination", "kept_by_layer_figure"]
