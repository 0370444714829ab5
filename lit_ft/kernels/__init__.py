"""Fused ops (no Lightning imports). Importing this package never imports triton.

- :func:`fused_linear_token_ce` / :class:`TokenCEOutput`: lm_head + per-token weighted cross-entropy without
  materialising ``[N, V]`` logits (see ``docs/kernels/token_ce.md``).
- :func:`prompt_embed`: frozen embedding gather + position-indexed low-rank update (DePT), no batch repeat
  (``docs/kernels/prompt_embed.md``).
- :func:`rational` / :func:`gelu_coefficients`: the safe Padé activation unit (IAPT, ``docs/kernels/rational.md``).
- :func:`chunked_linear_loss`: the fused-linear base for objectives over vocabulary-wide logits (distillation,
  multi-token heads, token-level DPO): a per-chunk function of ``[c, V]`` logits, never ``[N, V]``
  (``docs/kernels/chunked_linear.md``). Imported on first use (its name differs from its sub-package's).
- :func:`gather_rows` / :func:`merge_rows`: the kept tokens' rows of ``[B, T, D]`` hidden states and their merge
  back into the residual stream (layer-wise token elimination, LeMo); backward saves only the index
  (``docs/kernels/token_rows.md``). Imported on first use, like ``chunked_linear_loss``.

``prompt_embed`` and ``rational`` share their names with their sub-packages, so they are imported here eagerly
(cheap, torch only): a lazy ``__getattr__`` would be shadowed by the sub-package once anyone imported it directly.
"""

from .token_ce import TokenCEOutput, fused_linear_token_ce
from .prompt_embed import prompt_embed  # noqa: E402  (binds the function over the sub-package attribute)
from .rational import gelu_coefficients, rational  # noqa: E402

__all__ = ["fused_linear_token_ce", "TokenCEOutput", "prompt_embed", "rational", "gelu_coefficients",
           "chunked_linear_loss", "gather_rows", "merge_rows"]


def __getattr__(name: str):
    if name == "chunked_linear_loss":
        from .chunked_linear import chunked_linear_loss

        return chunked_linear_loss
    if name in ("gather_rows", "merge_rows"):
        from . import token_rows

        return getattr(token_rows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
