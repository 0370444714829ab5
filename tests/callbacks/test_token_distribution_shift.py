"""TokenDistributionShift (URIAL's token distribution shift as a monitoring callback): ranks against a base whose
ranking is known by construction, base == aligned => all unshifted, the base under PEFT (adapters disabled) and
without it (the initial weights, checkpointed or the resume refused), nothing run in training steps, and the data
its pictures plot."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_ft.callbacks.analysis._tds_answers import base_answer_logits, greedy_answers, prompts_from_batch
from lit_ft.callbacks.analysis._tds_pictures import answer_heatmap, position_curve, top_shifted_bars
from lit_ft.callbacks.analysis.token_distribution_shift import (
    TokenDistributionShift, evaluate_token_distribution_shift, measure_token_distribution_shift,
)
from lit_ft.core.registry import REGISTRY
from lit_ft.core.resume import ResumeArgumentError
from lit_ft.metrics.token_distribution_shift import TokenDistributionShiftMetric

from helpers import VOCAB, ListDataModule, LoraModule, PlainHFModule, fit_and_resume, random_batch, tiny_hf_model

class ValLora(LoraModule):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


class ValPlain(PlainHFModule):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


PROMPTS = [torch.tensor([5, 9, 17, 33, 2]), torch.tensor([40, 41]), torch.tensor([100, 7, 250])]


class CyclicBase(nn.Module):
    """A base LM whose next-token ranking is known: after token ``x`` it scores token ``v`` as
    ``-((v - x) mod V)``, so ``v``'s rank is ``((v - x) mod V) + 1`` (x itself is its top token)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        v = torch.arange(VOCAB)
        logits = -((v[None, None, :] - input_ids[..., None]) % VOCAB).float()
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _kind(rank: int) -> int:
    return 0 if rank == 1 else 1 if rank <= 3 else 2


