"""Forgetting of general tasks: held-out token loss and accuracy per named task, as one torchmetrics ``Metric``.

Kotha et al. 2023 ("Understanding Catastrophic Forgetting in Language Models via Implicit Inference",
arXiv 2309.10105) measure how fine-tuning lowers a model's performance on tasks it was *not* fine-tuned on.
:class:`ForgettingMetric` accumulates, per task, what that needs:

- **loss**: the mean next-token NLL of the supervised tokens (labels != -100, shifted as in HF causal LMs):
  ``Σ nll / Σ tokens`` over all updates and ranks;
- **accuracy**, two cheap deterministic kinds:

  * *prefix match* (prompt/completion tasks): a row is correct when the model's argmax reproduces the first
    ``match_tokens`` supervised tokens under teacher forcing — exactly the rows whose greedy decoding starts with
    the reference's first ``match_tokens`` tokens (all of them when the answer is shorter); ``match_tokens=0``
    turns it off;
  * *choice* (classification): every item is scored through one row per label verbalisation; the item is correct
    when the row with the highest log-likelihood of its supervised (label) tokens — summed (``choice_score="sum"``,
    lm-eval-harness's ``acc``) or per token (``"mean"``, fair to labels of different token lengths) — is the gold
    label's. Only the gold rows count towards the loss.

Retention against a measurement taken before fine-tuning is :func:`retention` (``loss_ratio = loss_now /
loss_before``: above 1 = forgetting; ``accuracy_retention = accuracy_now / accuracy_before``: below 1 =
forgetting); conjugate-prompting recovery is :func:`recovery`.

States are per-task sums (``dist_reduce_fx="sum"``), so ``compute()`` is exact across DDP ranks whatever the
split of items.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

from lit_ft.core.batch import IGNORE_INDEX

__all__ = ["CHOICE_SCORES", "ForgettingMetric", "recovery", "retention", "shifted_token_nll"]


#: how the label rows of a classification item are compared
CHOICE_SCORES = ("sum", "mean")


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position NLL of ``labels`` under ``logits`` with the causal shift (position t predicts label t+1).

    Returns ``(nll [B, T-1], mask [B, T-1] bool of supervised targets, argmax-hit [B, T-1] bool)``; ``nll`` is 0
    where the mask is False."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    safe = target.masked_fill(~mask, 0)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    hit = logp.argmax(-1) == safe
    return nll.masked_fill(~mask, 0.0), mask, hit & mask


class ForgettingMetric(Metric):
    """Per-task held-out loss and accuracy (see the module docstring for the definitions).

    Args:
        tasks: the task names (fixed: states are one slot per task, so ranks agree on their shape).
        match_tokens: prefix-match accuracy of prompt/completion updates over this many first supervised tokens;
            0 = no accuracy for them.
        choice_score: how classification rows are compared: ``"sum"`` or ``"mean"`` of their label tokens'
            log-likelihoods.

    ``update(logits, labels, task)`` adds prompt/completion rows; ``update(logits, labels, task, groups=...,
    gold=...)`` adds classification rows (one per item and label verbalisation: ``groups`` long [B], the same value
    for the rows of one item; ``gold`` bool [B], the gold label's row). ``compute()`` returns
    ``{"<task>/loss": ..., "<task>/accuracy": ...}`` for every task that received rows (accuracy only where some
    row was labelled).
    """

    full_state_update = False
    higher_is_better = None  # loss: lower; accuracy: higher

    def __init__(self, tasks: Sequence[str], match_tokens: int = 4, choice_score: str = "sum", **kwargs) -> None:
        super().__init__(**kwargs)
        names = [str(t) for t in tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"ForgettingMetric: `tasks` must be a non-empty list of distinct names, got {tasks!r}")
        if isinstance(match_tokens, bool) or not isinstance(match_tokens, int) or match_tokens < 0:
            raise ValueError(f"ForgettingMetric: `match_tokens` must be an int >= 0, got {match_tokens!r}")
        if choice_score not in CHOICE_SCORES:
            raise ValueError(f"ForgettingMetric: `choice_score` must be one of {CHOICE_SCORES}, got {choice_score!r}")
        self.choice_score = choice_score
        self.tasks = tuple(names)
        self.match_tokens = match_tokens
        n = len(names)
        for state in ("nll_sum", "tokens", "correct", "labelled"):
            self.add_state(state, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def _index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(f"ForgettingMetric: `task` must be one of {list(self.tasks)}, got {task!r}") from None

    def update(self, logits: torch.Tensor, labels: torch.Tensor, task: str, groups: torch.Tensor | None = None,
               gold: torch.Tensor | None = None) -> None:
        """Add a batch of rows of ``task`` (logits [B, T, V], labels [B, T] unshifted, -100 = not scored)."""
        i = self._index(task)
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"ForgettingMetric: `logits` must be [B, T, V] and `labels` [B, T], got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        if (groups is None) != (gold is None):
            raise ValueError("ForgettingMetric: pass both `groups` and `gold` (classification rows) or neither")
        nll, mask, hit = shifted_token_nll(logits, labels)
        if groups is None:
            self.nll_sum[i] += nll.sum().double()
            self.tokens[i] += mask.sum().double()
            if self.match_tokens > 0:
                # rank of each supervised target among the row's supervised targets: the first k must all hit
                order = torch.cumsum(mask.long(), dim=1)
                first = mask & (order <= self.match_tokens)
                ok = ((hit | ~first).all(dim=1)) & mask.any(dim=1)
                self.correct[i] += ok.sum().double()
                self.labelled[i] += mask.any(dim=1).sum().double()
            return
        groups, gold = groups.to(nll.device).long(), gold.to(nll.device).bool()
        if groups.shape != (logits.shape[0],) or gold.shape != groups.shape:
            raise ValueError(f"ForgettingMetric: `groups` and `gold` must be [{logits.shape[0]}], got "
                             f"{tuple(groups.shape)} and {tuple(gold.shape)}")
        self.nll_sum[i] += nll[gold].sum().double()
        self.tokens[i] += mask[gold].sum().double()
        score = -nll.sum(dim=1)  # summed log-likelihood of each row's label tokens
        if self.choice_score == "mean":
            score = score / mask.sum(dim=1).clamp_min(1)
        for g in torch.unique(groups):
            rows = groups == g
            if int(gold[rows].sum()) != 1:
                raise ValueError(f"ForgettingMetric: item {int(g)} must have exactly one `gold` row, got "
                                 f"{int(gold[rows].sum())}")
            best = torch.argmax(score.masked_fill(~rows, -math.inf))  # first maximum on ties
            self.correct[i] += gold[best].double()
            self.labelled[i] += 1.0

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, task in enumerate(self.tasks):
            if self.tokens[i] > 0:
                out[f"{task}/loss"] = (self.nll_sum[i] / self.tokens[i]).float()
            if self.labelled[i] > 0:
                out[f"{task}/accuracy"] = (self.correct[i] / self.labelled[i]).float()
        return out


def _value(d: Mapping[str, float | torch.Tensor], key: str) -> float | None:
    v = d.get(key)
    return None if v is None else float(v)


def retention(now: Mapping[str, float | torch.Tensor], before: Mapping[str, float | torch.Tensor],
              tasks: Sequence[str]) -> dict[str, float]:
    """``<task>/loss_ratio = loss_now / loss_before`` and ``<task>/accuracy_retention = accuracy_now /
    accuracy_before`` (left out where either side is missing; ``nan`` when the baseline accuracy is 0)."""
    out: dict[str, float] = {}
    for t in tasks:
        for metric, name in (("loss", "loss_ratio"), ("accuracy", "accuracy_retention")):
            a, b = _value(now, f"{t}/{metric}"), _value(before, f"{t}/{metric}")
            if a is not None and b is not None:
                out[f"{t}/{name}"] = a / b if b != 0 else math.nan
    return out


def recovery(plain_now: Mapping[str, float | torch.Tensor], conj_now: Mapping[str, float | torch.Tensor],
             plain_before: Mapping[str, float | torch.Tensor], conj_before: Mapping[str, float | torch.Tensor],
             tasks: Sequence[str]) -> dict[str, float]:
    """What conjugate prompting recovers on the fine-tuned model, net of what it changes on the pre-trained one.

    ``<task>/recovery_accuracy = (acc_conj_now - acc_plain_now) - (acc_conj_before - acc_plain_before)`` and
    ``<task>/recovery_loss = (loss_plain_now - loss_conj_now) - (loss_plain_before - loss_conj_before)``: both
    positive when the transformed prompt helps the fine-tuned model more than it helped the pre-trained model
    (the paper's prediction when forgetting is a shift of the inferred task rather than a lost capability).
    """
    out: dict[str, float] = {}
    for t in tasks:
        for metric, sign in (("accuracy", 1.0), ("loss", -1.0)):
            vals = [_value(d, f"{t}/{metric}") for d in (plain_now, conj_now, plain_before, conj_before)]
            if all(v is not None for v in vals):
                pn, cn, pb, cb = vals  # type: ignore[misc]
                out[f"{t}/recovery_{metric}"] = sign * ((cn - pn) - (cb - pb))
    return out
