"""FeedbackLoop's optional KL to the initial model (LeTI's ``kl_divergence``): the non-feedback mask by hand, the
term against an fp64 reference at both integration levels (value and gradient), feedback positions excluded, zero
at the first step, off by default, the effect on training, resume keeping the fit-start copy, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lit_ft.callbacks.data_selection._initial_kl as ik
import lit_ft.callbacks.data_selection.feedback_loop as fl
from lit_ft.callbacks import FeedbackLoop
from lit_ft.callbacks.data_selection._initial_kl import InitialModelKL, non_feedback_mask
from lit_ft.core.introspect import causal_lm_parts
from lit_ft.core.loss import ObjectiveInputs, token_pipeline_for
from lit_ft.core.loss.primitives import final_hidden_states, shift_targets
from lit_ft.modules import CausalLMModule
from tests.data.feedback_problems import PROBLEMS, feedback_datamodule
from tests.helpers import PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer, tiny_config

SMALL = dict(num_samples=1, epochs_per_iteration=1, max_new_tokens=4, generation_batch_size=8, timeout_seconds=2.0,
             cpu_seconds=1, memory_mb=256, execution_workers=2)
BAD, GOOD, BEGIN, END = 90, 91, 92, 93


def module() -> CausalLMModule:
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)


def _canonical_half(model, tokenizer, prompts, num_samples, **kw):
    """A stand-in sampler: the canonical solution for even samples, a wrong one for odd ones (no generation)."""
    by_prompt = {fl.good_prompt(p["prompt"]): p for p in PROBLEMS}
    return [[by_prompt[pr]["canonical_solution"] if k % 2 == 0 else "    return None\n" for k in range(num_samples)]
            for pr in prompts]


# -- the mask, by hand ---------------------------------------------------------------------------------------------
def test_non_feedback_mask_by_hand():
    ids = torch.tensor([
        [GOOD, BEGIN, 5, 6, END, 7, 8, 0],     # feedback row, right padding: 7, 8
        [0, 0, BAD, BEGIN, 5, END, 7, 8],      # left padding: 7, 8
        [BAD, 5, 6, 7, 0, 0, 0, 0],            # coarse feedback: everything after the head
        [3, GOOD, BEGIN, 5, END, 6, 7, 8],     # a plain row (does not start with a head): nothing
        [GOOD, BEGIN, 5, 6, 7, 8, 9, 10],      # cut before <|/lang_feedback|>: nothing
        [GOOD, BEGIN, 5, END, 6, END, 7, 0],   # the span ends at the first <|/lang_feedback|>
    ])
    att = torch.tensor([[1] * 7 + [0], [0, 0] + [1] * 6, [1] * 4 + [0] * 4, [1] * 8, [1] * 8, [1] * 7 + [0]])
    m = non_feedback_mask(ids, att, (GOOD, BAD), BEGIN, END).int()
    assert m.tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0] * 8,
        [0] * 8,
        [0, 0, 0, 0, 1, 1, 1, 0],
    ]


# -- the math against an fp64 reference ------------------------------------------------------------------------------
def _models_and_batch():
    torch.manual_seed(0)
    cur = PlainHFModule().model.double()
    kl = InitialModelKL(0.5)
    kl.token_ids = [BAD, GOOD, BEGIN, END]
    kl.frozen.model = copy.deepcopy(cur).eval().requires_grad_(False)  # an fp64 copy (FrozenModel builds <= fp32)
    with torch.no_grad():  # move the trained model away from its initial weights
        for p in cur.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 80, (3, 11))
    ids[0, :3] = torch.tensor([GOOD, BEGIN, 4]); ids[0, 5] = END          # noqa: E702
    ids[1, 0] = BAD                                                        # coarse
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(att == 0, -100)}
    return cur, kl, batch


def _reference(cur, kl, batch) -> torch.Tensor:
    """Σ over masked positions of Σ_v p0 (log p0 − log p), from both models' full logits in fp64."""
    mask = non_feedback_mask(batch["input_ids"], batch["attention_mask"], (GOOD, BAD), BEGIN, END)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    log_p = F.log_softmax(cur(**inputs).logits.double(), -1)[mask]
    with torch.no_grad():
        log_p0 = F.log_softmax(kl.frozen.model(**inputs).logits.double(), -1)[mask]
    return (log_p0.exp() * (log_p0 - log_p)).sum()


def _inputs(level, cur, batch):
    targets = shift_targets(batch["labels"])
    common = dict(targets=targets, valid=targets != -100, keep=targets != -100, weights=None, batch=batch,
                  training=True, level=level)
    if level == "mixin":
        parts = causal_lm_parts(cur)
        return ObjectiveInputs(**common, hidden=final_hidden_states(parts, batch), head=parts)
    return ObjectiveInputs(**common, logits=cur(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).logits)


