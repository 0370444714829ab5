"""ApproximatedPrompt (APT): prompt tuning approximated by a per-layer memory read with ReLU scores, added to each
attention block's output; the sequence does not get longer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._adapter import AdapterCallback, hidden_size_of
from lit_ft.core.adapters import Adapter, AdapterError, AdapterSet, resolve_targets
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_choice, check_int, check_number, check_str_list

#: ``"apt"``: the authors' init (outputs move at step 0); ``"zero_gate"``: a zero-initialised gate on the prompt term
INITS = ("apt", "zero_gate")


class ApproximatedPromptAdapter(Adapter):
    """One attention block's approximated prompt: memory ``P`` ``[k, d]``, keys ``M = P + (P A) B`` (``A`` ``[d, r]``,
    ``B`` ``[r, d]``), scores ``S = ReLU(x Mᵀ)`` from the block's input ``x``, ``e = S P``, ``w = max_j S``
    (detached), output ``(y + g · w ⊙ e) · exp(γ)`` with ``y`` the attention output. ``g`` is 1 (``init="apt"``) or a
    trained gate that starts at 0 (``init="zero_gate"``). Each token's term depends on that token's ``x`` only.

    Not mergeable: ``w ⊙ e`` is a non-linear function of the input, not a linear map of ``y``."""

    mergeable = False

    def __init__(self, width: int, num_prompts: int = 200, rank: int = 4, prompt_init_std: float = 0.02,
                 key_init_std: float = 1.0, init: str = "apt") -> None:
        super().__init__()
        self.width, self.num_prompts, self.rank = int(width), int(num_prompts), int(rank)
        self.prompt_init_std, self.key_init_std, self.init = float(prompt_init_std), float(key_init_std), init
        self.prompts = nn.Parameter(torch.zeros(self.num_prompts, self.width))  # P
        self.key_down = nn.Parameter(torch.zeros(self.width, self.rank))  # A
        self.key_up = nn.Parameter(torch.zeros(self.rank, self.width))  # B
        self.log_scale = nn.Parameter(torch.zeros(1))  # γ
        # only the zero-effect variant has the gate, so the authors' variant carries exactly their tensors
        self.gate = nn.Parameter(torch.zeros(1)) if init == "zero_gate" else None

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """The authors' init (``approximate_prompt`` in their ``bert_model_apt.py``): ``P`` ~ N(0, 0.02²), ``A`` ~
        N(0, 1), ``B`` = 0, ``γ`` = 0; the gate (``"zero_gate"``) = 0."""
        self.prompts.copy_(torch.randn(self.prompts.shape, generator=generator) * self.prompt_init_std)
        self.key_down.copy_(torch.randn(self.key_down.shape, generator=generator) * self.key_init_std)
        self.key_up.zero_()
        self.log_scale.zero_()
        if self.gate is not None:
            self.gate.zero_()

    def memory_keys(self) -> torch.Tensor:
        """``M = P + (P A) B`` ``[k, d]``."""
        return self.prompts + (self.prompts @ self.key_down) @ self.key_up

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if x is None or x.shape[-1] != self.width or y.shape[-1] != self.width:
            raise AdapterError(
                f"ApproximatedPrompt: the target must take and return hidden states of width {self.width} (an "
                f"attention module), got input {None if x is None else tuple(x.shape)} and output {tuple(y.shape)}")
        p = self.prompts
        s = torch.relu(x.to(p.dtype) @ self.memory_keys().T)  # [..., T, k]: token t's scores use x[t] only
        e = s @ p  # [..., T, d]
        w = s.amax(dim=-1, keepdim=True).detach()  # the authors detach the weight
        term = w * e if self.gate is None else self.gate * (w * e)
        out = (y.to(p.dtype) + term) * self.log_scale.exp()
        return out.to(y.dtype)

    def artifact_config(self) -> dict:
        return {"width": self.width, "num_prompts": self.num_prompts, "rank": self.rank,
                "prompt_init_std": self.prompt_init_std, "key_init_std": self.key_init_std, "init": self.init}


@technique(name="approximated_prompt", family="adapters",
           paper="Approximated Prompt Tuning for Vision-Language Pre-trained Models", arxiv="2306.15706")
class ApproximatedPrompt(AdapterCallback):
    """APT: each attention block reads a trainable prompt memory with ReLU scores and adds the result to its output,
    approximating deep prompt tuning without lengthening the sequence.

    Paper: Wu et al., *Approximated Prompt Tuning for Vision-Language Pre-trained Models* (arXiv 2306.15706); authors'
    code ``DoubtedSteam/APT`` (``METER/meter/modules/bert_model_apt.py``, ``approximate_prompt``). Deep prompt tuning
    lets every token attend to ``k`` prompt tokens per layer (cost ``O((N + k)² d)``); APT replaces the prompt
    tokens' softmax share by an independent ReLU "diffusion" of the prompts into each token (cost ``O(N k d)``). The
    authors insert it after the attention output projection, before dropout, residual and LayerNorm; here it runs on
    the decoder layer's attention module (its input = the block's normalised hidden states, its output = after the
    output projection, before the residual). The backbone is frozen; ``P``, ``A``, ``B``, ``γ`` train.

    Algorithm, per attention block with input ``x`` ``[N, d]`` and output ``y``: ``M = P + (P A) B``;
    ``S = ReLU(x Mᵀ)`` ``[N, k]`` (no softmax, no scaling); ``e = S P``; ``w = max_j S`` (detached);
    ``y' = (y + w ⊙ e) · exp(γ)``. Init (authors): ``P`` ~ N(0, 0.02²), ``A`` ~ N(0, 1) with rank 4, ``B = 0``,
    ``γ = 0``. In a decoder the term for token ``t`` uses ``x[t]`` only, so it is causal and works with the KV cache.
    Not mergeable (the term depends non-linearly on the input): :meth:`merge` refuses.

    Args:
        num_prompts: prompt memory size ``k`` per layer (the authors: 200 in METER's text layers, 50 in ViLT; 200
            by default, see the doc page).
        rank: rank ``r`` of the memory-key update ``(P A) B`` (the authors: 4).
        targets: where, in every decoder layer: the ``"attention"`` role (default) or the path of a module that
            takes and returns hidden states (its input is ``x``, its output ``y``).
        init: ``"apt"`` (the authors' init: the model's outputs move at step 0 since ``w ⊙ e ≠ 0``) or
            ``"zero_gate"`` (a trained scalar gate per layer multiplies ``w ⊙ e`` and starts at 0: outputs unchanged
            at step 0; not in the paper).
        prompt_init_std: std of ``P``'s normal init (the authors: 0.02); must be > 0 (``P = 0`` would leave the
            outputs unchanged but no APT tensor would ever get a gradient).
        key_init_std: std of ``A``'s normal init (the authors: 1.0).
        seed: seed of the initialisation.
        freeze_backbone: freeze every model tensor except the prompt memories (and the task head, see
            ``train_task_head``).
        learning_rate: the APT tensors' lr (own param group); ``None`` = the optimizer's.
        weight_decay: the APT tensors' weight decay; ``None`` = the optimizer's.
        save_dir: write ``adapters.safetensors`` + ``adapter_config.json`` here when fit ends (relative = under
            ``trainer.default_root_dir``); :func:`lit_ft.core.adapters.load_adapters` attaches them to a model.
        train_task_head: a sequence-classification model's head trains with the prompts (the authors train the
            task head too).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "approximated_prompt"

    def __init__(self, num_prompts: int = 200, rank: int = 4, targets: list[str] | None = None, init: str = "apt",
                 prompt_init_std: float = 0.02, key_init_std: float = 1.0, seed: int = 0,
                 freeze_backbone: bool = True, learning_rate: float | None = None, weight_decay: float | None = None,
                 save_dir: str | None = None, train_task_head: bool = True, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, train_task_head, picture_every_n_steps)
        owner = type(self).__name__
        self.num_prompts = check_int(owner, "num_prompts", num_prompts, 1)
        self.rank = check_int(owner, "rank", rank, 1)
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or ["attention"]
        self.init = check_choice(owner, "init", init, INITS)
        self.prompt_init_std = check_number(owner, "prompt_init_std", prompt_init_std, low=0)
        if self.prompt_init_std == 0:
            # P = 0 leaves the outputs unchanged but is a dead point: S = ReLU(0) = 0 passes no gradient to P, A, B
            raise ValueError(f"{owner}: `prompt_init_std` must be > 0, got {prompt_init_std!r}: with P = 0 no APT "
                             "tensor ever gets a gradient; for outputs unchanged at step 0 use init='zero_gate'")
        self.key_init_std = check_number(owner, "key_init_std", key_init_std, low=0)
        self.seed = check_int(owner, "seed", seed, 0)

    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module) -> AdapterSet:
        g = torch.Generator().manual_seed(self.seed)
        width = hidden_size_of(hf_model)
        adapters = {}
        for target in resolve_targets(hf_model, self.targets, type(self).__name__):
            a = ApproximatedPromptAdapter(width, self.num_prompts, self.rank, self.prompt_init_std,
                                          self.key_init_std, self.init)
            a.reset(g)
            adapters[target] = a
        return AdapterSet(adapters)

    def merge(self) -> None:
        """Refused: APT's added term ``w ⊙ ReLU(x Mᵀ) P`` depends on each token's input, so no weight change
        reproduces it. Keep the hooks, or save the artifact and attach it with ``load_adapters``."""
        raise AdapterError("ApproximatedPrompt cannot be merged into the base weights: its added term "
                           "max_j(S)·ReLU(x Mᵀ)·P depends non-linearly on each token's input; keep the adapters "
                           "attached (or save them with save_dir and attach them with load_adapters)")
