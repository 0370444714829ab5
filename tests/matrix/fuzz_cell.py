"""The matrix's ``fuzz`` setting: property-based fuzzing (Hypothesis) of a technique's constructor and of the batch
shapes one training step meets.

- Constructor: the case's valid arguments with one of them replaced by a random typed value (None, bools, ints,
  floats with nan/inf, short strings, short lists). Good: it constructs, or it raises ``ValueError`` /
  ``TypeError`` (``FileNotFoundError`` for a path) whose message names the argument. ``plain`` fuzzes
  ``CausalLMModule``'s arguments (with the tiny ``model_config``).
- Batch shapes: 1-2 rows of 1-2 tokens cut from the case's first batch, each row normal (every token supervised),
  all-ignored (labels -100) or fully padded (attention mask 0, labels -100), with or without the
  ``attention_mask`` key (every ``<side>_`` sequence of a preference pair alike). Good: one training step with a
  finite loss, or a ``ValueError`` / ``TypeError`` / ``RuntimeError`` — or lit_ft's ``BatchKeyError``, the
  first-batch check that names a missing key and what provides it (a pair's attention masks are required) — from a
  ``raise`` statement in lit_ft's own code (a check, not a crash inside torch or a shape error of a torch op called
  from lit_ft). A step the module or technique skipped (no optimizer step, no
  error) is counted apart.

Examples are derandomized (the same every run) and not shrunk (each batch example is a fit: shrinking would
multiply the time); ``MAX_CTOR`` / ``MAX_BATCH`` keep a cell under ~30 s after imports.
"""

from __future__ import annotations

import inspect
import math
import os
import traceback
from typing import Any

from single_job import SingleJob
from worker import innermost_frame

from lit_ft.core.batch import BatchKeyError

MAX_CTOR, MAX_BATCH = 40, 10
CLEAR_CTOR_ERRORS = (ValueError, TypeError, FileNotFoundError)
NOT_FUZZED = {"self", "model", "model_config"}  # plain: the tiny model stays (a random path would load a model)
MAX_REPORTED = 5
CLEAR_BATCH_ERRORS = (ValueError, TypeError, RuntimeError, BatchKeyError)


