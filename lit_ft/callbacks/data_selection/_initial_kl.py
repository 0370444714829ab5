"""LeTI's optional KL term to the initial model on the non-feedback tokens (a private helper of
:class:`lit_ft.callbacks.FeedbackLoop`).

The authors' loss (their ``loss_fn`` with ``kl_coefficient``): at every position whose input token belongs to the
problem + program part of a feedback text (``non_feedback_mask``: a real token after the ``<|good|>`` / ``<|bad|>``
+ ``<|lang_feedback|>`` … ``<|/lang_feedback|>`` prefix),

    KL(p_initial ‖ p_current) = Σ_v p_initial(v) · (log p_initial(v) − log p_current(v))

over the whole vocabulary, summed over those positions and divided by their count; ``coefficient × KL`` is added to
the loss. Position ``t``'s distribution is the one predicting token ``t + 1`` (the mask is on the input token, as
theirs is). Plain rows (the pre-training regulariser) get no KL, as in the authors' code, where the KL only enters
the feedback batches' loss.

Here the term is an :class:`~lit_ft.core.loss.Objective` on the token-loss engine: at level 3 the current logits
come block by block from the chunked fused-linear base, and the initial model's logits of a block are computed
inside the block from its final hidden states — no ``[N, V]`` tensor of either model. At level 2 (a module whose
HF model computes its loss) the model's own logits are used, and both log-softmaxes are taken in row blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_ft.core.frozen import DTYPES, FrozenModel
from lit_ft.core.introspect import causal_lm_parts
from lit_ft.core.loss import Objective, ObjectiveInputs
from lit_ft.core.loss.primitives import apply_logit_transforms, final_hidden_states

#: rows of one block of the level-2 path: about 2^24 vocabulary entries per log-softmax (64 MiB in fp32)
_BLOCK_ENTRIES = 1 << 24


def non_feedback_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, head_ids: tuple[int, int],
                      begin_id: int, end_id: int) -> torch.Tensor:
    """Bool ``[B, T]``: the real tokens of each feedback row after its feedback prefix.

    A feedback row starts (at its first real token) with ``<|good|>`` or ``<|bad|>`` (``head_ids``); its prefix ends
    at the first ``<|/lang_feedback|>`` (``end_id``) when ``<|lang_feedback|>`` (``begin_id``) follows the head, else
    at the head itself (coarse feedback). A feedback row cut before its ``<|/lang_feedback|>`` and every other row
    (the plain rows) have no such token.
    """
    ids = input_ids
    B, T = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pos = torch.arange(T, device=ids.device).expand(B, T)
    has_real = real.any(1)
    first = real.to(torch.int8).argmax(1)  # left or right padding alike
    head = ids.gather(1, first[:, None])[:, 0]
    is_feedback = has_real & ((head == head_ids[0]) | (head == head_ids[1]))
    nxt = ids.gather(1, (first + 1).clamp_max(T - 1)[:, None])[:, 0]
    has_begin = (first + 1 < T) & (nxt == begin_id) & real.gather(1, (first + 1).clamp_max(T - 1)[:, None])[:, 0]
    is_end = (ids == end_id) & real & (pos > first[:, None])
    end = torch.where(is_end.any(1), is_end.to(torch.int8).argmax(1), torch.full_like(first, T))
    start = torch.where(has_begin, end + 1, first + 1)
    return is_feedback[:, None] & real & (pos >= start[:, None])


def kl_sum(current: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """``Σ_rows Σ_v p_initial · (log p_initial − log p_current)`` of two ``[N, V]`` logit blocks (the current one
    carries the gradient)."""
    log_q = F.log_softmax(current, dim=-1)
    log_p = F.log_softmax(initial.to(current.dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state (names, dtypes, shapes and bytes): equal only for bit-identical weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no second copy
    return h.hexdigest()


class InitialModelKL(Objective):
    """The KL term as an objective: ``coefficient · Σ KL / (non-feedback positions of the window, all ranks)``.

    The initial model is a frozen copy of the trained HF model taken by :meth:`build` (FeedbackLoop calls it at
    setup, once the feedback tokens' embedding rows exist — before a checkpoint is restored, so a resumed run copies
    the same fit-start weights). Its weights are not stored in the checkpoint; their digest is
    (:meth:`state_dict`), and a resumed run whose rebuilt copy differs is refused (:meth:`load_state_dict`).
    """

    objective_name = "feedback_loop/kl"

    def __init__(self, coefficient: float, owner: str = "FeedbackLoop") -> None:
        self.coefficient = float(coefficient)
        self.owner = owner
        self.frozen = FrozenModel(None, owner=owner, persist=False)
        self.token_ids: list[int] = []  # <|bad|>, <|good|>, <|lang_feedback|>, <|/lang_feedback|>
        self.digest: str | None = None
        self._expected_digest: str | None = None
        #: the last training forward's mean KL per non-feedback position (detached), for the logs
        self.last_kl: torch.Tensor | None = None

    # -- the initial model ---------------------------------------------------------------------------------------
    def build(self, hf_model: nn.Module, token_ids: list[int]) -> None:
        """Copy ``hf_model`` (the fit-start weights) once; later fits of the same callback keep the first copy."""
        self.token_ids = list(token_ids)
        if self.frozen.model is not None:
            return
        dtype = next((k for k, v in DTYPES.items() if v == next(hf_model.parameters()).dtype), "float32")
        self.frozen.dtype = dtype
        self.frozen.build(hf_model)
        self.digest = weights_digest(self.frozen.model)
        self._check_digest()

    def state_dict(self) -> dict[str, Any]:
        return {"initial_model_digest": self.digest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the checkpoint's digest against the copy built at setup (or at the build, if later)."""
        self._expected_digest = state.get("initial_model_digest")
        self._check_digest()

    def _check_digest(self) -> None:
        expected = self._expected_digest
        if expected is None or self.digest is None:
            return
        if expected != self.digest:
            raise ValueError(
                f"{self.owner}: `kl_coefficient` > 0 needs the weights the run started from, but the model this "
                "resumed run was built with (copied before the checkpoint is restored) differs from the one the "
                "checkpoint's run started from (their digests differ). Build the module exactly as the first run "
                "did (same model, seed and embedding rows), or resume with kl_coefficient: 0.")
        self._expected_digest = None

    # -- the objective -------------------------------------------------------------------------------------------
    def mask(self, batch: Mapping[str, Any]) -> torch.Tensor:
        bad, good, begin, end = self.token_ids
        return non_feedback_mask(batch["input_ids"], batch.get("attention_mask"), (good, bad), begin, end)

    def objective_weight(self) -> float:
        return self.coefficient

    def objective_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            return {"positions": torch.zeros(())}
        return {"positions": self.mask(batch).sum().float()}

    def objective_normaliser(self, totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return totals["positions"]

    @torch.no_grad()
    def _initial_hidden(self, batch: Mapping[str, Any], mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        model = self.frozen.model
        if model is None:
            raise RuntimeError(f"{self.owner}: the initial model is used before it was built (setup builds it)")
        with self.frozen.on(batch["input_ids"].device) as model:
            parts = causal_lm_parts(model)
            hidden = final_hidden_states(parts, batch)
        return hidden[mask.to(hidden.device)], parts

    def objective_loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        if not inputs.training:
            return None
        mask = self.mask(inputs.batch).to(inputs.valid.device)
        n = int(mask.sum())
        if n == 0:
            self.last_kl = torch.zeros((), device=mask.device)
            return None
        hidden, parts = self._initial_hidden(inputs.batch, mask)

        def chunk(logits: torch.Tensor, initial_hidden: torch.Tensor) -> torch.Tensor:
            total = logits.new_zeros(())
            block = max(1, _BLOCK_ENTRIES // logits.shape[-1])
            for s in range(0, logits.shape[0], block):
                with torch.no_grad():
                    z = F.linear(initial_hidden[s:s + block].to(parts.weight.dtype), parts.weight, parts.bias)
                    z = apply_logit_transforms(z.to(logits.dtype), parts)
                total = total + kl_sum(logits[s:s + block], z)
            return total

        total = inputs.chunked_loss(chunk, mask, rows={"initial_hidden": hidden})
        self.last_kl = total.detach() / n
        return total
