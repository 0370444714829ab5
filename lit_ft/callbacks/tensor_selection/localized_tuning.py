"""LocalizedTuning (LocFT-BF): train one module of one decoder layer, skip optimizer steps on batches that are already
fit, stop when the epoch-average loss is low enough."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks._param_plan import SelectionPlanCallback
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE
from lit_ft.core.validate import check_bool, check_int, check_number, check_str
from lit_ft.core.introspect import ModelLayoutError, find_decoder_layers, find_hf_model, param_names_by_id
from lit_ft.core.params import ParamPatternError, ParamPlan, name_matcher

#: relative depth of the default layer: the paper's Llama-3-8B-Instruct setting, ``model.layers.22`` of 32 layers
#: (its Mistral-7B setting is layer 23 of 32; Qwen2.5-7B's layer 6 of 28 is the exception, found by its own search)
DEFAULT_RELATIVE_DEPTH = 22 / 32


def default_layer_index(num_layers: int) -> int:
    """The decoder layer at the paper's relative depth: ``floor(22/32 * num_layers)`` (22 of 32, 20 of 30, 1 of 2)."""
    return min(num_layers - 1, int(DEFAULT_RELATIVE_DEPTH * num_layers))


@technique(name="localized_tuning", family="tensor_selection",
           paper="Fine-tuning Done Right in Model Editing", arxiv="2509.22072")
