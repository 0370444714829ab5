"""TuningContribution (TuCo): at validation, how much of the model's response to each held-out prompt comes from
fine-tuning rather than pre-training (the math: :mod:`lit_ft.metrics.tuning_contribution`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_ft.core.frozen import DTYPES, FrozenModel
from lit_ft.core.introspect import find_decoder_layers, find_hf_model
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE, ResumeArgumentError, ResumeRecorded
from lit_ft.core.validate import check_bool, check_choice, check_int, check_str
from lit_ft.metrics._pretrained_branch import AdapterDisabledBranch, CopyBranch, adapter_layers
from lit_ft.metrics.tuning_contribution import (
    TOKENS, TuningContributionMetric, _check_norm, prompt_token_mask, tuning_components,
)

NAME = "tuning_contribution"
_PREFIX = f"lit_ft/{NAME}/"
BRANCHES = ("auto", "adapters", "copy")


def per_layer_bars(ptc_layer: torch.Tensor, ftc_layer: torch.Tensor) -> Any:
    """Grouped bars per decoder layer: mean ``‖PTC_l‖`` and mean ``‖FTC_l‖`` over the prompts, and (a line on a
    second axis) the per-layer fine-tuning share ``‖FTC_l‖ / (‖PTC_l‖ + ‖FTC_l‖)`` of those means."""
    from lit_ft.core.pictures import new_figure

    n = int(ptc_layer.numel())
    fig = new_figure(max(5.0, 0.35 * n + 2.0), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    xs = torch.arange(n, dtype=torch.float32)
    ax.bar((xs - 0.2).tolist(), ptc_layer.tolist(), width=0.4, color="#3c6e9f", label="pre-training |PTC|")
    ax.bar((xs + 0.2).tolist(), ftc_layer.tolist(), width=0.4, color="#ed553b", label="fine-tuning |FTC|")
    ax.set_xticks(xs.tolist(), [str(i) for i in range(n)])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean magnitude at the prompt token")
    ax.set_title("tuning contribution by layer")
    # FTC is often orders of magnitude below PTC: its per-layer share, on its own [0, 1] axis, stays readable
    share = ftc_layer / (ptc_layer + ftc_layer).clamp_min(torch.finfo(torch.float32).tiny)
    twin = ax.twinx()
    twin.plot(xs.tolist(), share.tolist(), color="black", marker="o", ms=3, label="|FTC| / (|PTC| + |FTC|)")
    twin.set_ylim(0, 1)
    twin.set_ylabel("fine-tuning share")
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="best", fontsize=8)
    return fig


def distribution_bars(histogram: torch.Tensor, mean: float) -> Any:
    """The per-prompt TuCo histogram over [0, 1] with the mean marked."""
    from lit_ft.core.pictures import new_figure

    bins = int(histogram.numel())
    fig = new_figure(5.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    edges = torch.linspace(0, 1, bins + 1)
    ax.bar(edges[:-1].tolist(), histogram.tolist(), width=1.0 / bins, align="edge", color="#f6a55c",
           edgecolor="white")
    ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("TuCo")
    ax.set_ylabel("prompts")
    ax.set_title("tuning contribution over the prompts")
    ax.legend(loc="best", fontsize=8)
    return fig


@technique(name=NAME, family="analysis",
           paper="TuCo: Measuring the Contribution of Fine-Tuning to Individual Responses of LLMs", arxiv="2506.23423")
class TuningContribution(ResumeRecorded, Callback):
    """Tuning Contribution (TuCo; Nuti, Franzmeyer & Henriques, ICML 2025) of the model being fine-tuned, measured
    on the validation prompts.

    At a validation (sanity checks excluded), for up to ``max_batches`` validation batches per rank, the model runs
    once more (no grad, trunk only) and, at every decoder layer ``l`` with input ``x_l`` (the fine-tuned residual
    stream), the pre-trained layer is applied to the same ``x_l`` with the same attention mask and position
    embeddings: ``PTC_l = f_PT(x_l) − x_l``, ``FTC_l = f_FT(x_l) − f_PT(x_l)``. At the prompt's last token
    (positions before the first supervised label, ``labels != -100``), ``TuCo = ‖Σ_l FTC_l‖ / (‖Σ_l PTC_l‖ +
    ‖Σ_l FTC_l‖)``. Logged: ``lit_ft/tuning_contribution/tuco`` (mean over prompts, all ranks), ``tuco_std``,
    ``prompts`` and, with ``log_per_layer``, ``ptc_layer{l}`` / ``ftc_layer{l}``; pictures: per-layer bars of the
    mean ``‖PTC_l‖`` and ``‖FTC_l‖`` and the histogram of per-prompt values (``lit_ft.core.pictures``).

    The pre-trained layers: under PEFT (adapters in the decoder layers) the same layers with the adapters switched
    off for the call — no second copy; under full fine-tuning a frozen copy of the weights taken when ``fit`` starts
    (before any step), stored in this callback's checkpoint state so that a resumed run compares against the same
    initial weights (a checkpoint without it is refused rather than re-taken from trained weights), or a model loaded
    from ``pre_trained``. Nothing is hooked outside these extra forwards: training steps cost nothing.

    Args:
        max_batches: validation batches measured per rank and validation (``None``: all).
        every_n_validations: measure at every n-th validation.
        token: ``"last"`` (the prompt's last token, the paper's choice) or ``"mean"`` (the mean over its tokens).
        norm: the vector-norm order of ``‖·‖`` (2 = Euclidean, 1, or ``.inf``).
        branch: the pre-trained layers: ``"auto"`` (``"adapters"`` when the decoder layers hold PEFT adapters, else
            ``"copy"``), ``"adapters"`` or ``"copy"`` (a frozen copy of the initial weights, or ``pre_trained``).
        pre_trained: with ``branch`` copy: a local folder or ``lit_ft.assets`` name of the pre-trained model (same
            architecture) instead of a copy of the initial weights (``None``); needed for ``trainer.validate`` alone.
        pre_trained_dtype: the copy's dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        offload: keep the copy in CPU memory between measurements.
        bins: bins of the per-prompt histogram over [0, 1].
        log_per_layer: also log the per-layer mean magnitudes as scalars.
        pictures: draw and log the two pictures.
    """

    #: resuming with a changed argument (lit_ft.core.resume): the saved initial weights stay valid for every value;
    #: a run that needs them and finds none is refused in on_load_checkpoint
    resume_decisions = {a: RESTORE for a in ("max_batches", "every_n_validations", "token", "norm", "branch",
                                              "pre_trained", "pre_trained_dtype", "offload", "bins", "log_per_layer",
                                              "pictures")}

    def __init__(
        self,
        max_batches: int | None = 8,
        every_n_validations: int = 1,
        token: str = "last",
        norm: float = 2.0,
        branch: str = "auto",
        pre_trained: str | None = None,
        pre_trained_dtype: str = "float32",
        offload: bool = False,
        bins: int = 20,
        log_per_layer: bool = False,
        pictures: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "max_batches", max_batches, minimum=1, allow_none=True, null_means="every batch")
        check_int(owner, "every_n_validations", every_n_validations, minimum=1)
        check_choice(owner, "token", token, TOKENS)
        _check_norm(owner, norm)
        check_choice(owner, "branch", branch, BRANCHES)
        check_str(owner, "pre_trained", pre_trained, allow_none=True, null_means="a copy of the initial weights")
        check_choice(owner, "pre_trained_dtype", pre_trained_dtype, sorted(DTYPES))
        check_bool(owner, "offload", offload)
        check_int(owner, "bins", bins, minimum=1)
        check_bool(owner, "log_per_layer", log_per_layer)
        check_bool(owner, "pictures", pictures)
        if pre_trained is not None and branch == "adapters":
            raise ValueError(f"{owner}: `pre_trained` ({pre_trained!r}) is the copy branch's model; with "
                             "branch='adapters' the pre-trained layers are the adapter-free ones. Use branch='copy' "
                             "or 'auto', or pre_trained=None")
        self.max_batches = max_batches
        self.every_n_validations = int(every_n_validations)
        self.token = token
        self.norm = float(norm)
        self.branch = branch
        self.pre_trained = pre_trained
        self.pre_trained_dtype = pre_trained_dtype
        self.offload = bool(offload)
        self.bins = int(bins)
        self.log_per_layer = bool(log_per_layer)
        self.pictures = bool(pictures)

        self._copy = FrozenModel(pre_trained, owner=owner, dtype=pre_trained_dtype, offload=self.offload,
                                 require_lm_head=False)
        self._have_copy = False  # a copy of the initial weights exists (taken at fit, or restored)
        self._resolved: str | None = None  # "adapters" / "copy", at setup
        self.metric: TuningContributionMetric | None = None
        self._validations = 0
        self._measuring = False
        self._batches = 0
        self._warned: set[str] = set()
        #: what the last measurement gave (tests and notebooks read it): results and picture paths
        self.last_results: dict[str, Any] = {}
        self.last_pictures: dict[str, str | None] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(token=self.token, norm=self.norm, branch=self.branch,
                                        pre_trained=self.pre_trained)

    # -- setup ------------------------------------------------------------------------------------------------------
    def _resolve_branch(self, hf: nn.Module) -> str:
        has_adapters = bool(adapter_layers(find_decoder_layers(hf)))
        if self.branch == "adapters" and not has_adapters:
            raise ValueError("TuningContribution: branch='adapters' but the model's decoder layers hold no PEFT "
                             "adapter; use branch='copy' (or 'auto') for full fine-tuning")
        if self.branch == "auto":
            return "adapters" if has_adapters and self.pre_trained is None else "copy"
        return self.branch

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies

        refuse_sharded_strategies(trainer, "TuningContribution", "its pre-trained branch calls decoder layers a second "
                                  "time from a forward hook, where sharded weights are not gathered")
        hf = find_hf_model(pl_module)
        self._resolved = self._resolve_branch(hf)
        num_layers = len(find_decoder_layers(hf))
        if self.metric is None or self.metric.num_layers != num_layers:
            self.metric = TuningContributionMetric(num_layers, norm=self.norm, bins=self.bins)
        # "the weights when training starts": copied now, before any step (a resumed run then loads the stored copy
        # over it in load_state_dict, or is refused in on_load_checkpoint)
        if stage == "fit" and self._resolved == "copy" and self.pre_trained is None and self._copy.model is None:
            self._copy.build(hf)
            self._have_copy = True

    # -- measuring -------------------------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0
        self._measuring = (not trainer.sanity_checking
                           and (self._validations + 1) % self.every_n_validations == 0)
        if self._measuring and self._resolved == "copy" and self.pre_trained is None and not self._have_copy:
            # trainer.validate() without fit: a copy now would be of the very weights evaluated (TuCo 0)
            self._warn_once("no_copy", "TuningContribution: no pre-trained model (not fitting, no PEFT adapters, no "
                            "`pre_trained`): nothing measured. Pass pre_trained=<the pre-trained model's folder or "
                            "asset name>.")
            self._measuring = False
        if self._measuring and self.metric is not None:
            self.metric.reset()

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._measuring or (self.max_batches is not None and self._batches >= self.max_batches):
            return
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            self._warn_once("batch", "TuningContribution: validation batches need an 'input_ids' tensor (and "
                            "'labels' with -100 on the prompt to find it); nothing measured")
            return
        self._batches += 1
        self._measure(pl_module, batch)

    @torch.no_grad()
    def _measure(self, pl_module: pl.LightningModule, batch: Mapping[str, Any]) -> None:
        assert self.metric is not None
        hf = find_hf_model(pl_module)
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        mask = prompt_token_mask(batch.get("labels"), am)
        metric = self.metric.to(ids.device)
        if self._resolved == "adapters":
            ptc, ftc, valid = tuning_components(hf, AdapterDisabledBranch(), ids, am, mask, self.token)
        else:
            self._copy.ensure(pl_module)  # pre_trained=<path>: loaded at the first measurement
            with self._copy.on(ids.device) as pt:  # offload: visits the device for this block only
                ptc, ftc, valid = tuning_components(hf, CopyBranch(pt), ids, am, mask, self.token)
        metric.update(ptc[valid], ftc[valid])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if not self._measuring or self.metric is None:
            return
        self._measuring = False
        results = self.metric.compute()  # every rank: the states are summed over ranks
        self.metric.reset()
        self.last_results = {k: v.tolist() if v.dim() else v.item() for k, v in results.items()}
        if int(results["prompts"]) == 0:
            self._warn_once("empty", "TuningContribution: no validation row had a prompt (an attended position "
                            "before its first supervised label); nothing measured")
            return
        for key in ("tuco", "tuco_std", "prompts"):
            self._log(pl_module, key, results[key])
        if self.log_per_layer:
            for i in range(int(results["ptc_layer"].numel())):
                self._log(pl_module, f"ptc_layer{i}", results["ptc_layer"][i])
                self._log(pl_module, f"ftc_layer{i}", results["ftc_layer"][i])
        if self.pictures:
            self._draw(trainer, results)

    @staticmethod
    def _log(pl_module: pl.LightningModule, name: str, value: torch.Tensor) -> None:
        # already the all-rank value (metric.compute synchronised it)
        pl_module.log(_PREFIX + name, value.to(pl_module.device), on_step=False, on_epoch=True, sync_dist=False,
                      rank_zero_only=True)

    def _draw(self, trainer: pl.Trainer, results: Mapping[str, torch.Tensor]) -> None:
        from lit_ft.core.pictures import log_figure

        step = int(trainer.global_step)
        mean = float(results["tuco"])
        self.last_pictures = {
            "per_layer": log_figure(trainer, per_layer_bars(results["ptc_layer"].cpu(), results["ftc_layer"].cpu()),
                                    NAME, "per_layer", step),
            "distribution": log_figure(trainer, distribution_bars(results["histogram"].cpu(), mean), NAME,
                                       "distribution", step),
        }

    # -- checkpoint -------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"validations": self._validations}
        weights = self._copy.state_dict() if self._have_copy else None  # only the copy of the initial weights
        if weights is not None:
            state["initial_state"] = weights
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
        weights = state_dict.get("initial_state")
        if weights is not None and self.pre_trained is None:
            self._copy.load_state_dict(weights)
            self._have_copy = True

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self.pre_trained is not None or self._resolved != "copy":
            return
        state = self.saved_state(checkpoint)
        if not isinstance(state, Mapping) or "initial_state" not in state:
            raise ResumeArgumentError(
                "TuningContribution: the checkpoint holds no copy of the initial weights for it (the run that wrote "
                "it did not use TuningContribution's copy branch), and a copy taken now would not be the weights "
                "training started from. Pass pre_trained=<the pre-trained model's folder or lit_ft asset name>, or "
                "start a new run."
            )


__all__ = ["TuningContribution", "distribution_bars", "per_layer_bars"]
