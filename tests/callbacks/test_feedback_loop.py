"""FeedbackLoop (LeTI): the feedback texts and token ids checked by hand, the special tokens and their embeddings,
the loop across iterations, resume in the middle of an iteration, bad inputs, progress bars."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lit_ft.callbacks.data_selection.feedback_loop as fl
from lit_ft.callbacks import FeedbackLoop
from lit_ft.core.sandbox import Sandbox
from lit_ft.data.feedback_loop import FeedbackLoopDataModule, load_problems, split_problems
from lit_ft.modules import CausalLMModule
from tests.contract.checks import assert_same_state
from tests.data.feedback_problems import PROBLEMS, feedback_datamodule, write_tiny_problems
from tests.helpers import PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer, tiny_config

SMALL = dict(num_samples=1, epochs_per_iteration=1, max_new_tokens=4, generation_batch_size=8, timeout_seconds=2.0,
             cpu_seconds=1, memory_mb=256, execution_workers=2)


def module() -> CausalLMModule:
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(cpu_seconds=1, wall_seconds=2.0, memory_mb=256)


# -- formatting, checked by hand -----------------------------------------------------------------------------------
def test_program_for_and_truncation_exact():
    p = PROBLEMS[1]
    assert fl.program_for(p, "    return x + 1\n") == (
        'def add_1(x):\n    """Return x + 1."""\n    return x + 1\n\n\n'
        "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n\n\ncheck(add_1)\n")
    assert fl.truncate_at_stops("    return x\n\ndef other():\n    pass", fl.STOP_SEQUENCES) == "    return x\n"
    assert fl.truncate_at_stops("    return x\nprint(3)\n#c", fl.STOP_SEQUENCES) == "    return x"
    assert fl.truncate_at_stops("    return x", []) == "    return x"
    assert fl.good_prompt("def f():") == "<|good|>def f():"


def test_feedback_text_exact(sandbox):
    p = PROBLEMS[1]
    good = sandbox.run(fl.program_for(p, "    return x + 1\n"))
    bad = sandbox.run(fl.program_for(p, "    return x\n"))
    assert good.status == "passed" and bad.status == "failed"
    phrase = random.Random(5).choice(fl.CORRECT_FEEDBACK)
    assert fl.feedback_text(p["prompt"], "    return x + 1\n", good, rng=random.Random(5)) == (
        f"<|good|><|lang_feedback|>{phrase}<|/lang_feedback|>" + p["prompt"] + "    return x + 1\n")
    assert fl.feedback_text(p["prompt"], "    return x\n", bad) == (
        "<|bad|><|lang_feedback|>The code is not working correctly. Here is some feedback: "
        "Traceback (most recent call last):\n"
        '  File "<string>", line 11, in <module>\n'
        '  File "<string>", line 7, in check\n'
        "AssertionError<|/lang_feedback|>" + p["prompt"] + "    return x\n")
    assert fl.feedback_text(p["prompt"], "    return x\n", bad, coarse_only=True) == \
        "<|bad|>" + p["prompt"] + "    return x\n"
    timeout = sandbox.run("while True:\n    pass\n")
    assert fl.feedback_text("P", "C", timeout) == (
        "<|bad|><|lang_feedback|>The code is not working correctly. Here is some feedback: timeout"
        "<|/lang_feedback|>PC")


def test_special_tokens_ids_and_mean_embeddings():
    dm = feedback_datamodule(max_length=256)
    dm.setup("fit")
    n = len(dm.tokenizer)
    model = PlainHFModule()
    old = model.model.get_input_embeddings().weight.detach().double().clone()
    ids = fl.add_feedback_tokens(dm.tokenizer, model)
    assert ids == [n, n + 1, n + 2, n + 3]  # <|bad|>, <|good|>, <|lang_feedback|>, <|/lang_feedback|>
    assert fl.add_feedback_tokens(dm.tokenizer, model) == ids  # idempotent: no second set of rows
    w = model.model.get_input_embeddings().weight.detach().double()
    assert w.shape[0] == n + 4
    torch.testing.assert_close(w[:n], old[:n], rtol=0, atol=0)
    torch.testing.assert_close(w[n:], old[:n].mean(0, keepdim=True).expand(4, -1), rtol=1e-6, atol=1e-7)
    assert model.model.get_output_embeddings().weight.shape[0] == n + 4
    # a feedback text's ids: each marker is one token, the rest is the text tokenized as usual
    text = fl.feedback_text("def f(x):\n", "    return x\n", None, passed=False)
    enc = dm.encode_feedback_text(text)
    tok = dm.tokenizer
    body = "The code is not working correctly. Here is some feedback: "
    expected = ([ids[0], ids[2]] + tok(body, add_special_tokens=False)["input_ids"] + [ids[3]]
                + tok("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"])
    assert enc == expected
    assert tok.decode(enc[:2]) == "<|bad|><|lang_feedback|>"
    # skipped when decoding a generation
    assert tok.decode(enc, skip_special_tokens=True).startswith(body)


# -- the loop --------------------------------------------------------------------------------------------------------
def _canonical_half(model, tokenizer, prompts, num_samples, **kw):
    """A stand-in sampler: the canonical solution for even samples, a wrong one for odd ones."""
    by_prompt = {fl.good_prompt(p["prompt"]): p for p in PROBLEMS}
    return [[by_prompt[pr]["canonical_solution"] if k % 2 == 0 else "    return None\n" for k in range(num_samples)]
            for pr in prompts]


def test_the_loop_builds_mixed_feedback_data_each_iteration(monkeypatch):
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    cb = FeedbackLoop(**{**SMALL, "num_samples": 2})
    dm = feedback_datamodule()
    seen: list[torch.Tensor] = []

    class Spy(CausalLMModule):
        def training_step(self, batch, batch_idx):
            seen.append(batch["input_ids"][:, 0].clone())
            return super().training_step(batch, batch_idx)

    trainer = quiet_trainer([cb], max_steps=8, limit_val_batches=0)
    trainer.fit(Spy(model_config=tiny_config(), learning_rate=1e-2), datamodule=dm)
    assert cb.iteration == 1 and trainer.current_epoch == 2  # 4 batches of 4 = 8 feedback + 8 plain rows
    assert sum(cb.passed) == 4 and len(cb.passed) == 8 and cb.statuses == {
        "passed": 4, "failed": 4, "error": 0, "timeout": 0, "killed": 0}
    good, bad = cb.token_ids[1], cb.token_ids[0]
    firsts = torch.cat(seen)
    assert set(firsts[0::2].tolist()) == {good, bad}  # rows alternate: feedback text, plain row
    assert not set(firsts[1::2].tolist()) & {good, bad}
    for text, ok in zip(cb.texts, cb.passed):
        assert text.startswith("<|good|><|lang_feedback|>" if ok else "<|bad|><|lang_feedback|>The code is not")
    assert trainer.callback_metrics["lit_ft/feedback_loop/train_pass_rate"] == pytest.approx(0.5)
    assert trainer.callback_metrics["lit_ft/feedback_loop/iteration"] == 1.0


def test_pass_at_1_is_greedy_and_good_conditioned(monkeypatch, sandbox):
    calls = {}

    def fake(model, tokenizer, prompts, num_samples, **kw):
        calls.update(kw, prompts=prompts, n=num_samples)
        return [[p["canonical_solution"]] for p in PROBLEMS[:3]]

    monkeypatch.setattr(fl, "sample_completions", fake)
    score, results = fl.pass_at_1(None, None, PROBLEMS[:3], sandbox)
    assert score == 1.0 and [r.status for r in results] == ["passed"] * 3
    assert calls["greedy"] is True and calls["n"] == 1 and calls["prompts"][0].startswith("<|good|>def add_0")


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    dm = feedback_datamodule()
    dm.setup("fit")
    model = PlainHFModule()
    fl.add_feedback_tokens(dm.tokenizer, model)
    prompts = [fl.good_prompt(p["prompt"]) for p in PROBLEMS[:2]]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = fl.sample_completions(model, dm.tokenizer, prompts, 3, max_new_tokens=6, seed=7, stop_sequences=[])
    assert torch.equal(torch.get_rng_state(), before)
    b = fl.sample_completions(model, dm.tokenizer, prompts, 3, max_new_tokens=6, seed=7, stop_sequences=[])
    c = fl.sample_completions(model, dm.tokenizer, prompts, 3, max_new_tokens=6, seed=8, stop_sequences=[])
    assert a == b and a != c and len(a) == 2 and all(len(x) == 3 for x in a)
    assert dm.tokenizer.padding_side == "right" and model.model.training


def test_resume_in_the_middle_of_an_iteration_is_identical(tmp_path, monkeypatch):
    """2 epochs per iteration, checkpoint after epoch 0: the resumed run must not sample again — it restores the
    iteration counter and the iteration's texts and pairing; the embeddings have the new rows before the restore."""
    calls = []
    real = fl.sample_completions

    def counting(*a, **kw):
        calls.append(kw["seed"])
        return real(*a, **kw)

    monkeypatch.setattr(fl, "sample_completions", counting)
    r = fit_and_resume(module, lambda: [FeedbackLoop(**{**SMALL, "epochs_per_iteration": 2})], tmp_path,
                       make_datamodule=feedback_datamodule)
    assert len(calls) == 1  # the uninterrupted run: iteration 0 only; the resumed run: none
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    (a,), (b,) = r.callbacks_full, r.callbacks_resumed
    assert_same_state(a.state_dict(), b.state_dict(), "FeedbackLoop.state_dict()")
    assert b.iteration == 0 and b.texts and b.texts == a.texts
    assert r.resumed.model.get_input_embeddings().weight.shape[0] == len(b.token_ids) + 384