@pytest.mark.parametrize("level,block_rows", [("mixin", None), ("hook", None), ("mixin", 3), ("hook", 3)])
def test_kl_matches_the_fp64_reference_value_and_gradient(level, block_rows, monkeypatch):
    if block_rows is not None:  # the initial model's logits in blocks of 3 rows (13 rows: 5 blocks, the last short)
        monkeypatch.setattr(ik, "_BLOCK_ENTRIES", block_rows * 384)
    cur, kl, batch = _models_and_batch()
    ours = kl.objective_loss(_inputs(level, cur, batch))
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in cur.named_parameters()}
    cur.zero_grad()
    ref = _reference(cur, kl, batch)
    ref.backward()
    assert ref > 0 and kl.mask(batch).sum() == 5 + 8  # row 0: after position 5; row 1: 9 real tokens - the head
    # level 3 keeps the fp64 of the hidden states; level 2 reads the model's logits as float32 (ObjectiveInputs)
    tol = dict(rtol=1e-10, atol=1e-12) if level == "mixin" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.double(), ref, **tol)
    for n, p in cur.named_parameters():
        torch.testing.assert_close(g_ours[n], p.grad, **tol, msg=n)
    torch.testing.assert_close(kl.last_kl.double(), ref.detach() / 13, **tol)
    assert kl.objective_counts(batch)["positions"] == 13


def test_feedback_positions_do_not_change_the_kl():
    """Logits changed only where the mask is off (the feedback prefix, padding, the head) leave the term as it was."""
    cur, kl, batch = _models_and_batch()
    inputs = _inputs("hook", cur, batch)
    before = kl.objective_loss(inputs).detach()
    mask = kl.mask(batch)
    logits = inputs.logits.detach().clone()
    logits[~mask] = torch.randn_like(logits[~mask]) * 10
    after = kl.objective_loss(ObjectiveInputs(**{**inputs.__dict__, "logits": logits}))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    logits[mask] += torch.randn_like(logits[mask])  # ... and a change on a non-feedback position does
    assert not torch.allclose(kl.objective_loss(ObjectiveInputs(**{**inputs.__dict__, "logits": logits})), before)


# -- in training -----------------------------------------------------------------------------------------------------
def _fit(cb, steps, make=module):
    torch.manual_seed(0)
    m = make()
    trainer = quiet_trainer([cb], max_steps=steps, limit_val_batches=0)
    trainer.fit(m, datamodule=feedback_datamodule())
    return m, trainer


def test_zero_at_the_first_step_and_positive_later(monkeypatch):
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    _, t1 = _fit(FeedbackLoop(**SMALL, kl_coefficient=1.0), 1)
    assert t1.callback_metrics["lit_ft/feedback_loop/kl"] == pytest.approx(0.0, abs=1e-6)
    cb = FeedbackLoop(**SMALL, kl_coefficient=1.0)
    _, t3 = _fit(cb, 3)
    assert t3.callback_metrics["lit_ft/feedback_loop/kl"] > 1e-4  # the model moved from its copy
    assert cb.initial_model is not None and not any(p.requires_grad for p in cb.initial_model.parameters())


def test_off_by_default_and_the_term_changes_training(monkeypatch):
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    off = FeedbackLoop(**SMALL)
    assert off.kl_coefficient == 0.0 and FeedbackLoop(**SMALL, kl_coefficient=0.0)._kl is None
    m_off, t_off = _fit(off, 3)
    assert off.initial_model is None and "lit_ft/feedback_loop/kl" not in t_off.callback_metrics
    pipe = token_pipeline_for(m_off)
    assert pipe is None or not pipe.objectives  # nothing is added to the loss
    m_on, _ = _fit(FeedbackLoop(**SMALL, kl_coefficient=10.0), 3)
    diff = max((a - b).abs().max().item() for a, b in zip(m_off.state_dict().values(), m_on.state_dict().values()))
    assert diff > 1e-4


def test_drop_in_on_a_plain_hf_module(monkeypatch):
    """Level 2: the HF model computes its loss; the term rides on the loss hook."""
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    cb = FeedbackLoop(**SMALL, kl_coefficient=1.0)
    _, trainer = _fit(cb, 2, make=PlainHFModule)
    assert cb._attachment is None  # detached at teardown
    assert trainer.callback_metrics["lit_ft/feedback_loop/kl"] > 0


def test_resume_keeps_the_fit_start_copy(tmp_path, monkeypatch):
    """The checkpoint holds a digest, not the copy; the resumed run copies the module before the restore, so it
    trains exactly as the uninterrupted run (the KL's gradient depends on the copy)."""
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    r = fit_and_resume(module, lambda: [FeedbackLoop(**SMALL, kl_coefficient=5.0)], tmp_path,
                       make_datamodule=feedback_datamodule)
    (a,), (b,) = r.callbacks_full, r.callbacks_resumed
    assert_state_dicts_equal(a.initial_model.state_dict(), b.initial_model.state_dict())
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    ckpt = torch.load(r.ckpt, weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("FeedbackLoop")]
    assert isinstance(state["initial_model_digest"], str) and not any(isinstance(v, dict) and any(
        isinstance(x, torch.Tensor) for x in v.values()) for v in state.values())


def test_resume_from_other_weights_is_refused():
    cb = FeedbackLoop(**SMALL, kl_coefficient=1.0)
    torch.manual_seed(0)
    cb._kl.build(PlainHFModule().model, [BAD, GOOD, BEGIN, END])
    state = cb.state_dict()
    cb.load_state_dict(state)  # the same weights: accepted
    with pytest.raises(ValueError, match=r"`kl_coefficient` > 0 needs the weights the run started from"):
        cb.load_state_dict({**state, "initial_model_digest": "0" * 64})


@pytest.mark.parametrize("value,message", [
    (-0.1, "FeedbackLoop: `kl_coefficient` must be a finite number >= 0, got -0.1"),
    (float("inf"), "`kl_coefficient`"),
    (True, "`kl_coefficient`"),
    ("0.1", "`kl_coefficient`"),
])
def test_bad_kl_coefficient(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FeedbackLoop(kl_coefficient=value)