def raised_by_lit_ft(e: BaseException) -> bool:
    """Whether ``e`` comes from a ``raise`` statement in ``lit_ft/`` (a deliberate check), not from a torch op or a
    library below."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    return f"{os.sep}lit_ft{os.sep}" in last.filename and (last.line or "").lstrip().startswith("raise")


def _settings(n: int):
    from hypothesis import HealthCheck, Phase, settings

    return settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=False)


def _values():
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2 ** 40), 2 ** 40),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                     st.lists(st.integers(-2, 5), max_size=3))


def constructor_target(job: SingleJob) -> tuple[Any, dict, list[str]]:
    """``(callable, valid kwargs, fuzzed argument names)``: the technique's class, or ``CausalLMModule`` for plain."""
    if job.cls is None:
        from lit_ft.modules import CausalLMModule
        from tests.helpers import tiny_config

        target, base = CausalLMModule, {"model_config": tiny_config()}
    else:
        target, base = job.cls, dict(job.kwargs)
    params = [n for n, p in inspect.signature(target.__init__).parameters.items()
              if n not in NOT_FUZZED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return target, base, params


def fuzz_constructor(job: SingleJob) -> dict:
    from hypothesis import given
    from hypothesis import strategies as st

    target, base, params = constructor_target(job)
    seen = {"examples": 0, "constructed": 0, "refused": 0, "bad": []}
    if not params:
        return seen

    @_settings(MAX_CTOR)
    @given(st.sampled_from(params).flatmap(lambda n: st.tuples(st.just(n), _values())))
    def prop(arg):
        name, value = arg
        seen["examples"] += 1
        try:
            target(**{**base, name: value})
            seen["constructed"] += 1
        except CLEAR_CTOR_ERRORS as e:
            if name in str(e):
                seen["refused"] += 1
            else:
                seen["bad"].append({"argument": name, "value": repr(value)[:80],
                                    "error": f"{type(e).__name__}: {str(e)[:200]} (does not name {name!r})"})
        except Exception as e:  # noqa: BLE001  any other exception type is the finding
            seen["bad"].append({"argument": name, "value": repr(value)[:80],
                                "error": f"{type(e).__name__}: {str(e)[:200]}", "raised_at": innermost_frame(e)})

    prop()
    return seen


def shaped_batch(template: dict, rows: list[str], length: int, with_mask: bool) -> dict:
    """The first ``len(rows)`` rows and ``length`` tokens of ``template``; row kinds ``normal`` (labels = ids:
    every token supervised), ``ignored`` (labels -100) or ``padded`` (mask 0, labels -100); a bool per-token
    mask (key tokens) keeps only supervised positions; ``with_mask=False`` drops ``attention_mask``. A batch of
    several sequences per row (a preference pair's ``chosen_input_ids`` / ``rejected_input_ids``) has each
    sequence ``<side>_`` shaped alike, with its own ``<side>_labels`` / ``<side>_attention_mask``."""
    import torch

    from case_data import batch_rows

    b, n = batch_rows(template), len(rows)
    # each sequence's prefix ("" for input_ids) and width: a tensor [b, width, ...] under that prefix is per token
    widths = {k[: -len("input_ids")]: template[k].shape[1] for k in template
              if k.endswith("input_ids") and isinstance(template[k], torch.Tensor)}

    def per_token(k: str, v: torch.Tensor) -> bool:
        return v.dim() >= 2 and v.shape[0] == b and any(k.startswith(p) and v.shape[1] == t for p, t in widths.items())

    out = {}
    for k, v in template.items():
        if isinstance(v, torch.Tensor) and per_token(k, v):
            out[k] = v[:n, :length].clone()
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
            out[k] = v[:n].clone()
        else:
            out[k] = v
    for p in widths:
        ids, labels, mask = out[p + "input_ids"], out.get(p + "labels"), out.get(p + "attention_mask")
        token_labels = labels is not None and labels.shape == ids.shape
        for i, kind in enumerate(rows):
            if token_labels:
                labels[i] = ids[i] if kind == "normal" else -100
            if mask is not None:
                mask[i] = 0 if kind == "padded" else 1
        if token_labels:
            for k, v in out.items():
                if k.startswith(p) and k != p + "attention_mask" and isinstance(v, torch.Tensor) \
                        and v.dtype == torch.bool and v.shape == labels.shape:
                    out[k] = v & (labels != -100)
        if not with_mask:
            out.pop(p + "attention_mask", None)
    return out


def fuzz_batches(job: SingleJob) -> dict:
    from hypothesis import given
    from hypothesis import strategies as st

    template = job.template
    seen = {"examples": 0, "trained": 0, "refused": 0, "skipped": 0, "bad": []}
    kinds = st.sampled_from(["normal", "ignored", "padded"])

    @_settings(MAX_BATCH)
    @given(st.lists(kinds, min_size=1, max_size=2), st.integers(1, 2), st.booleans())
    def prop(rows, length, with_mask):
        seen["examples"] += 1
        batch = shaped_batch(template, rows, length, with_mask)
        what = {"rows": rows, "length": length, "attention_mask": with_mask}
        try:
            run = job.fit([batch], 1, require_steps=False)
        except CLEAR_BATCH_ERRORS as e:
            if raised_by_lit_ft(e):
                seen["refused"] += 1
                seen.setdefault("refusals", set()).add(f"{type(e).__name__}: {str(e)[:120]}")
            else:
                seen["bad"].append({**what, "error": f"{type(e).__name__}: {str(e)[:200]}",
                                    "raised_at": innermost_frame(e)})
            return
        except Exception as e:  # noqa: BLE001
            seen["bad"].append({**what, "error": f"{type(e).__name__}: {str(e)[:200]}",
                                "raised_at": innermost_frame(e)})
            return
        if run.trainer.global_step == 0:
            seen["skipped"] += 1
        elif all(math.isfinite(x) for x in run.losses):
            seen["trained"] += 1
        else:
            seen["bad"].append({**what, "error": f"non-finite loss {run.losses}"})

    prop()
    return seen


def run_fuzz(job: SingleJob) -> dict:
    """The fuzz cell's ``{"category", "outcome", "detail"}``."""
    job.progress.phase("fuzz constructor")
    ctor = fuzz_constructor(job)
    job.progress.phase("fuzz batches")
    batches = fuzz_batches(job)
    detail = {"constructor": {**ctor, "bad": ctor["bad"][:MAX_REPORTED]},
              "batches": {**batches, "bad": batches["bad"][:MAX_REPORTED],
                          "refusals": sorted(batches.get("refusals", ()))[:MAX_REPORTED]}}
    bad_ctor, bad_batch = len(ctor["bad"]), len(batches["bad"])
    summary = (f"{ctor['examples']} constructor examples ({ctor['refused']} refused clearly), {batches['examples']} "
               f"batches ({batches['trained']} trained, {batches['refused']} refused, {batches['skipped']} skipped)")
    if not bad_ctor and not bad_batch:
        return {"category": "works", "outcome": f"works ({summary})", "detail": detail}
    if bad_ctor:
        b = ctor["bad"][0]
        first = f"{b['argument']}={b['value']}: {b['error']}"
    else:
        b = batches["bad"][0]
        first = f"batch rows={b['rows']} length={b['length']} attention_mask={b['attention_mask']}: {b['error']}"
    return {"category": "fails", "outcome": f"fails (fuzz: {bad_ctor} constructor, {bad_batch} batch example(s) "
                                            f"bad): {first}", "detail": detail}
