"""Tuning Contribution (TuCo; Nuti, Franzmeyer & Henriques, ICML 2025, "TuCo: Measuring the Contribution of
Fine-Tuning to Individual Responses of LLMs", arXiv 2506.23423): how much of a fine-tuned model's response to a prompt
comes from fine-tuning rather than pre-training.

The fine-tuned model runs as usual. At each decoder layer ``l`` with input ``x_l`` (the fine-tuned residual stream)

- ``PTC_l = f_PT(x_l) − x_l``  (the pre-trained layer's update of that stream),
- ``FTC_l = f_FT(x_l) − f_PT(x_l)``  (what fine-tuning changes in it), so ``x_{l+1} = f_FT(x_l) = x_l + PTC_l + FTC_l``;

summed over layers at one token (the prompt's last by default), ``I_PTC = Σ_l PTC_l``, ``I_FTC = Σ_l FTC_l``, and

    TuCo = ‖I_FTC‖ / (‖I_PTC‖ + ‖I_FTC‖)  ∈ [0, 1]

(0 when fine-tuning changed nothing; 1 when the pre-trained layers add nothing to the stream).

Three parts, usable separately:

- :func:`tuning_components` runs a model once and returns every layer's PTC / FTC at the chosen token (``[B, L, H]``);
- :class:`TuningContributionMetric`, a ``torchmetrics.Metric`` over those components: the mean TuCo over prompts, the
  per-layer mean magnitudes ``‖PTC_l‖`` / ``‖FTC_l‖`` and a fixed-bin histogram of the per-prompt values, every state
  summed across DDP ranks;
- :func:`evaluate_tuning_contribution`, the script entry point: TuCo of a fine-tuned model against its pre-trained one
  on a few batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_ft.core.batch import IGNORE_INDEX
from lit_ft.core.introspect import find_base_model, find_decoder_layers, find_hf_model
from lit_ft.core.layer_hooks import ORDER_READ, register_layer_hook
from lit_ft.metrics._pretrained_branch import (
    PreTrainedBranch, layer_input, layer_output_tensor, make_branch, scale_fine_tuning_component,
)

__all__ = [
    "TOKENS", "TuningContributionMetric", "evaluate_tuning_contribution", "prompt_token_mask",
    "scale_fine_tuning_component", "tuco_from_components", "tuning_components",
]

#: which tokens a prompt's components are read at: its last token, or the mean over its tokens
TOKENS = ("last", "mean")


def _check_norm(owner: str, norm: float) -> float:
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or math.isnan(norm) or norm < 1:
        raise ValueError(f"{owner}: `norm` must be a vector-norm order p >= 1 (1, 2, ..., or inf), got {norm!r}")
    return float(norm)


def tuco_from_components(ptc: Tensor, ftc: Tensor, norm: float = 2.0) -> Tensor:
    """Per-prompt TuCo ``‖Σ_l FTC_l‖ / (‖Σ_l PTC_l‖ + ‖Σ_l FTC_l‖)`` from components ``[B, L, H]``; 0 for a prompt
    whose two sums are both zero (nothing to attribute)."""
    f = torch.linalg.vector_norm(ftc.float().sum(1), ord=norm, dim=-1)
    p = torch.linalg.vector_norm(ptc.float().sum(1), ord=norm, dim=-1)
    den = f + p
    return torch.where(den > 0, f / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))


class TuningContributionMetric(Metric):
    """TuCo over a set of prompts, from their per-layer components (:func:`tuning_components`).

    ``update(ptc, ftc)`` takes the components of a batch of prompts, ``[B, L, H]`` each. ``compute()`` returns

    - ``tuco``: the mean per-prompt TuCo, ``tuco_std``: its standard deviation (population), ``prompts``: the count;
    - ``ptc_layer`` / ``ftc_layer``: ``[L]``, the mean over prompts of ``‖PTC_l‖`` / ``‖FTC_l‖`` (per layer, before
      summing over layers: where fine-tuning acts);
    - ``histogram``: ``[bins]`` counts of the per-prompt values over ``[0, 1]`` (equal-width bins, 1.0 in the last).

    Every state is a sum (``dist_reduce_fx="sum"``), so a DDP run computes the same numbers as one process over all
    prompts.

    Args:
        num_layers: the model's number of decoder layers (the per-layer states' size).
        norm: the vector-norm order of ``‖·‖`` (2 by default; see the doc page for this choice).
        bins: histogram bins over [0, 1].
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_layers: int, norm: float = 2.0, bins: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"{owner}: `num_layers` must be an int >= 1, got {num_layers!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"{owner}: `bins` must be an int >= 1, got {bins!r}")
        self.num_layers = num_layers
        self.norm = _check_norm(owner, norm)
        self.bins = bins
        self.add_state("tuco_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tuco_sq_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ptc_layer_sum", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ftc_layer_sum", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("histogram", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ptc: Tensor, ftc: Tensor) -> None:
        """Add prompts' components ``ptc`` / ``ftc``, ``[B, L, H]`` each (``B`` may be 0)."""
        if ptc.shape != ftc.shape or ptc.dim() != 3 or ptc.shape[1] != self.num_layers:
            raise ValueError(f"{type(self).__name__}.update: `ptc` and `ftc` must both be [B, {self.num_layers}, H], "
                             f"got {tuple(ptc.shape)} and {tuple(ftc.shape)}")
        if ptc.shape[0] == 0:
            return
        tuco = tuco_from_components(ptc, ftc, self.norm).double()
        self.tuco_sum += tuco.sum()
        self.tuco_sq_sum += (tuco * tuco).sum()
        self.count += tuco.numel()
        self.ptc_layer_sum += torch.linalg.vector_norm(ptc.float(), ord=self.norm, dim=-1).double().sum(0)
        self.ftc_layer_sum += torch.linalg.vector_norm(ftc.float(), ord=self.norm, dim=-1).double().sum(0)
        idx = (tuco * self.bins).floor().long().clamp(0, self.bins - 1)
        self.histogram += torch.bincount(idx, minlength=self.bins).double()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        mean = self.tuco_sum / n
        var = (self.tuco_sq_sum / n - mean * mean).clamp_min(0)
        return {
            "tuco": mean.float(), "tuco_std": var.sqrt().float(), "prompts": self.count.float(),
            "ptc_layer": (self.ptc_layer_sum / n).float(), "ftc_layer": (self.ftc_layer_sum / n).float(),
            "histogram": self.histogram.float(),
        }


def prompt_token_mask(labels: Tensor | None, attention_mask: Tensor | None) -> Tensor | None:
    """The prompt positions of each row: attended positions before the row's first supervised label (``labels !=
    -100``); a row without any supervised label is prompt throughout. ``None`` when neither is given."""
    if labels is None:
        return None if attention_mask is None else attention_mask.bool()
    attended = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    supervised = (labels != IGNORE_INDEX) & attended
    before_first = supervised.long().cumsum(1) == 0
    return attended & before_first


@torch.no_grad()
def tuning_components(model: nn.Module, branch: PreTrainedBranch, input_ids: Tensor,
                      attention_mask: Tensor | None = None, token_mask: Tensor | None = None,
                      token: str = "last") -> tuple[Tensor, Tensor, Tensor]:
    """Run the fine-tuned ``model`` once and read every decoder layer's PTC / FTC (float32).

    Args:
        model: the fine-tuned model (an HF causal LM, a PEFT model, or a module holding one); it runs its trunk only
            (no lm_head), without a KV cache, in whatever train/eval mode it is in.
        branch: the pre-trained layers (:func:`~lit_ft.metrics._pretrained_branch.make_branch`).
        input_ids: the batch's ``[B, T]`` token ids.
        attention_mask: the batch's ``[B, T]`` attention mask.
        token_mask: ``[B, T]`` the positions a prompt's components are read at (default: the attended positions);
            with ``token="last"`` its last ``True`` position per row, with ``"mean"`` the mean over its ``True``
            positions. Causal attention makes a position's components independent of what follows it, so a full
            prompt + response sequence gives the prompt's last-token components exactly.
        token: ``"last"`` or ``"mean"``.

    Returns:
        ``(ptc, ftc, valid)``: ``[B, L, H]`` components at the chosen token(s) and ``[B]`` rows with at least one
        selected position (the others hold zeros).
    """
    if token not in TOKENS:
        raise ValueError(f"tuning_components: `token` must be one of {list(TOKENS)}, got {token!r}")
    hf = find_hf_model(model)
    layers = find_decoder_layers(hf)
    mask = token_mask if token_mask is not None else attention_mask
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"tuning_components: `token_mask` must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(mask.shape)}")
    valid = mask.any(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(1).clamp_min(0)  # [B]
    weights = mask.float() / mask.sum(1, keepdim=True).clamp_min(1)  # token="mean"
    rows = torch.arange(mask.shape[0], device=mask.device)
    ptc: list[Tensor | None] = [None] * len(layers)
    ftc: list[Tensor | None] = [None] * len(layers)

    def at_tokens(t: Tensor) -> Tensor:
        t = t.float()
        if token == "last":
            return t[rows, last.to(t.device)]
        return torch.einsum("bt,bth->bh", weights.to(t.device), t)

    def read(index: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = layer_input(args, kwargs)
        ft = layer_output_tensor(output)
        pt = branch.layer_output(index, layer, args, kwargs)
        ptc[index] = at_tokens(pt - x)
        ftc[index] = at_tokens(ft - pt)

    # a reader: it sees the layer's output after rewriters (prompt injection) and before token eliminators
    handle = register_layer_hook(hf, read, order=ORDER_READ)
    try:
        find_base_model(hf)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    missing = [i for i, v in enumerate(ptc) if v is None]
    if missing:
        raise RuntimeError(f"tuning_components: decoder layers {missing} did not run in the model's forward")
    return torch.stack(ptc, 1), torch.stack(ftc, 1), valid  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_tuning_contribution(model_before: nn.Module | None, model_after: nn.Module,
                                 data: Iterable[Mapping[str, Tensor]], max_batches: int | None = None,
                                 token: str = "last", norm: float = 2.0, bins: int = 20,
                                 prompt_only: bool = True) -> dict[str, Any]:
    """TuCo of ``model_after`` (fine-tuned) against ``model_before`` (pre-trained) on ``data`` (a benchmark hook).

    Args:
        model_before: the pre-trained model (same architecture), or ``None`` when ``model_after`` is a PEFT model
            (the pre-trained branch is then its layers with the adapters off).
        model_after: the fine-tuned model.
        data: batches with ``input_ids`` and optionally ``attention_mask`` / ``labels`` (on the model's device).
        max_batches: stop after this many batches (``None``: all).
        token: as in :func:`tuning_components`.
        norm: as in :class:`TuningContributionMetric`.
        bins: as in :class:`TuningContributionMetric`.
        prompt_only: read the prompt's tokens (positions before the first supervised label); ``False`` = every
            attended token (the sequence's last with ``token="last"``).

    Returns:
        ``{"tuco", "tuco_std", "prompts", "ptc_layer", "ftc_layer", "histogram"}`` as plain Python numbers / lists,
        plus ``"per_prompt"``: every prompt's TuCo.
    """
    branch = make_branch(model_after, model_before)
    num_layers = len(find_decoder_layers(find_hf_model(model_after)))
    metric = TuningContributionMetric(num_layers, norm=norm, bins=bins)
    per_prompt: list[float] = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        am = batch.get("attention_mask")
        mask = prompt_token_mask(batch.get("labels"), am) if prompt_only else am
        ptc, ftc, valid = tuning_components(model_after, branch, batch["input_ids"], am, mask, token)
        ptc, ftc = ptc[valid].cpu(), ftc[valid].cpu()
        metric.update(ptc, ftc)
        per_prompt.extend(tuco_from_components(ptc, ftc, metric.norm).tolist())
    out = {k: (v.tolist() if v.dim() else v.item()) for k, v in metric.compute().items()}
    out["per_prompt"] = per_prompt
    return out
