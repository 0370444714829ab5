"""Fused ops (no Lightning imports). Importing this package never imports triton.

- :func:`fused_linear_token_ce` / :class:`TokenCEOutput`: lm_head + per-token weighted cross-entropy without
  materialising ``[N, V]`` logits (see ``docs/kernels/token_ce.md``).
"""

from .token_ce import TokenCEOutput, fused_linear_token_ce

__all__ = ["fused_linear_token_ce", "TokenCEOutput"]