class LocalizedTuning(SelectionPlanCallback):
    """LocFT-BF: localized, breadth-first fine-tuning of one module.

    Paper: *Fine-tuning Done Right in Model Editing* (LocFT-BF; code ``ICT-STAR/LocFT``). The edited module is one
    decoder layer's module — ``model.layers.22.mlp.down_proj`` for Llama-3-8B-Instruct, layer 6 ``down_proj`` for
    Qwen2.5-7B-Instruct, the whole layer 23 for Mistral-7B (``module_pattern="*"``) — trained with Adam
    (lr 5e-4, weight decay 0, 100 edits per batch, 25 epochs).

    Algorithm:

    1. At ``setup("fit")``: find the decoder layer ``layer`` and, inside it, the parameters whose layer-relative
       name (``mlp.down_proj.weight``) or one of its module prefixes (``mlp.down_proj``) matches ``module_pattern``;
       they are the only trainable tensors (a :class:`~lit_ft.core.params.ParamPlan`; it composes with other lit_ft
       parameter callbacks by intersection). What the module froze itself stays frozen: under PEFT the chosen
       module's adapter (LoRA) parameters train; a chosen module without trainable parameters raises.
    2. Breadth-first = ordinary shuffled mini-batch epochs over the whole data (the DataModule shuffles); nothing to
       do in the callback.
    3. Each optimizer step: the batch loss (the mean over the accumulation window of the losses ``training_step``
       returned, averaged over DDP ranks so every rank decides alike) is compared with ``skip_below``; below it,
       every ``.grad`` is set to ``None`` so the optimizer skips all tensors — no update, no weight decay, no moment
       or step-count change.
    4. At each epoch end: if the mean of the epoch's batch losses is below ``stop_below``,
       ``trainer.should_stop = True`` (Lightning still honours ``min_epochs`` / ``min_steps``).

    Args:
        layer: decoder-layer index; negative counts from the top (``-1`` = last layer). ``None`` (default) = the
            layer at the paper's relative depth, ``floor(22/32 * L)`` for ``L`` decoder layers (layer 22 of
            Llama-3-8B's 32, as in the paper; 20 of SmolLM2-135M's 30): a mid-to-upper layer, where the paper
            localises its edits, not the last one.
        module_pattern: which parameters of that layer train: a module or parameter name relative to the layer
            (``"mlp.down_proj"``, ``"self_attn.q_proj"``), an fnmatch glob (``"mlp.*"``, ``"*"`` = the whole layer),
            or a regex with a ``"re:"`` prefix, matched against the relative parameter name and each of its module
            prefixes.
        skip_below: skip the optimizer step when the batch loss is below this (>= 0; ``0`` never skips). The
            paper uses 1e-2.
        stop_below: stop training at the end of an epoch whose average batch loss is below this (>= 0); ``None``
            disables early stopping. The paper uses 1e-2.
        required: mark the chosen tensors as required, so another parameter callback that freezes them raises
            :class:`~lit_ft.core.params.ParamPlanConflict` at setup.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "localized_tuning"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): the trained tensor follows the saved values;
    #: the thresholds apply from now on (the loss counters stay valid)
    resume_decisions = {
        "layer": "the trained tensors, and the optimizer state laid out for them, follow the saved value",
        "module_pattern": "the trained tensors, and the optimizer state laid out for them, follow the saved value",
        "skip_below": RESTORE, "stop_below": RESTORE, "required": RESTORE,
    }

    def __init__(
        self,
        layer: Optional[int] = None,
        module_pattern: str = "mlp.down_proj",
        skip_below: float = 0.01,
        stop_below: Optional[float] = 0.01,
        required: bool = False,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_int(owner, "layer", layer, allow_none=True, null_means="the paper's relative depth, 22/32")
        check_str(owner, "module_pattern", module_pattern)  # 'mlp.down_proj', 'mlp.*', '*' or 're:...'
        name_matcher(module_pattern, "module_pattern")  # regex syntax errors now, not at setup
        self.skip_below = check_number(owner, "skip_below", skip_below, low=0)
        self.stop_below = check_number(owner, "stop_below", stop_below, low=0, allow_none=True,
                                       null_means="no early stop")
        check_bool(owner, "required", required)
        self.layer = layer
        self.module_pattern = module_pattern
        self.required = required
        #: set at setup: the resolved layer index, the trained tensors (canonical names) and element counts
        self.layer_index: Optional[int] = None
        self.selected_names: list[str] = []
        self.selected_numel = 0
        self.total_numel = 0
        # checkpointed state
        self.skipped_steps = 0
        self.optimizer_steps = 0
        self.last_loss: Optional[float] = None
        self.last_skipped = False
        self.stopped_early = False
        self._epoch = -1
        self._epoch_loss_sum = 0.0
        self._epoch_steps = 0
        # current accumulation window (device tensor: no host sync per micro-batch)
        self._window_sum: Optional[torch.Tensor] = None
        self._window_count = 0
        self._decided = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, module_pattern=self.module_pattern)

    @property
    def tracks_loss(self) -> bool:
        return self.skip_below > 0 or self.stop_below is not None

    # -- selection --------------------------------------------------------------------------------------------
    def select_names(self, pl_module: pl.LightningModule) -> list[str]:
        """Canonical names of the chosen layer's parameters matched by ``module_pattern``."""
        try:
            layers = find_decoder_layers(find_hf_model(pl_module))
        except ModelLayoutError as e:
            raise ModelLayoutError(f"LocalizedTuning: {e}") from None
        n = len(layers)
        if self.layer is None:
            self.layer_index = default_layer_index(n)
        elif not -n <= self.layer < n:
            raise ValueError(f"LocalizedTuning: `layer`={self.layer} is out of range for a model with {n} decoder layers; allowed: {-n}..{n - 1}.")
        else:
            self.layer_index = self.layer % n
        block = layers[self.layer_index]
        match = name_matcher(self.module_pattern, "module_pattern")
        by_id = param_names_by_id(pl_module)
        picked: set[str] = set()
        rel_names = []
        for rel, p in block.named_parameters():
            rel_names.append(rel)
            parts = rel.split(".")
            if any(match(".".join(parts[:i])) for i in range(1, len(parts) + 1)):
                picked.add(by_id[id(p)])
        if not picked:
            modules = sorted({r.rsplit(".", 1)[0] for r in rel_names})
            raise ParamPatternError(
                f"LocalizedTuning: `module_pattern` {self.module_pattern!r} matched no parameter of decoder layer "
                f"{self.layer_index}. It is matched (fnmatch, or 're:' regex fullmatch) against names relative to the "
                f"layer; the layer's modules are {modules}."
            )
        return [name for name in by_id.values() if name in picked]

    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ParamPlan:
        if self.tracks_loss and not pl_module.automatic_optimization:
            raise ValueError(
                "LocalizedTuning: skip_below / stop_below read the loss of automatic optimization; with manual "
                "optimization set skip_below=0 and stop_below=None (the parameter selection still applies)."
            )
        names = self.select_names(pl_module)
        what = f"layer={self.layer} (index {self.layer_index}), module_pattern={self.module_pattern!r}"
        plan = self.plan_selection(
            pl_module, names, "LocalizedTuning", what,
            hint="under PEFT choose a module that carries an adapter (e.g. module_pattern='self_attn.q_proj' with "
            "LoraConfig(target_modules=['q_proj', ...])) or add the module to target_modules.",
        )
        rank_zero_info(
            f"LocalizedTuning({what}): training {self.selected_names}, {self.selected_numel:,} of {self.total_numel:,} elements "
            f"({100 * self.selected_fraction:.3f}%)"
        )
        return plan

    # -- skip / stop ------------------------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.tracks_loss:
            return
        value = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 AMP hands the hook the scaled loss
            value = value / scaler.get_scale()
        value = value * trainer.accumulate_grad_batches  # Lightning divided the training_step loss by it
        self._window_sum = value if self._window_sum is None else self._window_sum.to(value.device) + value
        self._window_count += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if not self.tracks_loss or self._window_count == 0:
            return
        mean = self._window_sum / self._window_count
        self._window_sum, self._window_count = None, 0
        # one value on every rank: the skip and stop decisions must agree, or DDP replicas diverge
        value = float(trainer.strategy.reduce(mean, reduce_op="mean"))
        if trainer.current_epoch != self._epoch:
            self._epoch, self._epoch_loss_sum, self._epoch_steps = trainer.current_epoch, 0.0, 0
        self._epoch_loss_sum += value
        self._epoch_steps += 1
        self.optimizer_steps += 1
        self.last_loss = value
        self.last_skipped = value < self.skip_below
        if self.last_skipped:
            # grad None: torch optimizers skip the tensor entirely (no weight decay, no moments, no step count)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            for p in pl_module.parameters():
                p.grad = None
            self.skipped_steps += 1
        self._decided = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._decided:
            return
        self._decided = False
        prefix = f"lit_ft/{self.technique_name}"
        for name, value in (
            ("batch_loss", self.last_loss),
            ("skipped", float(self.last_skipped)),
            ("skipped_steps", float(self.skipped_steps)),
        ):
            pl_module.log(f"{prefix}/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch != trainer.current_epoch or self._epoch_steps == 0:
            return
        epoch_loss = self._epoch_loss_sum / self._epoch_steps
        pl_module.log(f"lit_ft/{self.technique_name}/epoch_loss", epoch_loss, on_step=False, on_epoch=True, batch_size=1)
        self._maybe_stop(trainer, epoch_loss)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming from a checkpoint written after an epoch's last step but before its end hooks (ModelCheckpoint
        # every_n_train_steps), Lightning goes straight to the next epoch without calling on_train_epoch_end for
        # the finished one; take the stop decision the uninterrupted run took there.
        if 0 <= self._epoch < trainer.current_epoch and self._epoch_steps > 0:
            self._maybe_stop(trainer, self._epoch_loss_sum / self._epoch_steps)

    def _maybe_stop(self, trainer: pl.Trainer, epoch_loss: float) -> None:
        if self.stop_below is not None and epoch_loss < self.stop_below:
            trainer.should_stop = True
            self.stopped_early = True
            rank_zero_info(
                f"LocalizedTuning: epoch {self._epoch} average loss {epoch_loss:.4g} < stop_below="
                f"{self.stop_below:g}; stopping ({self.skipped_steps} of {self.optimizer_steps} steps skipped)."
            )

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "optimizer_steps": self.optimizer_steps,
            "last_loss": self.last_loss,
            "stopped_early": self.stopped_early,
            "epoch": self._epoch,
            "epoch_loss_sum": self._epoch_loss_sum,
            "epoch_steps": self._epoch_steps,
            "window_sum": None if self._window_sum is None else float(self._window_sum),
            "window_count": self._window_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.last_loss = state_dict.get("last_loss")
        self.stopped_early = bool(state_dict.get("stopped_early", False))
        self._epoch = int(state_dict.get("epoch", -1))
        self._epoch_loss_sum = float(state_dict.get("epoch_loss_sum", 0.0))
        self._epoch_steps = int(state_dict.get("epoch_steps", 0))
        ws = state_dict.get("window_sum")
        self._window_sum = None if ws is None else torch.tensor(ws)
        self._window_count = int(state_dict.get("window_count", 0))
