"""One decoder layer's attention probabilities, recomputed eagerly from the layer's captured input.

Techniques that score tokens by attention (SSToken: the mass each response query puts on the prompt; LeMo token
elimination: the attention each token receives) read a decoder layer's input with a forward pre-hook
(:mod:`lit_ft.core.layer_hooks`) and recompute that layer's probabilities here, outside the model's forward and
without ``output_attentions=True`` (which would materialise every layer's ``[B, H, T, T]`` map and switch the model
to eager attention). Only the norm and the query/key projections run; queries are processed in blocks of at most
:data:`ATTN_BLOCK_ELEMENTS` logits, so the full map is never stored.

Supported layout: Llama-style ``input_layernorm`` + ``self_attn`` with ``q_proj``, ``k_proj``, ``head_dim``,
``scaling`` and full rotary position embeddings (Llama, Mistral, Qwen2, SmolLM2; Qwen3's per-head ``q_norm`` /
``k_norm`` is applied). :func:`check_attention_layout` refuses the rest with a message naming what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lit_ft.core.introspect import ModelLayoutError

__all__ = ["ATTN_BLOCK_ELEMENTS", "check_attention_layout", "attention_blocks", "attention_mass_on_keys",
           "attention_received"]

#: elements of one ``[B, H, chunk, T]`` float32 logit block (64 MiB)
ATTN_BLOCK_ELEMENTS = 1 << 24


def check_attention_layout(layer: torch.nn.Module, who: str = "the attention score", hint: str = "") -> None:
    """Raise :class:`~lit_ft.core.introspect.ModelLayoutError` unless ``layer``'s attention can be recomputed here.

    ``who`` names the technique in the message and ``hint`` says how to do without the score (e.g. "set gamma=1.0")."""
    name = type(layer).__name__
    tail = f"; {hint}." if hint else "."
    attn = getattr(layer, "self_attn", None)
    missing = [a for a in ("input_layernorm", "self_attn") if not isinstance(getattr(layer, a, None), torch.nn.Module)]
    if attn is not None:
        missing += [f"self_attn.{a}" for a in ("q_proj", "k_proj") if not isinstance(getattr(attn, a, None), torch.nn.Module)]
        missing += [f"self_attn.{a}" for a in ("head_dim", "scaling") if getattr(attn, a, None) is None]
    if missing:
        raise ModelLayoutError(
            f"{who}: the attention score needs a Llama-style decoder layer (input_layernorm, self_attn.q_proj/"
            f"k_proj/head_dim/scaling, rotary position embeddings); {name} lacks {missing}{tail}"
        )
    cfg = getattr(attn, "config", None)
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ModelLayoutError(
            f"{who}: {name} uses attention logit soft-capping, which the attention score does not reproduce{tail}"
        )
    for norm in ("q_norm", "k_norm"):
        m = getattr(attn, norm, None)
        w = getattr(m, "weight", None)
        if m is not None and (w is None or w.shape[-1] != attn.head_dim):
            raise ModelLayoutError(
                f"{who}: {name}.self_attn.{norm} normalises the whole projection (OLMo-2 style), which the "
                f"attention score does not reproduce (only per-head norms, Qwen3 style){tail}"
            )


def _sliding_window(layer: torch.nn.Module) -> int | None:
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):  # Qwen2/Qwen3: set per layer, None when the layer attends globally
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)  # Mistral: one window for all layers


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's half rotation (transformers' ``rotate_half``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def attention_blocks(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    who: str = "the attention score",
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, end, probs, allowed)`` over blocks of query rows of one decoder layer's attention.

    ``input_layernorm`` → ``q_proj``/``k_proj`` (→ per-head ``q_norm``/``k_norm``) → rotary embedding with the
    captured ``(cos, sin)`` → GQA repeat → ``q·kᵀ·scaling`` → causal (+ padding, + sliding-window) mask → softmax in
    float32. ``probs``: float32 ``[B, H, end-start, T]``; ``allowed``: bool ``[B, 1, end-start, T]``, the keys each
    query may attend (a query that may attend none has an all-False row and meaningless ``probs``).

    Args:
        layer: a Llama-style decoder layer (see :func:`check_attention_layout`).
        hidden_states: the layer's input ``[B, T, D]`` (before ``input_layernorm``).
        position_embeddings: the ``(cos, sin)`` the model passed to the layer, each ``[B or 1, T, head_dim]``.
        attention_mask: ``[B, T]`` with 1 for attended (non-padding) positions; ``None`` = all attended.
        who: the technique, for error messages.
    """
    attn = layer.self_attn
    B, T, _ = hidden_states.shape
    hd = int(attn.head_dim)
    dev = hidden_states.device
    wdtype = attn.q_proj.weight.dtype
    with torch.autocast(dev.type, enabled=False):
        h = layer.input_layernorm(hidden_states.to(wdtype))
        q = attn.q_proj(h).view(B, T, -1, hd)
        k = attn.k_proj(h).view(B, T, -1, hd)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        q = q.transpose(1, 2).float()
        k = k.transpose(1, 2).float()
        cos, sin = (t.to(dev, torch.float32).unsqueeze(1) for t in position_embeddings)
        if cos.shape[-1] != hd:
            raise ModelLayoutError(
                f"{who}: rotary embedding of size {cos.shape[-1]} but head_dim {hd} (partial rotary is not supported)"
            )
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_heads, n_kv = q.shape[1], k.shape[1]
        if n_heads % n_kv:
            raise ModelLayoutError(f"{who}: {n_heads} query heads are not a multiple of {n_kv} key/value heads")
        k = k.repeat_interleave(n_heads // n_kv, dim=1)  # == transformers' repeat_kv

        pos = torch.arange(T, device=dev)
        causal = pos[None, :] <= pos[:, None]  # [Tq, Tk]
        window = _sliding_window(layer)
        if window:
            causal &= (pos[:, None] - pos[None, :]) < int(window)
        keys_ok = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        chunk = max(1, ATTN_BLOCK_ELEMENTS // max(1, B * n_heads * T))
        neg = torch.finfo(torch.float32).min
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            ok = causal[None, None, s:e, :] & keys_ok[:, None, None, :]  # [B, 1, c, T]
            logits = torch.matmul(q[:, :, s:e], k.transpose(-1, -2)) * float(attn.scaling)
            yield s, e, torch.softmax(logits.masked_fill(~ok, neg), dim=-1), ok


@torch.no_grad()
def attention_mass_on_keys(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    who: str = "the attention score",
) -> torch.Tensor:
    """Attention mass that each query puts on a set of keys, averaged over heads (SSToken: the prompt keys).

    Returns float32 ``[B, T]``: ``out[b, i] = mean_h Σ_{j ∈ key_mask[b]} softmax_j(q_{b,h,i}·k_{b,h,j})``, row ``i``
    being the query at input position ``i``; 0 for a query that may attend to no key (e.g. left padding).
    """
    B, T = hidden_states.shape[:2]
    dev = hidden_states.device
    keys_ok = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.to(dev).bool()
    key_mask = key_mask.to(dev).bool() & keys_ok
    out = torch.zeros(B, T, dtype=torch.float32, device=dev)
    for s, e, probs, ok in attention_blocks(layer, hidden_states, position_embeddings, attention_mask, who):
        mass = (probs * key_mask[:, None, None, :]).sum(-1).mean(1)  # [B, c]
        out[:, s:e] = mass * ok.any(-1).squeeze(1)
    return out


@torch.no_grad()
def attention_received(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    normalize: bool = True,
    who: str = "the attention score",
) -> torch.Tensor:
    """The attention each token receives as a key, averaged over heads.

    ``sum[b, j] = mean_h Σ_i softmax_j(q_{b,h,i}·k_{b,h,j})`` over the (non-padding) queries ``i`` allowed to attend
    ``j``. With ``normalize`` (default) it is divided by the number of those queries: under a causal mask early
    tokens are attended by more queries, so the raw sum favours them by position alone. Returns float32 ``[B, T]``;
    0 at padding keys.
    """
    B, T = hidden_states.shape[:2]
    dev = hidden_states.device
    total = torch.zeros(B, T, dtype=torch.float32, device=dev)
    count = torch.zeros(B, T, dtype=torch.float32, device=dev)
    q_ok = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.to(dev).bool()
    for s, e, probs, ok in attention_blocks(layer, hidden_states, position_embeddings, attention_mask, who):
        ok = ok & q_ok[:, None, s:e, None]  # padding queries do not vote
        total += (probs * ok).sum(2).mean(1)
        count += ok.sum(2).squeeze(1)
    return total / count.clamp_min(1) if normalize else total
