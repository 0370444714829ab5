"""IAPT: Instruction-Aware Prompt Tuning (Zhu et al., ACL 2024) — per-layer prefixes generated from the instruction."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.core.registry import technique
from lit_ft.core.introspect import ModelLayoutError, find_decoder_layers
from lit_ft.core.layer_hooks import ORDER_PREFIX, register_layer_pre_hook
from lit_ft.core.prompts import ModelGeometry, PromptError, PromptInjector, PromptInputs, PromptSource
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number
from lit_ft.kernels.rational import gelu_coefficients, rational

PREFIX_MODES = ("kv", "hidden")
POOLINGS = ("hidden", "bottleneck")
RATIONAL_IMPLS = ("auto", "torch", "triton")
IGNORE_INDEX = -100
#: context key a callback / user sets with ``injector.set_context(instruction_mask=...)`` (bool ``[B, T]``)
CONTEXT_KEY = "instruction_mask"


# ------------------------------------------------------------------------------------------------------------------
# The learned rational activation (PAU "safe" form, degrees (5, 4))
# ------------------------------------------------------------------------------------------------------------------
def rational_activation(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
                        impl: str = "auto") -> torch.Tensor:
    """``R(x) = P(x) / (1 + |S(x)|)``, ``P = sum_j a_j x^j`` (``numerator`` = ``[a_0..a_5]``), ``S = sum_k b_k x^k``
    (``denominator`` = ``[b_1..b_4]``): the fused op ``lit_ft.kernels.rational.rational``."""
    return rational(x, numerator, denominator, impl=impl)


def gelu_init() -> tuple[torch.Tensor, torch.Tensor]:
    """Rational coefficients ``(numerator [6], denominator [4])`` approximating GELU (the kernel's
    ``gelu_coefficients``), float32."""
    num, den = gelu_coefficients()
    return torch.as_tensor(num, dtype=torch.float32).clone(), torch.as_tensor(den, dtype=torch.float32).clone()


# ------------------------------------------------------------------------------------------------------------------
# The prompt source
# ------------------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class InstructionPromptGenerator(PromptSource):
    """IAPT's prompt generators: for decoder layer ``l``, ``n`` prefix tokens computed from that layer's input hidden
    states ``H_l`` over the instruction tokens (``kind = "prefix"``).

    Per layer (``g`` = the generator tensors of layer ``l``, or the shared ones with ``share_generator``)::

        X   = rms(H_l) if input_norm else H_l                       # [B, T, D], no learned gain
        a   = softmax_t(X q_g^T / sqrt(D)) over instruction tokens   # [B, n, T], one query per soft token
        z   = a X W_down^T + b_down                                 # [B, n, r]   (pooling = "hidden")
              (pooling = "bottleneck": X is down-projected first, queries act in r space; same z when a is)
        u   = R_l(z)                                                # rational activation, per layer
        p   = u W_up^T + b_up                                       # [B, n, 2 kv] or [B, n, D]

    ``prefix_mode = "kv"``: ``p`` is split into the layer's prefix keys and values (P-tuning v2 style: no RoPE, not
    through the layer's projections). ``"hidden"``: ``p`` are hidden-size tokens placed before the input of layer
    ``l`` only (deep prompt tuning): keys ``= RoPE(k_proj(norm(p)))`` at positions ``0..n-1`` and values
    ``= v_proj(norm(p))`` with the layer's own (frozen) input norm and projections — exactly what the layer would
    compute for ``n`` extra tokens at its input whose outputs are dropped.

    Rows without any instruction token pool to a zero vector (``z = b_down``; the prefix is then a learned constant),
    never NaN. Mechanics: :meth:`prefix_key_values` hands the injector zero placeholders (so the cache already holds
    ``n`` prefix slots when the trunk builds its attention mask); a forward pre-hook on each decoder layer replaces
    that layer's placeholders with the generated prefix during the prefill; decode steps reuse the cache.
    """

    kind = "prefix"

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 4, bottleneck: int = 32,
                 share_generator: bool = True, prefix_mode: str = "kv", pooling: str = "hidden",
                 input_norm: bool = True, rational_impl: str = "auto") -> None:
        super().__init__(geometry, num_virtual_tokens)
        owner = type(self).__name__
        self.bottleneck = check_int(owner, "bottleneck", bottleneck, minimum=1, error=PromptError)
        check_bool(owner, "share_generator", share_generator, error=PromptError)
        check_choice(owner, "prefix_mode", prefix_mode, PREFIX_MODES, error=PromptError)
        check_choice(owner, "pooling", pooling, POOLINGS, error=PromptError)
        check_bool(owner, "input_norm", input_norm, error=PromptError)
        check_choice(owner, "rational_impl", rational_impl, RATIONAL_IMPLS, error=PromptError)
        self.share_generator = share_generator
        self.prefix_mode = prefix_mode
        self.pooling = pooling
        self.input_norm = input_norm
        self.rational_impl = rational_impl
        D, r, n, L = geometry.hidden_size, bottleneck, num_virtual_tokens, geometry.num_layers
        G = 1 if share_generator else L
        out = 2 * geometry.kv_dim if prefix_mode == "kv" else D
        q_dim = D if pooling == "hidden" else r
        self.query = nn.Parameter(torch.zeros(G, n, q_dim))
        self.down_weight = nn.Parameter(torch.zeros(G, r, D))
        self.down_bias = nn.Parameter(torch.zeros(G, r))
        self.up_weight = nn.Parameter(torch.zeros(G, out, r))
        self.up_bias = nn.Parameter(torch.zeros(G, out))
        num, den = gelu_init()
        self.numerator = nn.Parameter(num.expand(L, -1).clone())
        self.denominator = nn.Parameter(den.expand(L, -1).clone())
        self._handles: list[Any] = []
        self._layers: list[nn.Module] = []
        self._injector: PromptInjector | None = None

    # -- initialisation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, query_std: float = 1.0, up_std: float = 0.0, seed: int = 0) -> None:
        """Queries ~ N(0, query_std^2) (distinct per soft token: with equal queries the tokens would stay equal),
        ``W_down`` ~ N(0, 1/D), ``W_up`` ~ N(0, up_std^2) (0 = zeros: every prefix key and value is 0 at step 0),
        biases 0, rational coefficients = the GELU fit."""
        g = torch.Generator().manual_seed(int(seed))
        D = self.geometry.hidden_size
        self.query.copy_(torch.randn(self.query.shape, generator=g) * query_std)
        self.down_weight.copy_(torch.randn(self.down_weight.shape, generator=g) / math.sqrt(D))
        self.up_weight.copy_(torch.randn(self.up_weight.shape, generator=g) * up_std if up_std else 0.0)
        self.down_bias.zero_()
        self.up_bias.zero_()
        num, den = gelu_init()
        self.numerator.copy_(num.expand_as(self.numerator))
        self.denominator.copy_(den.expand_as(self.denominator))

    # -- the math ----------------------------------------------------------------------------------------------
    def generator_index(self, layer: int) -> int:
        return 0 if self.share_generator else layer

    def generate(self, layer: int, hidden: torch.Tensor, instruction_mask: torch.Tensor) -> torch.Tensor:
        """``p`` ``[B, n, 2 kv]`` (kv mode) or ``[B, n, D]`` (hidden mode) for decoder layer ``layer`` from its input
        hidden states ``hidden`` ``[B, T, D]`` and the bool ``instruction_mask`` ``[B, T]``."""
        g = self.generator_index(layer)
        dtype = self.query.dtype
        x = hidden.to(dtype)
        if self.input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        w_down, b_down = self.down_weight[g], self.down_bias[g]
        if self.pooling == "bottleneck":
            x = x @ w_down.T  # bias after pooling (the pooling weights sum to 1): empty rows still give b_down
        mask = instruction_mask.to(device=x.device, dtype=torch.bool)
        has = mask.any(dim=-1)  # [B]
        safe = mask | ~has[:, None]  # empty rows: any finite softmax, zeroed below
        logits = torch.einsum("btd,nd->bnt", x, self.query[g]) / math.sqrt(x.shape[-1])
        logits = logits.masked_fill(~safe[:, None, :], float("-inf"))
        attn = torch.softmax(logits, dim=-1) * has[:, None, None].to(dtype)
        pooled = attn @ x  # [B, n, D or r]
        z = (pooled @ w_down.T if self.pooling == "hidden" else pooled) + b_down
        u = rational_activation(z, self.numerator[layer], self.denominator[layer], impl=self.rational_impl)
        return u @ self.up_weight[g].T + self.up_bias[g]

    def layer_prefix(self, layer: int, hidden: torch.Tensor, instruction_mask: torch.Tensor,
                     decoder_layer: nn.Module | None = None, rotary: nn.Module | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix ``(keys, values)`` ``[B, H_kv, n, d_h]`` of decoder layer ``layer`` (``decoder_layer`` and the
        trunk's ``rotary`` embedding are needed for ``prefix_mode = "hidden"``)."""
        g = self.geometry
        p = self.generate(layer, hidden, instruction_mask)
        B, n = p.shape[0], self.num_virtual_tokens
        if self.prefix_mode == "kv":
            kv = p.view(B, n, 2, g.num_kv_heads, g.head_dim)
            return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if decoder_layer is None or rotary is None:
            raise PromptError("InstructionPromptGenerator: prefix_mode='hidden' needs the decoder layer and the rotary "
                              "embedding (install the source with a PromptInjector)")
        attn = decoder_layer.self_attn
        w = decoder_layer.input_layernorm.weight
        x = decoder_layer.input_layernorm(p.to(w.dtype))
        k = attn.k_proj(x).view(B, n, g.num_kv_heads, g.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, n, g.num_kv_heads, g.head_dim).transpose(1, 2)
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None:
            k = k_norm(k)
        pos = torch.arange(n, device=p.device)[None]
        cos, sin = rotary(v, position_ids=pos)
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        return k, v

    def instruction_mask(self, inputs: PromptInputs) -> torch.Tensor:
        """The context's ``instruction_mask`` (AND the padding mask), else every non-padding token."""
        attn = inputs.attention_mask.bool()
        mask = inputs.context.get(CONTEXT_KEY)
        if mask is None:
            return attn
        if tuple(mask.shape) != tuple(attn.shape):
            raise PromptError(
                f"IAPT: the instruction_mask handed to the injector is {tuple(mask.shape)} but the input is "
                f"{tuple(attn.shape)} [batch, seq]; set it (injector.set_context(instruction_mask=...)) right before "
                "the forward it belongs to"
            )
        return mask.to(device=attn.device, dtype=torch.bool) & attn

    # -- PromptSource API ------------------------------------------------------------------------------------------
    def prefix_key_values(self, inputs: PromptInputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.geometry
        e = inputs.inputs_embeds
        z = torch.zeros(1, g.num_kv_heads, self.num_virtual_tokens, g.head_dim, device=e.device, dtype=e.dtype)
        return [(z, z) for _ in range(g.num_layers)]

    def on_install(self, injector: PromptInjector) -> None:
        self.on_remove(injector)
        layers = check_layers(injector.hf_model, self.geometry, self.prefix_mode, type(self).__name__)
        self._injector = injector
        self._layers = list(layers)
        # a per-layer prefix maker: before readers of the layer input and token eliminators (lit_ft.core.layer_hooks)
        self._handles = [register_layer_pre_hook(injector.hf_model, self._layer_hook, order=ORDER_PREFIX)]

    def on_remove(self, injector: PromptInjector) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._layers, self._injector = [], [], None

    def artifact_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "bottleneck": self.bottleneck,
                "share_generator": self.share_generator, "prefix_mode": self.prefix_mode, "pooling": self.pooling,
                "input_norm": self.input_norm}

    # -- the per-layer hook ------------------------------------------------------------------------------------
    def _layer_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inj = self._injector
        if inj is None or inj.source is not self:
            return None
        inputs = inj.prefill_inputs
        if inputs is None:
            return None  # decode step (the cache already holds this request's prefix) or prompt disabled
        if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
            raise PromptError(
                "IAPT: gradient checkpointing drops the attention cache inside the decoder layers, so a prefix "
                "prompt would be ignored; turn gradient checkpointing off for prefix-based prompt techniques"
            )
        hidden = args[0] if args else kwargs.get("hidden_states")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if hidden is None or cache is None:
            raise PromptError(f"IAPT: decoder layer {index} was called without hidden states or an attention cache; "
                              "this model's layer signature is not supported")
        layers = getattr(cache, "layers", None)
        slot = layers[index] if layers is not None and index < len(layers) else None
        keys = getattr(slot, "keys", None)
        n = self.num_virtual_tokens
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[-2] != n:
            raise PromptError(
                f"IAPT: the attention cache of layer {index} ({type(cache).__name__}) does not hold the {n} prefix "
                "placeholders at prefill; IAPT needs a DynamicCache (the default; no static / offloaded caches)"
            )
        mask = self.instruction_mask(inputs)
        k, v = self.layer_prefix(index, hidden, mask, module, getattr(inj.base, "rotary_emb", None))
        B = keys.shape[0]
        slot.keys = k.expand(B, -1, -1, -1).to(keys.dtype)
        slot.values = v.expand(B, -1, -1, -1).to(slot.values.dtype)
        return None


