"""Fused ops (no Lightning imports). Importing this package never imports triton.

- :func:`fused_linear_token_ce` / :class:`TokenCEOutput`: lm_head + per-token weighted cross-entropy without
  materialising ``[N, V]`` logits (see ``docs/kernels/token_ce.md``).
- :func:`prompt_embed`: frozen embedding gather + position-indexed low-rank update (DePT), no batch repeat
  (``docs/kernels/prompt_embed.md``).
- :func:`rational` / :func:`gelu_coefficients`: the safe Padé activation unit (IAPT, ``docs/kernels/rational.md``).

``prompt_embed`` and ``rational`` share their names with their sub-packages, so they are imported here eagerly
(cheap, torch only): a lazy ``__getattr__`` would be shadowed by the sub-package once anyone imported it directly.
"""

from .token_ce import TokenCEOutput, fused_linear_token_ce
from .prompt_embed import prompt_embed  # noqa: E402  (binds the function over the sub-package attribute)
from .rational import gelu_coefficients, rational  # noqa: E402

__all__ = ["fused_linear_token_ce", "TokenCEOutput", "prompt_embed", "rational", "gelu_coefficients"]