def test_ranks_against_a_base_with_known_ranking():
    aligned = tiny_hf_model()
    metric = TokenDistributionShiftMetric(max_positions=6, first_k=2, vocab_size=VOCAB)
    rows = measure_token_distribution_shift(aligned, lambda: _null(CyclicBase()), PROMPTS, metric, 6, 2, 0, None,
                                            torch.device("cpu"), keep_rows=3)
    counts, first, by_pos = [0, 0, 0], [0, 0, 0], [[0, 0, 0] for _ in range(6)]
    for prompt, (answer, cats) in zip(PROMPTS, rows):
        # the answer is the aligned model's own greedy continuation of the prompt alone (left padding changes nothing)
        alone = aligned.generate(input_ids=prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert answer == alone[0, prompt.numel():].tolist()
        prev = [int(prompt[-1])] + answer[:-1]
        kinds = [_kind((o - p) % VOCAB + 1) for o, p in zip(answer, prev)]
        assert cats == kinds
        for t, k in enumerate(kinds):
            counts[k] += 1
            by_pos[t][k] += 1
            first[k] += t < 2
    r = metric.compute()
    assert r["tokens"] == 18
    for i, name in enumerate(("unshifted", "marginal", "shifted")):
        assert r[f"{name}_share"].item() == pytest.approx(counts[i] / 18)
    assert r["shifted_share_first_k"].item() == pytest.approx(first[2] / sum(first))
    assert r["position_counts"].tolist() == [3] * 6
    torch.testing.assert_close(r["position_shares"], torch.tensor(by_pos, dtype=torch.float32) / 3)


def _null(model):
    from contextlib import nullcontext

    return nullcontext(model)


def test_teacher_forced_base_logits_match_unpadded_single_rows():
    model = tiny_hf_model(seed=3)
    answers = greedy_answers(tiny_hf_model(), PROMPTS, 5, 0, None, torch.device("cpu"))
    logits = base_answer_logits(model, answers)
    for b, prompt in enumerate(PROMPTS):
        seq = torch.cat([prompt, answers.tokens[b]])[None]
        with torch.no_grad():
            ref = model(input_ids=seq).logits[0, prompt.numel() - 1: -1]
        torch.testing.assert_close(logits[b], ref, rtol=1e-4, atol=1e-5)


def test_base_equals_aligned_is_all_unshifted():
    model = tiny_hf_model()
    r = evaluate_token_distribution_shift(model, model, [random_batch(4, 12, seed=1)], max_new_tokens=8)
    assert r["prompts"] == 4 and r["tokens"] == 32
    assert r["unshifted_share"] == 1.0 and r["shifted_share"] == 0.0 and r["top_shifted"] == []


def test_answers_end_at_the_first_eos():
    model = tiny_hf_model()
    free = greedy_answers(model, PROMPTS, 6, 0, None, torch.device("cpu"))
    eos = int(free.tokens[0, 2])  # make the third answer token of the first prompt an eos
    stopped = greedy_answers(model, PROMPTS, 6, 0, eos, torch.device("cpu"))
    first = free.tokens[0].tolist().index(eos)
    assert stopped.mask[0].tolist() == [True] * (first + 1) + [False] * (stopped.tokens.shape[1] - first - 1)
    assert stopped.attention_mask[0, stopped.prompt_width:].tolist() == stopped.mask[0].long().tolist()


def test_prompts_are_the_attended_tokens_before_the_first_label():
    batch = random_batch(4, 12, prompt_len=3, seed=2)
    batch["labels"][1] = -100  # no answer: skipped
    batch["attention_mask"][2, :1] = 0  # a left-padded row: its pad is not part of the prompt
    prompts = prompts_from_batch(batch)
    assert [p.tolist() for p in prompts] == [batch["input_ids"][0, :3].tolist(), batch["input_ids"][2, 1:3].tolist(),
                                             batch["input_ids"][3, :3].tolist()]


def test_peft_base_is_the_model_with_adapters_disabled():
    module = LoraModule()
    batches = [random_batch(4, 12, seed=1)]
    at_init = evaluate_token_distribution_shift(None, module.model, batches, max_new_tokens=8)
    assert at_init["unshifted_share"] == 1.0  # LoRA's B starts at zero: the adapted model is the base
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0, generator=torch.Generator().manual_seed(len(name)))
    ids = batches[0]["input_ids"]
    before = module.model(input_ids=ids).logits
    moved = evaluate_token_distribution_shift(None, module.model, batches, max_new_tokens=8)
    assert moved["shifted_share"] + moved["marginal_share"] > 0
    assert moved["unshifted_share"] + moved["marginal_share"] + moved["shifted_share"] == pytest.approx(1)
    torch.testing.assert_close(module.model(input_ids=ids).logits, before)  # adapters are back on
    with pytest.raises(ValueError, match="model_before"):
        evaluate_token_distribution_shift(None, tiny_hf_model(), batches)


# -- under a Trainer ------------------------------------------------------------------------------------------------
_TRAIN_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                "on_before_optimizer_step", "on_before_zero_grad", "on_train_epoch_start", "on_train_epoch_end")


def _fit(module, cb, tmp_path, max_steps=4, tokenizer=None, **kw):
    trainer = pl.Trainer(max_steps=max_steps, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=1,
                         callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path), **kw)
    dm = ListDataModule(n_batches=4)
    dm.tokenizer = tokenizer
    trainer.fit(module, datamodule=dm)
    return trainer