def check_layers(hf_model: nn.Module, geometry: ModelGeometry, prefix_mode: str, owner: str) -> nn.ModuleList:
    """The decoder layers IAPT hooks, checked (count; for ``prefix_mode="hidden"`` the Llama-style layout)."""
    try:
        layers = find_decoder_layers(hf_model)
    except ModelLayoutError as e:
        raise PromptError(f"{owner}: IAPT generates a prefix per decoder layer, but {e}") from None
    if len(layers) != geometry.num_layers:
        raise PromptError(f"{owner}: found {len(layers)} decoder layers but the config says {geometry.num_layers}")
    if prefix_mode == "hidden":
        from lit_ft.core.introspect import find_base_model

        lay = layers[0]
        attn = getattr(lay, "self_attn", None)
        ok = (hasattr(lay, "input_layernorm") and attn is not None and hasattr(attn, "k_proj")
              and hasattr(attn, "v_proj") and hasattr(find_base_model(hf_model), "rotary_emb"))
        if not ok:
            raise PromptError(
                f"{owner}: prefix_mode='hidden' projects the soft tokens through each layer's input_layernorm, "
                f"self_attn.k_proj / v_proj and the trunk's rotary_emb (Llama-style layout); {type(lay).__name__} "
                "does not have them — use prefix_mode='kv'"
            )
    return layers


