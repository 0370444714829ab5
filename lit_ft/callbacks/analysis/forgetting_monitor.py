"""ForgettingMonitor: held-out general tasks measured before fine-tuning and at validation time; retention curves and
conjugate-prompting recovery (Kotha et al. 2023, arXiv 2309.10105)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lit_ft.callbacks.analysis._forgetting_tasks import (
    CONJUGATES, DEFAULT_TASKS, Encoded, encode_task, evaluate_encoded, load_task,
)
from lit_ft.core.pictures import log_figure, new_figure
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE, ResumeRecorded
from lit_ft.core.validate import check_bool, check_choice, check_int, check_str, check_str_list
from lit_ft.metrics.forgetting import CHOICE_SCORES, ForgettingMetric, recovery, retention

__all__ = ["ForgettingMonitor", "evaluate_forgetting", "measure"]

_PREFIX = "lit_ft/forgetting_monitor"
_REFUSE = ("the saved baseline was measured with the old value, so it is not comparable; resume with the old "
           "value, or start a new run (a baseline cannot be re-measured from trained weights)")


def _tokenizer_from(name_or_obj: Any) -> Any:
    if not isinstance(name_or_obj, str):
        return name_or_obj
    from transformers import AutoTokenizer

    from lit_ft import assets

    return AutoTokenizer.from_pretrained(assets.resolve(name_or_obj))


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _key(name: str, variant: str) -> str:
    """``"<task>/loss"`` as logged for a variant: unchanged for ``"plain"``, ``"<task>/conjugate/loss"`` else."""
    return name if variant == "plain" else name.replace("/", "/conjugate/", 1)


def measure(model: nn.Module, encoded: Sequence[Encoded], match_tokens: int, batch_size: int, pad_id: int,
            rank: int = 0, world: int = 1, choice_score: str = "sum") -> dict[str, float]:
    """One measurement: :class:`ForgettingMetric` over ``encoded`` (this rank's share; ``compute`` syncs the ranks
    when torch.distributed is initialised). Returns ``{"<task>/loss": ..., "<task>/accuracy": ...}``."""
    metric = ForgettingMetric([e.task for e in encoded], match_tokens=match_tokens, choice_score=choice_score)
    metric.to(next(model.parameters()).device)
    evaluate_encoded(model, encoded, metric, batch_size=batch_size, rank=rank, world=world, pad_id=pad_id)
    return {k: float(v) for k, v in metric.compute().items()}


@technique(name="forgetting_monitor", family="analysis",
           paper="Understanding Catastrophic Forgetting in Language Models via Implicit Inference",
           arxiv="2309.10105")
class ForgettingMonitor(ResumeRecorded, Callback):
    """Forgetting monitor (Kotha, Springer & Raghunathan 2023, "Understanding Catastrophic Forgetting in Language
    Models via Implicit Inference"; code: kothasuhas/understanding-forgetting).

    Measures general tasks the run does not train on — held-out token loss and accuracy
    (:class:`~lit_ft.metrics.forgetting.ForgettingMetric`) — once at fit start, on the weights fine-tuning starts
    from (the *baseline*), and again at the end of every ``every_n_val``-th validation. Logs under
    ``lit_ft/forgetting_monitor/<task>/``: ``loss``, ``loss_ratio`` (now / baseline: > 1 = forgetting),
    ``accuracy``, ``accuracy_retention`` (now / baseline: < 1 = forgetting); draws retention vs step
    (``retention_step{N}.png`` under the log dir, a W&B image with a WandbLogger).

    The baseline lives in the callback's checkpoint state: a resumed run keeps the original one and never
    re-measures it from trained weights.

    Conjugate prompting (the paper's test of its hypothesis that fine-tuning skews the *inferred task* rather than
    erasing capabilities): with ``conjugate`` other than ``"none"`` every measurement is repeated through a
    transformed prompt that needs the same capability but looks less like the fine-tuning data, and
    ``<task>/conjugate/loss``, ``<task>/conjugate/accuracy``, ``<task>/recovery_loss``,
    ``<task>/recovery_accuracy`` are logged (:func:`~lit_ft.metrics.forgetting.recovery`: what the transform gains
    on the fine-tuned model minus what it gained on the baseline). The paper translates prompts into other
    languages; offline, the choices are ``"leetspeak"`` and ``"pig_latin"`` (deterministic rule versions of two
    transforms the authors' code also used) and ``"reformat"`` (a plain ``Q: / A:`` template instead of the chat
    template). See ``docs/techniques/forgetting_monitor.md``.

    Nothing runs during training steps: the callback has no batch hooks.

    Args:
        tasks: asset names or JSONL paths (``prompt``/``completion`` rows or ``text``/``label`` rows); ``None`` =
            ``["alpaca-en-demo", "sarcasm-val", "bbcnews"]``. Leave out what the run trains on.
        max_samples: items per task (a seeded shuffle's first ones), >= 1.
        every_n_val: measure at every n-th validation epoch end (sanity checks never count), >= 1.
        conjugate: ``"none"``, ``"reformat"``, ``"leetspeak"`` or ``"pig_latin"``.
        tokenizer: a tokenizer name/path; ``None`` = the DataModule's ``tokenizer``.
        max_length: tokens per row (the prompt is cut from the left to leave room for the answer), >= 8.
        match_tokens: prefix-match accuracy of prompt/completion tasks over the first this-many answer tokens;
            0 = loss only for them.
        choice_score: classification accuracy compares the labels' ``"sum"`` (default) or ``"mean"`` (per token)
            log-likelihood.
        batch_size: rows per forward, >= 1.
        seed: the shuffle that picks the items.
        plot: draw the retention picture.
    """

    resume_decisions = {
        "tasks": _REFUSE, "max_samples": _REFUSE, "conjugate": _REFUSE, "max_length": _REFUSE,
        "match_tokens": _REFUSE, "choice_score": _REFUSE, "seed": _REFUSE,
        "every_n_val": RESTORE, "batch_size": RESTORE, "plot": RESTORE, "tokenizer": RESTORE,
    }

    def __init__(
        self,
        tasks: list[str] | None = None,
        max_samples: int = 64,
        every_n_val: int = 1,
        conjugate: str = "none",
        tokenizer: str | None = None,
        max_length: int = 256,
        match_tokens: int = 4,
        choice_score: str = "sum",
        batch_size: int = 8,
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        tasks = check_str_list(owner, "tasks", tasks, allow_none=True, null_means=str(list(DEFAULT_TASKS)))
        self.tasks = list(DEFAULT_TASKS) if tasks is None else tasks
        self.max_samples = check_int(owner, "max_samples", max_samples, minimum=1)
        self.every_n_val = check_int(owner, "every_n_val", every_n_val, minimum=1)
        self.conjugate = check_choice(owner, "conjugate", conjugate, CONJUGATES)
        self.tokenizer = check_str(owner, "tokenizer", tokenizer, allow_none=True, null_means="the DataModule's")
        self.max_length = check_int(owner, "max_length", max_length, minimum=8)
        self.match_tokens = check_int(owner, "match_tokens", match_tokens, minimum=0)
        self.choice_score = check_choice(owner, "choice_score", choice_score, CHOICE_SCORES)
        self.batch_size = check_int(owner, "batch_size", batch_size, minimum=1)
        self.seed = check_int(owner, "seed", seed, minimum=0)
        self.plot = check_bool(owner, "plot", plot)

        self.baseline: dict[str, dict[str, float]] | None = None  # {"plain": ..., "conjugate": ...}
        self.history: list[dict[str, Any]] = []  # one {"step", "plain", "conjugate"} per measurement
        self.baseline_step = 0
        self._n_val = 0
        self._encoded: dict[str, list[Encoded]] | None = None
        self._pad_id = 0
        self.measurements = 0  # how many times the model was measured in this process (tests, diagnostics)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=self.tasks, conjugate=self.conjugate, max_samples=self.max_samples)

    # -- data ---------------------------------------------------------------------------------------------------
    def _prepare(self, trainer: pl.Trainer) -> dict[str, list[Encoded]]:
        if self._encoded is None:
            tok = self.tokenizer
            if tok is None:
                dm = getattr(trainer, "datamodule", None)
                tok = getattr(dm, "tokenizer", None) if dm is not None else None
            if tok is None:
                raise ValueError("ForgettingMonitor: no tokenizer: set `tokenizer` (a name or path), or use a "
                                 "DataModule with a `tokenizer` attribute (e.g. lit_ft.data.SFTDataModule)")
            tok = _tokenizer_from(tok)
            self._pad_id = _pad_id(tok)
            loaded = [load_task(t, self.max_samples, self.seed) for t in self.tasks]
            names = [t.name for t in loaded]
            if len(set(names)) != len(names):
                raise ValueError(f"ForgettingMonitor: `tasks` must name distinct tasks, got {self.tasks!r} "
                                 f"(task names {names})")
            variants = ["plain"] + ([] if self.conjugate == "none" else ["conjugate"])
            self._encoded = {
                v: [encode_task(t, tok, "none" if v == "plain" else self.conjugate, self.max_length) for t in loaded]
                for v in variants
            }
        return self._encoded

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        from lit_ft.core.introspect import find_hf_model

        encoded = self._prepare(trainer)
        model = find_hf_model(pl_module)
        self.measurements += 1
        return {v: measure(model, enc, self.match_tokens, self.batch_size, self._pad_id, rank=trainer.global_rank,
                           world=trainer.world_size, choice_score=self.choice_score) for v, enc in encoded.items()}

    @property
    def task_names(self) -> list[str]:
        return [e.task for e in (self._encoded or {}).get("plain", [])]

    # -- hooks --------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run has its baseline from the checkpoint by now (Lightning restores callbacks before this hook)
        self._prepare(trainer)
        if self.baseline is not None:
            return
        self.baseline = self._measure(trainer, pl_module)
        self.baseline_step = int(trainer.global_step)
        metrics = {f"{_PREFIX}/{_key(k, v)}_before": x for v, d in self.baseline.items() for k, x in d.items()}
        for lg in trainer.loggers:  # self.log is not allowed in on_fit_start
            lg.log_metrics(metrics, step=self.baseline_step)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.baseline is None:
            return
        self._n_val += 1
        if self._n_val % self.every_n_val:
            return
        now = self._measure(trainer, pl_module)
        step = int(trainer.global_step)
        self.history.append({"step": step, **now})
        for name, value in self.scalars(now).items():
            pl_module.log(f"{_PREFIX}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
        if self.plot:
            self._draw(trainer, step)

    def scalars(self, now: dict[str, dict[str, float]]) -> dict[str, float]:
        """The logged values (without the ``lit_ft/forgetting_monitor/`` prefix) of one measurement ``now``."""
        assert self.baseline is not None
        names = self.task_names
        out = dict(now["plain"])
        out.update(retention(now["plain"], self.baseline["plain"], names))
        if "conjugate" in now:
            out.update({_key(k, "conjugate"): v for k, v in now["conjugate"].items()})
            out.update(recovery(now["plain"], now["conjugate"], self.baseline["plain"], self.baseline["conjugate"],
                                names))
        return out

    def _draw(self, trainer: pl.Trainer, step: int) -> None:
        log_figure(trainer, self.retention_figure(), "forgetting_monitor", "retention", step)

    def retention_figure(self) -> Any:
        """The picture: retention vs step, one line per task (1 at the baseline); with a conjugate, a third panel
        of the recovered accuracy (0 at the baseline). A matplotlib ``Figure``."""
        from matplotlib.ticker import MaxNLocator

        assert self.baseline is not None
        base = self.baseline
        panels: list[tuple[str, str, float | None]] = [
            ("loss_ratio", "held-out loss / before (> 1 = forgetting)", 1.0),
            ("accuracy_retention", "accuracy / before (< 1 = forgetting)", 1.0)]
        if "conjugate" in base:
            panels.append(("recovery_accuracy", f"{self.conjugate}: accuracy recovered (> 0)", 0.0))
        fig = new_figure(4.2 * len(panels), 3.6)
        for n, (key, title, start) in enumerate(panels, 1):
            ax = fig.add_subplot(1, len(panels), n)
            for task in self.task_names:
                pts = [(self.baseline_step, start)]
                for h in self.history:
                    vals = self.scalars({k: v for k, v in h.items() if k != "step"})
                    pts.append((h["step"], vals.get(f"{task}/{key}")))
                pts = [(s, v) for s, v in pts if v is not None and math.isfinite(v)]
                if len(pts) > 1:
                    ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=task)
            ax.axhline(start, color="grey", lw=0.8, ls="--")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", useOffset=False)
            if len(ax.lines) > 1:
                ax.legend(fontsize=7)
        return fig

    # -- checkpoint ---------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "baseline_step": self.baseline_step, "history": list(self.history),
                "n_val": self._n_val}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict.get("baseline")
        self.baseline_step = int(state_dict.get("baseline_step", 0))
        self.history = list(state_dict.get("history", []))
        self._n_val = int(state_dict.get("n_val", 0))


def evaluate_forgetting(model_before: nn.Module, model_after: nn.Module, data: Sequence[str] | None, tokenizer: Any,
                        conjugate: str = "none", max_samples: int = 64, max_length: int = 256,
                        match_tokens: int = 4, choice_score: str = "sum", batch_size: int = 8,
                        seed: int = 0) -> dict[str, float]:
    """Benchmark hook: the monitor's numbers for two HF causal LMs (pre-trained and fine-tuned), outside a Trainer.

    ``data``: task specs as for ``ForgettingMonitor(tasks=...)`` (``None`` = the defaults); ``tokenizer``: an
    object or a name/path. Returns flat ``{"<task>/loss_before", "<task>/loss", "<task>/loss_ratio", ...}`` plus,
    with a conjugate, ``"<task>/conjugate/..."`` values and ``"<task>/recovery_*"``.
    """
    check_choice("evaluate_forgetting", "conjugate", conjugate, CONJUGATES)
    tok = _tokenizer_from(tokenizer)
    loaded = [load_task(t, max_samples, seed) for t in (list(data) if data is not None else list(DEFAULT_TASKS))]
    variants = {"plain": "none"} if conjugate == "none" else {"plain": "none", "conjugate": conjugate}
    enc = {v: [encode_task(t, tok, c, max_length) for t in loaded] for v, c in variants.items()}
    pad = _pad_id(tok)
    before = {v: measure(model_before, e, match_tokens, batch_size, pad, choice_score=choice_score)
              for v, e in enc.items()}
    after = {v: measure(model_after, e, match_tokens, batch_size, pad, choice_score=choice_score)
             for v, e in enc.items()}
    names = [t.name for t in loaded]
    out: dict[str, float] = {}
    for v in variants:
        out.update({f"{_key(k, v)}_before": x for k, x in before[v].items()})
        out.update({_key(k, v): x for k, x in after[v].items()})
    out.update(retention(after["plain"], before["plain"], names))
    if "conjugate" in variants:
        out.update(recovery(after["plain"], after["conjugate"], before["plain"], before["conjugate"], names))
    return out
