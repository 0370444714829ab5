"""TokenDistributionShift: URIAL's token-distribution-shift analysis of the model being fine-tuned against its base,
run on held-out prompts at validation time (measures only; training is never touched)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_ft.callbacks.analysis._tds_answers import (
    adapters_disabled, base_answer_logits, find_peft_model, greedy_answers, prompts_from_batch,
)
from lit_ft.core.frozen import DTYPES, FrozenModel, frozen_model_property
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE, ResumeArgumentError, ResumeRecorded
from lit_ft.core.validate import check_bool, check_choice, check_int, check_str
from lit_ft.metrics.token_distribution_shift import CATEGORIES, TokenDistributionShiftMetric, categorize, base_ranks

__all__ = ["TokenDistributionShift", "evaluate_token_distribution_shift", "measure_token_distribution_shift"]

NAME = "token_distribution_shift"
_PREFIX = f"lit_ft/{NAME}/"

#: a base model for one ``with`` block
BaseProvider = Callable[[], AbstractContextManager[nn.Module]]


def _token_text(tokenizer: Any, token_id: int) -> str:
    """A token as the heat-map and the top list show it: its decoded text (escaped), else its id."""
    if tokenizer is not None:
        try:
            text = tokenizer.decode([int(token_id)])
            if isinstance(text, str):
                return text.encode("unicode_escape").decode("ascii") or f"#{token_id}"
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id: show the id
            pass
    return str(int(token_id))


def measure_token_distribution_shift(aligned: nn.Module, base: BaseProvider, prompts: list[torch.Tensor],
                                     metric: TokenDistributionShiftMetric, max_new_tokens: int, batch_size: int,
                                     pad_id: int, eos_id: int | None, device: torch.device,
                                     keep_rows: int = 0) -> list[tuple[list[int], list[int]]]:
    """Decode ``prompts`` greedily with ``aligned`` (``batch_size`` at a time), score every answer token's base rank
    with one teacher-forced forward of ``base()``'s model, and update ``metric``. Returns the first ``keep_rows``
    answers as ``(token ids, categories)`` for the heat-map. With no prompt the metric is still updated (with
    nothing), so that every DDP rank takes part in its synchronisation."""
    rows: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        answers = greedy_answers(aligned, prompts[start:start + batch_size], max_new_tokens, pad_id, eos_id, device)
        with base() as base_model:
            logits = base_answer_logits(base_model, answers)
        metric.update(logits, answers.tokens, answers.mask)
        if len(rows) < keep_rows:
            cats = categorize(base_ranks(logits, answers.tokens), metric.unshifted_max_rank, metric.marginal_max_rank)
            for tok, cat, valid in zip(answers.tokens.tolist(), cats.tolist(), answers.mask.tolist()):
                n = sum(valid)  # valid tokens are a prefix of the row
                if len(rows) < keep_rows:
                    rows.append((tok[:n], cat[:n]))
    if not prompts:
        vocab = metric.vocab_size or 1
        metric.update(torch.zeros(0, 0, vocab, device=device), torch.zeros(0, 0, dtype=torch.long, device=device))
    return rows


def _base_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> str | None:
    if new is None and saved is not None:
        return ("the checkpoint holds no base weights (its base was a loaded model), so the base would be the "
                "trained weights")
    return None


@technique(name=NAME, family="analysis",
           paper="The Unlocking Spell on Base LLMs: Rethinking Alignment via In-Context Learning",
           arxiv="2312.01552")
class TokenDistributionShift(ResumeRecorded, Callback):
    """Token distribution shift (Lin et al. 2023, URIAL): on which answer positions does the fine-tuned model decode a
    token its base model would not have? Measured at the end of every (``every_n_validations``-th) validation.

    Algorithm (the paper's TDS analysis, with the model being trained as the "aligned" model):

    1. while validating, the prompts of the first ``max_samples`` validation rows (dataloader 0) are kept: each
       row's attended tokens before its first supervised label (``labels != -100``); rows with no supervised token
       are skipped;
    2. at the validation's end the fine-tuned model answers them greedily (``max_new_tokens``, an answer ends at
       its first eos with ``stop_at_eos``);
    3. one teacher-forced forward of the *base* model over prompt + answer gives, for every answer position ``t``,
       the base rank of the token the fine-tuned model chose; positions are unshifted (rank <=
       ``unshifted_max_rank``, paper 1), marginal (<= ``marginal_max_rank``, paper 3) or shifted;
    4. :class:`~lit_ft.metrics.TokenDistributionShiftMetric` counts them (synchronised across DDP ranks), the
       shares are logged, and pictures are drawn.

    The base model: ``base=None`` = under PEFT the same model with its adapters disabled; otherwise a frozen copy
    of the weights when training starts (taken at ``setup``; stored in checkpoints, so a resumed run measures
    against the same weights — resuming from a checkpoint without them is refused rather than copying trained
    weights); or a local folder / ``lit_ft.assets`` name of the base model (loaded, not stored).

    Costs: nothing during training steps (no training hook does work); at each measured validation,
    ``ceil(max_samples / world_size)`` greedy decodes of ``max_new_tokens`` and one base forward per answer batch,
    per rank; without PEFT a second copy of the model's weights (``base_offload`` keeps it on the CPU).

    Logged (on_epoch, under ``lit_ft/token_distribution_shift/``): ``unshifted_share``, ``marginal_share``,
    ``shifted_share``, ``shifted_share_first_k`` (positions ``0 .. first_k - 1``), ``answer_tokens``. Pictures
    (``lit_ft.core.pictures``: PNG under the log dir, W&B image when attached): ``by_position`` (each kind's share
    along the answer), ``answers`` (the first ``picture_answers`` answers, each token coloured by its kind) and
    ``top_shifted`` (the ``top_tokens`` most often shifted tokens); the top list is also printed on rank 0 and kept
    in :attr:`last_top_shifted`, the last results in :attr:`last_results`.

    Args:
        max_samples: validation prompts measured per validation (over all ranks), >= 1.
        max_new_tokens: greedy answer length, >= 1 (default 32).
        batch_size: prompts decoded together, >= 1.
        unshifted_max_rank: base ranks up to this are unshifted (paper: 1).
        marginal_max_rank: base ranks up to this (and above ``unshifted_max_rank``) are marginal (paper: 3).
        first_k: positions in ``shifted_share_first_k``, in [1, max_new_tokens] (the paper: shifts concentrate
            early in the answer).
        base: ``None`` (see above) or a local folder / ``lit_ft.assets`` name of the base model (same vocabulary).
        base_dtype: dtype of the frozen base: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        base_offload: keep the frozen base in CPU memory between measurements.
        stop_at_eos: end an answer at its first eos (the tokenizer's, else the model config's).
        every_n_validations: measure at every n-th validation (sanity checks are never measured).
        picture_answers: answers in the heat-map (0 = no heat-map).
        top_tokens: tokens in the most-shifted list and its picture (0 = none).
        pictures: draw the pictures at all.
    """

    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): only the base weights are state
    resume_decisions = {
        "base": _base_decision, "base_dtype": RESTORE, "base_offload": RESTORE, "max_samples": RESTORE,
        "max_new_tokens": RESTORE, "batch_size": RESTORE, "unshifted_max_rank": RESTORE,
        "marginal_max_rank": RESTORE, "first_k": RESTORE, "stop_at_eos": RESTORE, "every_n_validations": RESTORE,
        "picture_answers": RESTORE, "top_tokens": RESTORE, "pictures": RESTORE,
    }

    def __init__(
        self,
        max_samples: int = 64,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        unshifted_max_rank: int = 1,
        marginal_max_rank: int = 3,
        first_k: int = 5,
        base: str | None = None,
        base_dtype: str = "float32",
        base_offload: bool = False,
        stop_at_eos: bool = True,
        every_n_validations: int = 1,
        picture_answers: int = 4,
        top_tokens: int = 20,
        pictures: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "max_samples", max_samples, minimum=1)
        check_int(owner, "max_new_tokens", max_new_tokens, minimum=1)
        check_int(owner, "batch_size", batch_size, minimum=1)
        check_int(owner, "unshifted_max_rank", unshifted_max_rank, minimum=1)
        check_int(owner, "marginal_max_rank", marginal_max_rank, minimum=1)
        if marginal_max_rank < unshifted_max_rank:  # both named: either may be the one to change
            raise ValueError(f"{owner}: `marginal_max_rank` ({marginal_max_rank}) must be >= `unshifted_max_rank` "
                             f"({unshifted_max_rank})")
        check_int(owner, "first_k", first_k, minimum=1)
        if first_k > max_new_tokens:
            raise ValueError(f"{owner}: `first_k` ({first_k}) must be <= `max_new_tokens` ({max_new_tokens}): the "
                             "first-k share counts answer positions 0 .. first_k - 1")
        check_str(owner, "base", base, allow_none=True, null_means="the initial weights / adapters disabled")
        check_choice(owner, "base_dtype", base_dtype, sorted(DTYPES))
        check_bool(owner, "base_offload", base_offload)
        check_bool(owner, "stop_at_eos", stop_at_eos)
        check_int(owner, "every_n_validations", every_n_validations, minimum=1)
        check_int(owner, "picture_answers", picture_answers, minimum=0)
        check_int(owner, "top_tokens", top_tokens, minimum=0)
        check_bool(owner, "pictures", pictures)
        self.max_samples = max_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.unshifted_max_rank = unshifted_max_rank
        self.marginal_max_rank = marginal_max_rank
        self.first_k = first_k
        self.base = base
        self.base_dtype = base_dtype
        self.base_offload = base_offload
        self.stop_at_eos = stop_at_eos
        self.every_n_validations = every_n_validations
        self.picture_answers = picture_answers
        self.top_tokens = top_tokens
        self.pictures = pictures

        self._base = FrozenModel(base, owner=owner, dtype=base_dtype, offload=base_offload)
        self._prompts: list[torch.Tensor] = []
        self._validations = 0
        self._measuring = False
        self._warned: set[str] = set()
        self.metric: TokenDistributionShiftMetric | None = None
        #: the last measurement's ``metric.compute()`` (plain floats / lists) and most shifted tokens
        self.last_results: dict[str, Any] = {}
        self.last_top_shifted: list[tuple[str, int, int]] = []
        #: the last heat-map's rows: (token texts, categories)
        self.last_answers: list[tuple[list[str], list[int]]] = []
        #: paths of the last pictures (rank 0)
        self.last_pictures: dict[str, str | None] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(base=self.base, max_samples=self.max_samples,
                                        max_new_tokens=self.max_new_tokens, unshifted_max_rank=self.unshifted_max_rank,
                                        marginal_max_rank=self.marginal_max_rank)

    base_model = frozen_model_property("_base", "The frozen base model (``None`` under PEFT or before setup).")

    # -- the base model -------------------------------------------------------------------------------------------
    def _peft(self, pl_module: nn.Module) -> nn.Module | None:
        return find_peft_model(pl_module) if self.base is None else None

    def _base_provider(self, pl_module: nn.Module, device: torch.device) -> BaseProvider:
        from lit_ft.core.introspect import find_hf_model

        peft = self._peft(pl_module)
        if peft is not None:
            hf = find_hf_model(pl_module, require_lm_head=True)

            def disabled() -> AbstractContextManager[nn.Module]:
                return _Disabled(peft, hf)

            return disabled
        self._base.ensure(pl_module)
        return lambda: self._base.on(device)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # "the weights when training starts": copied now, before any step (a resumed run loads the stored copy)
        if stage == "fit" and self._peft(pl_module) is None:
            self._base.ensure(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # onto the model's device now, outside validation's inference mode (moved there, its weights would become
        # inference tensors that a later checkpoint load could not write into)
        if self._base.model is not None and not self.base_offload:
            with self._base.on(pl_module.device):
                pass

    # -- collecting prompts while validating ----------------------------------------------------------------------
    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (self._validations + 1) % self.every_n_validations == 0

    def _quota(self, trainer: pl.Trainer) -> int:
        return math.ceil(self.max_samples / max(int(trainer.world_size), 1))

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prompts = []
        self._measuring = self._due(trainer)
        if self._measuring and self.base is None and self._base.model is None and self._peft(pl_module) is None:
            # trainer.validate() without fit: a copy now would be of the very weights evaluated (all unshifted)
            self._warn_once("no_base", "TokenDistributionShift: no base model (not fitting, no PEFT adapters, no "
                            "`base`): nothing measured. Pass base=<the base model's folder or asset name>.")
            self._measuring = False

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._measuring or dataloader_idx != 0 or len(self._prompts) >= self._quota(trainer):
            return
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            self._warn_once("batch", "TokenDistributionShift: validation batches need 'input_ids' and 'labels' "
                            "(-100 on the prompt) to find the prompts; nothing measured")
            return
        self._prompts.extend(prompts_from_batch(batch)[: self._quota(trainer) - len(self._prompts)])

    # -- measuring ------------------------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @staticmethod
    def _tokenizer(trainer: pl.Trainer) -> Any:
        return getattr(getattr(trainer, "datamodule", None), "tokenizer", None)

    def _special_ids(self, trainer: pl.Trainer, hf: nn.Module) -> tuple[int, int | None]:
        tok = self._tokenizer(trainer)
        cfg = getattr(hf, "config", None)

        def first(*values: Any) -> int | None:
            for v in values:
                if isinstance(v, (list, tuple)) and v:
                    v = v[0]
                if isinstance(v, int):
                    return v
            return None

        eos = first(getattr(tok, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
        pad = first(getattr(tok, "pad_token_id", None), getattr(cfg, "pad_token_id", None), eos, 0)
        return int(pad), eos if self.stop_at_eos else None

    def _new_metric(self, vocab_size: int) -> TokenDistributionShiftMetric:
        return TokenDistributionShiftMetric(self.unshifted_max_rank, self.marginal_max_rank, self.max_new_tokens,
                                            self.first_k, vocab_size)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if not self._measuring:
            return
        self._measuring = False
        from lit_ft.core.introspect import find_hf_model

        hf = find_hf_model(pl_module, require_lm_head=True)
        vocab = int(hf.get_output_embeddings().weight.shape[0])
        if self.metric is None or self.metric.vocab_size != vocab:
            self.metric = self._new_metric(vocab)
        metric = self.metric.to(pl_module.device)
        metric.reset()
        pad, eos = self._special_ids(trainer, hf)
        base = self._base_provider(pl_module, pl_module.device)
        keep = self.picture_answers if (self.pictures and trainer.is_global_zero) else 0
        rows = measure_token_distribution_shift(hf, base, self._prompts, metric, self.max_new_tokens,
                                                self.batch_size, pad, eos, pl_module.device, keep)
        self._prompts = []
        results = metric.compute()  # every rank: the states are summed over ranks
        with metric.sync_context():
            top = metric.top_shifted(self.top_tokens) if self.top_tokens else []
        tok = self._tokenizer(trainer)
        self.last_top_shifted = [(_token_text(tok, i), s, n) for i, s, n in top]
        self.last_answers = [([_token_text(tok, i) for i in ids], cats) for ids, cats in rows]
        self.last_results = {k: v.tolist() if v.dim() else v.item() for k, v in results.items()}
        if int(results["tokens"]) == 0:
            self._warn_once("empty", "TokenDistributionShift: no validation row had a prompt and a supervised "
                            "answer (labels -100 on the prompt); nothing measured")
            return
        for name in CATEGORIES:
            self._log(pl_module, f"{name}_share", results[f"{name}_share"])
        self._log(pl_module, "shifted_share_first_k", results["shifted_share_first_k"])
        self._log(pl_module, "answer_tokens", results["tokens"].float())
        if self.last_top_shifted:
            rank_zero_info("TokenDistributionShift: most frequently shifted tokens (shifted/decoded): " + ", ".join(
                f"{text!r} {s}/{n}" for text, s, n in self.last_top_shifted))
        if self.pictures:
            self._draw(trainer, results)

    @staticmethod
    def _log(pl_module: pl.LightningModule, name: str, value: torch.Tensor) -> None:
        # the value is already the all-rank one (metric.compute synchronised it); sync_dist averages equal values
        pl_module.log(_PREFIX + name, value.to(pl_module.device), on_step=False, on_epoch=True, sync_dist=True)

    def _draw(self, trainer: pl.Trainer, results: Mapping[str, torch.Tensor]) -> None:
        from lit_ft.callbacks.analysis._tds_pictures import answer_heatmap, position_curve, top_shifted_bars
        from lit_ft.core.pictures import log_figure

        step = int(trainer.global_step)
        self.last_pictures = {"by_position": log_figure(
            trainer, position_curve(results["position_shares"].cpu(), results["position_counts"].cpu()), NAME,
            "by_position", step)}
        if self.picture_answers:
            fig = answer_heatmap([t for t, _ in self.last_answers], [c for _, c in self.last_answers])
            self.last_pictures["answers"] = log_figure(trainer, fig, NAME, "answers", step)
        if self.top_tokens and self.last_top_shifted:
            labels, shifted, seen = (list(x) for x in zip(*self.last_top_shifted))
            self.last_pictures["top_shifted"] = log_figure(
                trainer, top_shifted_bars([repr(t) for t in labels], shifted, seen), NAME, "top_shifted", step)

    # -- checkpoint -----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"validations": self._validations}
        weights = self._base.state_dict()  # base=None without PEFT: "the weights when training started"
        if weights is not None:
            state["base_state"] = weights
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
        if self.base is None:
            self._base.load_state_dict(state_dict.get("base_state"))

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self.base is not None or self._peft(pl_module) is not None:
            return
        state = self.saved_state(checkpoint)
        if not isinstance(state, Mapping) or "base_state" not in state:
            raise ResumeArgumentError(
                "TokenDistributionShift: the checkpoint holds no base weights for it (the run that wrote it did not "
                "measure against a copy of its initial weights), and a copy taken now would be of the trained "
                "weights. Pass base=<the base model's folder or lit_ft asset name>, or start a new run."
            )


def evaluate_token_distribution_shift(model_before: nn.Module | None, model_after: nn.Module,
                                      data: Iterable[Any], max_new_tokens: int = 32, max_samples: int | None = None,
                                      batch_size: int = 8, tokenizer: Any = None, eos_token_id: int | None = None,
                                      pad_token_id: int | None = None, unshifted_max_rank: int = 1,
                                      marginal_max_rank: int = 3, first_k: int = 5,
                                      top_tokens: int = 20) -> dict[str, Any]:
    """URIAL's token distribution shift of ``model_after`` (the fine-tuned HF causal LM: greedy answers) against
    ``model_before`` (its base: the ranks), for a script comparing fine-tuning methods.

    Args:
        model_before: the base model; ``None`` when ``model_after`` is a PEFT model (its adapters are disabled).
        model_after: the fine-tuned model (both on the same device; put in eval mode for the call).
        data: SFT batches (mappings with ``input_ids``, ``labels`` -100 on the prompt, optional
            ``attention_mask``) or prompts (token-id lists / 1-D tensors).
        max_new_tokens / batch_size / unshifted_max_rank / marginal_max_rank / first_k: as in
            :class:`TokenDistributionShift`.
        max_samples: prompts used (``None`` = all).
        tokenizer: renders the most shifted tokens as text (else ids); gives eos / pad when not passed.
        eos_token_id: ends answers (``None`` = the tokenizer's, else the model config's; pass -1 for no stop).
        pad_token_id: left padding of the prompts (``None`` = the tokenizer's / config's / eos / 0).
        top_tokens: length of the ``top_shifted`` list.

    Returns:
        ``unshifted_share``, ``marginal_share``, ``shifted_share``, ``shifted_share_first_k``, ``tokens`` (floats /
        int), ``position_shares`` ([max_new_tokens][3] lists), ``position_counts``, ``top_shifted`` (``(text,
        times_shifted, times_decoded)``) and ``prompts`` (how many were answered).
    """
    owner = "evaluate_token_distribution_shift"
    check_int(owner, "max_new_tokens", max_new_tokens, minimum=1)
    check_int(owner, "max_samples", max_samples, minimum=1, allow_none=True, null_means="all")
    check_int(owner, "batch_size", batch_size, minimum=1)
    from lit_ft.core.introspect import find_hf_model

    hf_after = find_hf_model(model_after, require_lm_head=True)
    if model_before is None:
        peft = find_peft_model(model_after)
        if peft is None:
            raise ValueError(f"{owner}: `model_before` is None but `model_after` has no PEFT adapters to disable; "
                             "pass the base model")

        def base() -> AbstractContextManager[nn.Module]:
            return _Disabled(peft, hf_after)
    else:
        def base() -> AbstractContextManager[nn.Module]:
            return nullcontext(model_before)
    prompts: list[torch.Tensor] = []
    for item in data:
        if isinstance(item, Mapping):
            prompts.extend(prompts_from_batch(item))
        else:
            prompts.append(torch.as_tensor(item, dtype=torch.long).flatten())
        if max_samples is not None and len(prompts) >= max_samples:
            break
    prompts = prompts[:max_samples] if max_samples is not None else prompts
    cfg = hf_after.config

    def first(*values: Any) -> int | None:
        for v in values:
            v = v[0] if isinstance(v, (list, tuple)) and v else v
            if isinstance(v, int):
                return v
        return None

    eos = first(eos_token_id, getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
    eos = None if eos is not None and eos < 0 else eos
    pad = first(pad_token_id, getattr(tokenizer, "pad_token_id", None), getattr(cfg, "pad_token_id", None), eos, 0)
    vocab = int(hf_after.get_output_embeddings().weight.shape[0])
    metric = TokenDistributionShiftMetric(unshifted_max_rank, marginal_max_rank, max_new_tokens, first_k, vocab)
    device = next(hf_after.parameters()).device
    metric = metric.to(device)
    modes = [(m, m.training) for m in (model_before, model_after) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        measure_token_distribution_shift(hf_after, base, prompts, metric, max_new_tokens, batch_size, int(pad), eos,
                                         device)
    finally:
        for m, was in modes:
            m.train(was)
    results = {k: v.tolist() if v.dim() else v.item() for k, v in metric.compute().items()}
    results["top_shifted"] = [(_token_text(tokenizer, i), s, n) for i, s, n in metric.top_shifted(top_tokens)] \
        if top_tokens else []
    results["prompts"] = len(prompts)
    return results


class _Disabled:
    """``with`` block: a PEFT model's adapters off, yielding the HF model inside it (LoRA layers disabled in place)."""

    def __init__(self, peft: nn.Module, hf: nn.Module) -> None:
        self.peft, self.hf = peft, hf
        self._cm: Any = None

    def __enter__(self) -> nn.Module:
        self._cm = adapters_disabled(self.peft)
        self._cm.__enter__()
        return self.hf

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
