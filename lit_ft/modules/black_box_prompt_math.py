"""The math of black-box prompt learning (``BlackBoxPromptLearning``), as pure functions the module and the tests use.

- the prompt: ``L`` positions, each a categorical distribution ``softmax(theta_l)`` over ``K`` candidate strings;
- :func:`sample_prompts`: ``I`` prompts drawn from those distributions (a seeded generator);
- :func:`vr_policy_gradient`: the variance-reduced policy-gradient estimate of ``d E_s[loss(s)] / d theta`` (BDPL's
  VR-PGE, a leave-the-mean-out baseline) from the ``I`` sampled prompts' losses — no gradient of the model;
- :func:`candidate_vocabulary`: the ``K`` candidate strings from the unlabelled texts (PMI-ranked word bigrams, then
  frequent words; phrases in most texts — the template — left out);
- :func:`select_reliable`: the reliable pseudo-labelled examples (the most confident per class);
- :func:`pick_demonstrations`: the in-context demonstrations of one query, balanced over the classes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

__all__ = ["candidate_vocabulary", "exact_expected_gradient", "pick_demonstrations", "sample_prompts",
           "select_reliable", "vr_policy_gradient"]


def sample_prompts(logits: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """``num_samples`` prompts ``[I, L]`` (candidate indices), position ``l`` drawn from ``softmax(logits[l])``
    independently (``logits`` ``[L, K]``)."""
    probs = torch.softmax(logits.detach().double().cpu(), dim=-1)
    # multinomial over rows: [L, I] -> [I, L]
    return torch.multinomial(probs, num_samples, replacement=True, generator=generator).t().contiguous()


def vr_policy_gradient(logits: torch.Tensor, samples: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The variance-reduced policy-gradient estimate ``[L, K]`` of ``d E_{s ~ p_theta}[loss(s)] / d theta``.

    ``g = 1/(I-1) * sum_i (loss_i - mean_j loss_j) * d log p_theta(s_i) / d theta`` with, for the softmax
    parameterisation, ``d log p_theta(s_i) / d theta_l = onehot(s_i,l) - softmax(theta_l)``. Subtracting the mean
    of all ``I`` losses and dividing by ``I - 1`` (not ``I``) keeps the estimate unbiased (the ``1/(I-1)`` factor
    exactly cancels the sample's own share in the mean: ``E[g] = grad E[loss]``), with a much lower variance than
    the plain ``loss_i * score_i`` estimator.

    Args:
        logits: ``theta`` ``[L, K]``.
        samples: the sampled candidate indices ``[I, L]`` (``I >= 2``).
        losses: the loss of each sampled prompt ``[I]``.
    """
    I = samples.shape[0]
    if I < 2:
        raise ValueError(f"vr_policy_gradient needs >= 2 sampled prompts (the baseline leaves one out), got {I}")
    p = torch.softmax(logits.detach().double(), dim=-1)  # [L, K]
    onehot = torch.zeros(I, *p.shape, dtype=torch.float64, device=p.device)
    onehot.scatter_(2, samples.to(p.device).unsqueeze(-1), 1.0)
    score = onehot - p  # [I, L, K]
    adv = losses.detach().double().to(p.device)
    adv = adv - adv.mean()
    return (adv.view(I, 1, 1) * score).sum(0) / (I - 1)


def exact_expected_gradient(logits: torch.Tensor, loss_of: dict[tuple[int, ...], float]) -> torch.Tensor:
    """The exact ``d E_{s ~ p_theta}[loss(s)] / d theta`` ``[L, K]`` by enumerating every prompt (autograd through
    the enumeration; for tiny ``K ** L`` only — the reference the tests hold :func:`vr_policy_gradient` to)."""
    theta = logits.detach().double().clone().requires_grad_(True)
    logp = torch.log_softmax(theta, dim=-1)
    total = theta.new_zeros(())
    for s, loss in loss_of.items():
        total = total + logp[torch.arange(len(s)), torch.tensor(s)].sum().exp() * float(loss)
    total.backward()
    return theta.grad


_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