# ------------------------------------------------------------------------------------------------------------------
# The callback
# ------------------------------------------------------------------------------------------------------------------
@technique(name="iapt", family="prompt",
           paper="IAPT: Instruction-Aware Prompt Tuning for Large Language Models", arxiv="2405.18203")
class IAPT(PromptCallback):
    """Instruction-Aware Prompt Tuning: every decoder layer gets ``n`` (= 4) prefix tokens generated from the
    instruction's hidden states at that layer; only the small generators train.

    Paper: Zhu, Tian, Yin, Ni, Wang & Xie, *IAPT: Instruction-Aware Prompt Tuning for Large Language Models*
    (ACL 2024). No public code; the unverified details are arguments (see ``docs/techniques/iapt.md``).

    Algorithm, per decoder layer ``l`` with input hidden states ``H_l``: self-attention pooling over the instruction
    tokens with one learned query per soft token (``a = softmax(H_l q)``, pooled ``a H_l``) -> ``W_down`` (D -> r) ->
    learned rational activation ``R_l(x) = P(x) / (1 + |S(x)|)`` (degrees 5/4, GELU-initialised, per layer; the fused
    op ``lit_ft.kernels.rational``) -> ``W_up`` (r -> key + value of each soft token). The prefix enters that layer's
    attention as keys/values (like P-tuning v2), is computed once per request at prefill and reused while decoding.

    Instruction tokens: ``batch["instruction_mask"]`` (bool ``[B, T]``; removed from the batch before the model sees
    it) when the data provides one, else tokens with ``attention_mask == 1`` and ``labels == -100`` (the prompt part of
    SFT data). In ``generate()`` (no labels) every non-padding input token is the instruction; pass another mask with
    ``injector.set_context(instruction_mask=...)`` right before the call. Rows without instruction tokens get the
    generator's constant prefix (zero pooled vector). The instruction must precede the tokens that are predicted,
    else the prefix leaks them.

    Args:
        num_virtual_tokens: soft tokens per layer ``n`` (paper: 4).
        bottleneck: generator bottleneck ``r`` (>= 1).
        share_generator: one pooling / ``W_down`` / ``W_up`` for all layers (default; the rational activation stays
            per layer). ``False``: a generator per layer. The paper's abstract and a third-party summary
            disagree on sharing; shared is lit-ft's default.
        prefix_mode: ``"kv"`` (``W_up`` outputs each soft token's key and value, ``2 * kv_dim``; default) or
            ``"hidden"`` (``W_up`` outputs hidden-size tokens that go through the layer's own input norm, k/v
            projections and RoPE at positions ``0..n-1``; Llama-style layers). How the paper's soft tokens
            enter the layer could not be confirmed; ``"kv"`` is lit-ft's default.
        pooling: ``"hidden"`` (pooling logits and pooling on ``H_l``, then ``W_down``; default) or ``"bottleneck"``
            (``W_down`` first, queries in ``r`` dims). The paper's exact pooling could not be confirmed.
        input_norm: RMS-normalise ``H_l`` (no learned gain) before pooling, so one generator fits every layer's
            scale (default true). lit-ft's choice for stable training, not the paper's.
        query_init_std: std of the pooling queries' normal init (distinct queries keep the soft tokens distinct).
        up_init_std: std of ``W_up``'s normal init; 0 (default) = zeros, so every prefix key and value is 0 at step 0
            (the model is then the frozen backbone up to the attention mass the ``n`` zero keys take).
        rational_impl: implementation of the fused rational op: ``"auto"``, ``"torch"`` or ``"triton"``.
        seed: seed of the initialisation.
        freeze_backbone: freeze every model tensor except the generators (default true).
        learning_rate: the generators' lr (own param group); ``None`` (default) = the optimizer's. IAPT has no
            released code and its learning rate could not be read from the sources lit-ft reached, so no paper
            value is imposed: set it (the generators are small adapter-like networks, usually trained well above a
            full fine-tuning lr).
        weight_decay: the generators' weight decay; ``None`` = the optimizer's.
        save_dir: write ``prompt.safetensors`` + ``prompt_config.json`` here when fit ends.
        tokenizer: unused by IAPT (kept for the common prompt-callback interface).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "iapt"

    def __init__(self, num_virtual_tokens: int = 4, bottleneck: int = 32, share_generator: bool = True,
                 prefix_mode: str = "kv", pooling: str = "hidden", input_norm: bool = True,
                 query_init_std: float = 1.0, up_init_std: float = 0.0, rational_impl: str = "auto", seed: int = 0,
                 freeze_backbone: bool = True, learning_rate: float | None = None,
                 weight_decay: float | None = None, save_dir: str | None = None, tokenizer: str | None = None,
                 picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        self.num_virtual_tokens = check_int("IAPT", "num_virtual_tokens", num_virtual_tokens, minimum=1)
        self.bottleneck = check_int("IAPT", "bottleneck", bottleneck, minimum=1)
        self.share_generator = check_bool("IAPT", "share_generator", share_generator)
        self.input_norm = check_bool("IAPT", "input_norm", input_norm)
        self.prefix_mode = check_choice("IAPT", "prefix_mode", prefix_mode, PREFIX_MODES)
        self.pooling = check_choice("IAPT", "pooling", pooling, POOLINGS)
        self.rational_impl = check_choice("IAPT", "rational_impl", rational_impl, RATIONAL_IMPLS)
        self.query_init_std = check_number("IAPT", "query_init_std", query_init_std, low=0, low_open=True)
        self.up_init_std = check_number("IAPT", "up_init_std", up_init_std, low=0)
        self.seed = check_int("IAPT", "seed", seed)
        self._batch_instruction: torch.Tensor | None = None
        self._warned_empty = False

    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> InstructionPromptGenerator:
        check_layers(hf_model, geometry, self.prefix_mode, "IAPT")
        src = InstructionPromptGenerator(geometry, self.num_virtual_tokens, self.bottleneck, self.share_generator,
                                         self.prefix_mode, self.pooling, self.input_norm, self.rational_impl)
        src.initialise(self.query_init_std, self.up_init_std, self.seed)
        return src

    # -- the instruction mask of each batch -------------------------------------------------------------------------
    def set_instruction(self, batch: Any) -> torch.Tensor | None:
        """Hand this batch's instruction mask to the injector (and remove ``instruction_mask`` from the batch)."""
        if self.injector is None or not isinstance(batch, MutableMapping):
            return None
        mask = batch.pop(CONTEXT_KEY, None)
        ids, attn, labels = batch.get("input_ids"), batch.get("attention_mask"), batch.get("labels")
        if mask is None and isinstance(labels, torch.Tensor) and isinstance(ids, torch.Tensor) \
                and labels.shape == ids.shape:
            mask = labels == IGNORE_INDEX
            if isinstance(attn, torch.Tensor):
                mask = mask & attn.bool()
        if mask is None:
            return None
        mask = torch.as_tensor(mask).bool()
        self.injector.set_context(**{CONTEXT_KEY: mask})
        return mask

    def _on_batch_start(self, batch: Any) -> None:
        mask = self.set_instruction(batch)
        self._batch_instruction = mask
        if mask is not None and mask.dim() == 2 and not bool(mask.any(-1).all()) and not self._warned_empty:
            self._warned_empty = True
            rank_zero_warn("IAPT: some rows have no instruction tokens (no instruction_mask and no labels == -100 "
                           "prompt part); they get the generator's constant prefix")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._on_batch_start(batch)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._on_batch_start(batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._on_batch_start(batch)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._on_batch_start(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        mask = self._batch_instruction
        if mask is not None and mask.dim() == 2:
            pl_module.log("lit_ft/iapt/instruction_tokens", mask.float().sum(-1).mean(), on_step=True,
                          on_epoch=False, batch_size=mask.shape[0])