def test_resume_across_iterations_draws_the_same_programs(tmp_path, monkeypatch):
    calls = []
    real = fl.sample_completions

    def counting(*a, **kw):
        calls.append(kw["seed"])
        return real(*a, **kw)

    monkeypatch.setattr(fl, "sample_completions", counting)
    r = fit_and_resume(module, lambda: [FeedbackLoop(**SMALL)], tmp_path, make_datamodule=feedback_datamodule)
    (a,), (b,) = r.callbacks_full, r.callbacks_resumed
    assert calls == [calls[0], calls[1], calls[1]] and calls[0] != calls[1]  # iteration 1's seed, drawn twice
    assert a.iteration == b.iteration == 1 and a.texts == b.texts
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())


def test_resume_with_another_seed_is_refused():
    cb = FeedbackLoop(**SMALL)
    state = {**cb.state_dict(), "seed": 3}
    with pytest.raises(ValueError, match="made with seed=3, this run has seed=0"):
        cb.load_state_dict(state)


def test_progress_bars_on_generation_and_execution(capfd, monkeypatch):
    monkeypatch.delenv("LIT_FT_PROGRESS", raising=False)
    quiet_trainer([FeedbackLoop(**SMALL)], max_steps=1, limit_val_batches=0).fit(module(), datamodule=feedback_datamodule())
    err = capfd.readouterr().err
    assert "feedback loop 0: generating" in err and "feedback loop 0: executing" in err