class LetterTokenizer:
    """Renders id i as 't<i>' (and id 7 as a newline, which the pictures must show escaped)."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids):
        return "\n" if ids[0] == 7 else f"t{ids[0]}"


def test_nothing_runs_in_training_steps_and_every_n_validations(tmp_path):
    assert all(getattr(TokenDistributionShift, h) is getattr(Callback, h) for h in _TRAIN_HOOKS)
    module = ValLora()
    cb = TokenDistributionShift(max_samples=6, max_new_tokens=4, batch_size=4, first_k=2, every_n_validations=2,
                                pictures=False)
    calls = []
    inner = module.model.base_model.model
    original = inner.generate

    def counting(*args, **kwargs):
        calls.append((trainer_ref[0].state.stage, trainer_ref[0].sanity_checking))
        return original(*args, **kwargs)

    inner.generate = counting
    trainer_ref = [None]

    class Grab(Callback):
        def setup(self, trainer, pl_module, stage):
            trainer_ref[0] = trainer

    trainer = pl.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=1,
                         callbacks=[Grab(), cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))
    # two validations (steps 2 and 4) plus a sanity check: only the 2nd validation measures, 6 prompts in 2 batches
    assert [str(stage) for stage, sanity in calls] == ["RunningStage.VALIDATING"] * 2
    assert not any(sanity for _, sanity in calls)
    assert cb.last_results["tokens"] > 0


def test_peft_fit_logs_shares_and_draws_pictures(tmp_path):
    module = ValLora(lr=5e-2)
    cb = TokenDistributionShift(max_samples=5, max_new_tokens=6, batch_size=2, first_k=3, picture_answers=2,
                                top_tokens=5)
    trainer = _fit(module, cb, tmp_path)
    m = trainer.callback_metrics
    shares = [m[f"lit_ft/token_distribution_shift/{k}_share"].item() for k in ("unshifted", "marginal", "shifted")]
    assert sum(shares) == pytest.approx(1) and shares[2] > 0  # adapters trained at lr 5e-2 moved the answers
    assert "lit_ft/token_distribution_shift/shifted_share_first_k" in m
    assert m["lit_ft/token_distribution_shift/answer_tokens"].item() == cb.last_results["tokens"]
    for name in ("by_position", "answers", "top_shifted"):
        path = cb.last_pictures[name]
        assert path and path.endswith(f"{name}_step4.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the heat-map's rows: picture_answers answers, one category per decoded token, ids rendered without tokenizer
    assert len(cb.last_answers) == 2
    for texts, cats in cb.last_answers:
        assert 1 <= len(texts) == len(cats) <= 6 and all(t.isdigit() for t in texts)
    assert 1 <= len(cb.last_top_shifted) <= 5
    assert all(s <= n for _, s, n in cb.last_top_shifted)


def test_full_fine_tuning_measures_against_the_initial_weights(tmp_path):
    module = ValPlain(lr=0.5)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = TokenDistributionShift(max_samples=4, max_new_tokens=5, first_k=2, picture_answers=3)
    _fit(module, cb, tmp_path, tokenizer=LetterTokenizer())
    rendered = [t for texts, _ in cb.last_answers for t in texts] + [t for t, _, _ in cb.last_top_shifted]
    assert rendered and all(t == "\\n" or (t[0] == "t" and t[1:].isdigit()) for t in rendered)
    base = cb.base_model.state_dict()
    assert all(torch.equal(base[k], initial[k]) for k in initial)
    assert any(not torch.equal(module.model.state_dict()[k], initial[k]) for k in initial)
    assert cb.last_results["shifted_share"] + cb.last_results["marginal_share"] > 0


@pytest.mark.parametrize("peft", [None, {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}],
                         ids=["full", "lora"])
def test_with_lit_ft_causal_lm_module(tmp_path, peft):
    from lit_ft.modules import CausalLMModule

    from helpers import tiny_config

    module = CausalLMModule(model_config=tiny_config(), learning_rate=5e-2, warmup_steps=0, peft=peft)
    cb = TokenDistributionShift(max_samples=4, max_new_tokens=5, first_k=2, pictures=False)
    trainer = _fit(module, cb, tmp_path)
    assert (cb.base_model is None) == (peft is not None)  # PEFT: no copy, the adapters are disabled instead
    m = trainer.callback_metrics
    shares = [m[f"lit_ft/token_distribution_shift/{k}_share"].item() for k in ("unshifted", "marginal", "shifted")]
    assert sum(shares) == pytest.approx(1) and cb.last_results["tokens"] > 0


def test_base_from_a_folder_and_validate_without_a_base(tmp_path):
    base = tiny_hf_model(seed=5)
    base.save_pretrained(tmp_path / "base")
    module = ValPlain()
    cb = TokenDistributionShift(max_samples=4, max_new_tokens=4, first_k=2, base=str(tmp_path / "base"),
                                pictures=False)
    trainer = pl.Trainer(limit_val_batches=2, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.validate(module, datamodule=ListDataModule(n_batches=2))
    assert cb.last_results["tokens"] == 16 and "base_state" not in cb.state_dict()
    loaded = cb.base_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in base.state_dict().items())
    # same prompts and answers scored by hand against that base
    expected = evaluate_token_distribution_shift(base, module.model, [ListDataModule(n_batches=2).batches[0]],
                                                 max_new_tokens=4, max_samples=4, first_k=2)
    assert cb.last_results["shifted_share"] == pytest.approx(expected["shifted_share"])
    assert cb.last_results["unshifted_share"] == pytest.approx(expected["unshifted_share"])

    plain = TokenDistributionShift(pictures=False)  # validate(): no fit, no PEFT, no base -> nothing, with a warning
    trainer = pl.Trainer(limit_val_batches=1, callbacks=[plain], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="no base model"):
        trainer.validate(ValPlain(), datamodule=ListDataModule(n_batches=1))
    assert plain.last_results == {} and plain.base_model is None


def test_resume_restores_the_initial_base_weights(tmp_path):
    made = []

    def make_module():
        module = ValPlain(lr=0.5)
        if made:  # the resumed run's fresh module starts elsewhere: a copy at its setup would be wrong
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(1.0)
        made.append({k: v.clone() for k, v in module.model.state_dict().items()})
        return module

    run = fit_and_resume(make_module, lambda: [TokenDistributionShift(pictures=False)], tmp_path)
    base = run.callbacks_resumed[0].base_model.state_dict()
    assert all(torch.equal(base[k], made[0][k]) for k in made[0])


def test_resume_without_saved_base_weights_is_refused(tmp_path):
    runs = []

    def make_callbacks():
        runs.append(1)
        return [] if len(runs) == 1 else [TokenDistributionShift(pictures=False)]

    with pytest.raises(ResumeArgumentError, match="no base weights"):
        fit_and_resume(lambda: ValPlain(), make_callbacks, tmp_path)


# -- pictures: the data they plot -----------------------------------------------------------------------------------
def test_pictures_plot_the_measured_data():
    shares = torch.tensor([[1.0, 0, 0], [0.5, 0.25, 0.25], [math.nan] * 3])
    counts = torch.tensor([4, 4, 0])
    fig = position_curve(shares, counts)
    lines = fig.axes[0].lines
    assert [ln.get_label() for ln in lines] == ["unshifted", "marginal", "shifted"]
    for i, ln in enumerate(lines):
        assert list(ln.get_xdata()) == [0, 1]  # the position nobody reached is not drawn
        assert list(ln.get_ydata()) == shares[:2, i].tolist()

    texts = [["a", "b", "c"], ["d"]]
    cats = [[0, 2, 1], [2]]
    fig = answer_heatmap(texts, cats)
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (2, 3)
    assert grid[0].tolist() == [0, 2, 1] and grid[1, 0] == 2 and grid.mask[1, 1:].all()
    assert sorted(t.get_text() for t in ax.texts) == ["a", "b", "c", "d"]

    fig = top_shifted_bars(["'x'", "'y'"], [5, 2], [7, 2])
    ax = fig.axes[0]
    bar_at = {b.get_y() + b.get_height() / 2: b.get_width() for b in ax.patches}
    label_at = {tick: label.get_text() for tick, label in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert {label_at[y]: w for y, w in bar_at.items()} == {"'x'": 5, "'y'": 2}
    assert label_at[max(label_at)] == "'x'"  # the most shifted token on top


# -- construction ---------------------------------------------------------------------------------------------------
def test_registered_and_constructible_without_arguments():
    record = REGISTRY.get("token_distribution_shift")
    assert record.cls is TokenDistributionShift and record.family == "analysis" and record.arxiv == "2312.01552"
    cb = TokenDistributionShift()
    assert cb.max_new_tokens == 32 and cb.unshifted_max_rank == 1 and cb.marginal_max_rank == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_samples=0), "max_samples"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(marginal_max_rank=0), "marginal_max_rank"),
    (dict(first_k=33), "first_k"),
    # a bound set by another argument names both (either may be the one to change)
    (dict(max_new_tokens=1), r"`first_k` \(5\) must be <= `max_new_tokens` \(1\)"),
    (dict(unshifted_max_rank=5), r"`marginal_max_rank` \(3\) must be >= `unshifted_max_rank` \(5\)"),
    (dict(base_dtype="int8"), "base_dtype"),
    (dict(base=""), "base"),
    (dict(every_n_validations=0), "every_n_validations"),
    (dict(pictures=1), "pictures"),
])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenDistributionShift(**kwargs)