def candidate_vocabulary(texts: Sequence[str], size: int, min_count: int = 2, max_doc_fraction: float = 0.5,
                         min_chars: int = 3) -> list[str]:
    """``size`` candidate prompt strings from ``texts``: word bigrams ranked by pointwise mutual information
    ``log c(ab) N / (c(a) c(b))`` (seen ``>= min_count`` times), then the most frequent words; a phrase that
    occurs in more than ``max_doc_fraction`` of the texts (the pattern around every text, the commonest function
    words) is left out. Deterministic (ties broken alphabetically).

    Raises:
        ValueError: fewer than ``size`` distinct candidates can be drawn from ``texts``.
    """
    docs = [[w.lower() for w in _WORD.findall(t)] for t in texts]
    uni, bi, df = Counter(), Counter(), Counter()
    for words in docs:
        uni.update(words)
        pairs = list(zip(words, words[1:]))
        bi.update(pairs)
        df.update(set(words) | {f"{a} {b}" for a, b in pairs})
    n_docs, n_tok = max(1, len(docs)), max(1, sum(uni.values()))
    common = {k for k, v in df.items() if v > max_doc_fraction * n_docs}

    def ok(a: str, b: str | None = None) -> bool:
        key = a if b is None else f"{a} {b}"
        return key not in common and len(a) >= min_chars and (b is None or (len(b) >= min_chars and b not in common
                                                                            and a not in common))

    pmi = [(math.log(c * n_tok / (uni[a] * uni[b])), f"{a} {b}") for (a, b), c in bi.items()
           if c >= min_count and a != b and ok(a, b)]
    out = [s for _, s in sorted(pmi, key=lambda x: (-x[0], x[1]))][: size // 2]
    words = [w for w, c in sorted(uni.items(), key=lambda x: (-x[1], x[0])) if ok(w)]
    out += [w for w in words if w not in out][: size - len(out)]
    if len(out) < size:
        raise ValueError(f"BlackBoxPromptLearning: `num_candidates`={size} but the unlabelled texts give only "
                         f"{len(out)} candidate phrases; lower `num_candidates` or pass `candidates`")
    return out


def select_reliable(probs: torch.Tensor, per_class: int, prior_correction: bool = True) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The reliable pseudo-labelled examples: for each class ``c``, the ``per_class`` examples predicted as ``c``
    with the highest score (``p(c|x)``, divided by the class's mean probability over the set when
    ``prior_correction``, so a model biased towards one label word still yields examples of every class); a class
    with fewer predicted examples is filled with the examples of highest score for it among the rest.

    Args:
        probs: class probabilities ``[N, C]`` of the unlabelled examples (zero-shot).
        per_class: examples per class (``N >= C * per_class``).
        prior_correction: rank by ``p(c|x) / mean_x p(c|x)`` instead of ``p(c|x)``.

    Returns:
        ``(labels [N] long, reliable [N] bool)``: every example's pseudo-label (argmax of the score) and the mask
        of the reliable ones (whose pseudo-label is their class in the selection).
    """
    N, C = probs.shape
    if N < C * per_class:
        raise ValueError(f"BlackBoxPromptLearning: {N} unlabelled examples cannot give `reliable_per_class`="
                         f"{per_class} reliable examples to each of the {C} classes; use more data or lower it")
    score = probs.double()
    if prior_correction:
        score = score / score.mean(0, keepdim=True).clamp_min(1e-12)
    labels = score.argmax(-1)
    reliable = torch.zeros(N, dtype=torch.bool)
    for c in range(C):
        mine = torch.nonzero(labels == c).flatten()
        order = mine[torch.argsort(score[mine, c], descending=True, stable=True)][:per_class]
        if len(order) < per_class:  # too few predicted as c: the free examples ranked by their score for c
            free = torch.nonzero(~reliable & (labels != c)).flatten()
            extra = free[torch.argsort(score[free, c], descending=True, stable=True)][: per_class - len(order)]
            order = torch.cat([order, extra])
        labels[order] = c
        reliable[order] = True
    return labels, reliable


def pick_demonstrations(labels: torch.Tensor, reliable: torch.Tensor, num_classes: int, per_class: int,
                        exclude: int | None, generator: torch.Generator | None,
                        confidence: torch.Tensor | None = None) -> list[int]:
    """Indices of ``per_class`` reliable examples of each of ``num_classes`` classes, never ``exclude``: drawn at
    random with ``generator`` (and shown in a random order), or — without one — the most confident
    (``confidence`` [N]) in class order."""
    out: list[int] = []
    for c in range(num_classes):
        pool = torch.nonzero(reliable & (labels == c)).flatten()
        if exclude is not None:
            pool = pool[pool != exclude]
        if generator is not None:
            pool = pool[torch.randperm(len(pool), generator=generator)]
        elif confidence is not None:
            pool = pool[torch.argsort(confidence[pool], descending=True, stable=True)]
        out += pool[:per_class].tolist()
    if generator is not None and out:
        out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
    return out