# -- bad inputs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,value,message", [
    ("num_samples", 0, "`num_samples` must be an int >= 1, got 0"),
    ("epochs_per_iteration", 0, "`epochs_per_iteration` must be an int >= 1"),
    ("top_p", 0.0, "`top_p` must be a number in (0, 1]"),
    ("temperature", 0, "`temperature`"),
    ("stop_sequences", "\ndef", "`stop_sequences` must be a list of non-empty strings"),
    ("timeout_seconds", 0, "`timeout_seconds`"),
    ("mix_plain_data", "yes", "`mix_plain_data` must be true or false"),
])
def test_bad_arguments(arg, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        FeedbackLoop(**{arg: value})


def test_a_problem_without_tests_is_refused(tmp_path):
    bad = dict(PROBLEMS[0], task_id="Tiny/no-tests", test="")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PROBLEMS[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"problem 'Tiny/no-tests' .* has no tests \(field 'test' must be"):
        load_problems(str(path))
    missing = {k: v for k, v in PROBLEMS[0].items() if k != "entry_point"}
    path.write_text(json.dumps(missing) + "\n")
    with pytest.raises(ValueError, match="has no a `entry_point`|no a `entry_point`|`entry_point`"):
        load_problems(str(path))


def test_split_is_seeded_and_bounded(tmp_path):
    problems = load_problems(write_tiny_problems(tmp_path / "p.jsonl"))
    tr, ev = split_problems(problems, 2, seed=0)
    assert len(tr) == 4 and len(ev) == 2 and {p["task_id"] for p in tr + ev} == {p["task_id"] for p in PROBLEMS}
    assert split_problems(problems, 2, seed=0) == (tr, ev) and split_problems(problems, 2, seed=1) != (tr, ev)
    with pytest.raises(ValueError, match="`num_eval_problems` must be < the number of problems"):
        split_problems(problems, 6, seed=0)


def test_needs_the_feedback_datamodule():
    from tests.helpers import ListDataModule

    with pytest.raises(TypeError, match="needs lit_ft.data.FeedbackLoopDataModule .* got ListDataModule"):
        quiet_trainer([FeedbackLoop(**SMALL)], max_steps=1).fit(module(), datamodule=ListDataModule(2))


def test_a_second_loop_on_one_datamodule_is_refused():
    dm = feedback_datamodule()
    with pytest.raises(ValueError, match="a second FeedbackLoop"):
        quiet_trainer([FeedbackLoop(**SMALL), FeedbackLoop(**{**SMALL, "seed": 1})], max_steps=1).fit(
            module(), datamodule=dm)


def test_without_the_loop_the_datamodule_is_plain_sft():
    dm = feedback_datamodule()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "labels", "attention_mask", "sample_idx"}
    assert isinstance(dm, FeedbackLoopDataModule) and len(dm.train_problems) == 4 and len(dm.eval_problems) == 2


def test_feedback_rows_are_all_targets_and_plain_rows_keep_their_sft_labels(monkeypatch):
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    dm = feedback_datamodule(max_length=256)
    cb = FeedbackLoop(**SMALL)
    quiet_trainer([cb], max_steps=1, limit_val_batches=0).fit(module(), datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    fb, plain = slice(0, None, 2), slice(1, None, 2)
    assert torch.equal(labels[fb][mask[fb]], ids[fb][mask[fb]])  # every token of a feedback text is a target
    assert (labels[fb][~mask[fb]] == -100).all()
    assert (labels[plain][mask[plain]] == -100).any()  # SFT rows: the prompt is not a target
    assert ids[fb][:, 0].tolist() == [cb.token_ids[1] if ok else cb.token_ids[0] for ok in cb.passed[:2]]


def test_without_plain_data_the_set_is_feedback_only(monkeypatch):
    monkeypatch.setattr(fl, "sample_completions", _canonical_half)
    dm = feedback_datamodule()
    cb = FeedbackLoop(**{**SMALL, "num_samples": 2, "mix_plain_data": False})
    trainer = quiet_trainer([cb], max_steps=2, limit_val_batches=0)
    trainer.fit(module(), datamodule=dm)
    assert len(dm.train_dataloader().dataset) == 8 and cb.plain_indices is None
    assert all(t.startswith(("<|good|>", "<|bad|>")) for t in cb.texts)
