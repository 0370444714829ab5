"""SelfTraining (LiST): meta-weights against autograd through a real virtual SGD step, the loss pieces against
float64 references, the session schedule in a Trainer, checkpoint -> resume mid-loop, and bad inputs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_ft.callbacks.adapters.linear import LinearAdapter
from lit_ft.callbacks.data_selection.self_training import (
    SelfTraining,
    _Capture,
    confidence_weights,
    linear_adapter_meta_scores,
    meta_scores,
    normalise_meta_weights,
    per_example_divergence,
    pseudo_label_targets,
)
from lit_ft.core.adapters import AdapterSet, AdapterTarget
from tests.contract.checks import assert_same_state
from tests.helpers import PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer
from tests.self_training_case import TINY_SCHEDULE, few_shot_data, few_shot_module, tiny_files


# -- the math ------------------------------------------------------------------------------------------------------
class _ToyNet(torch.nn.Module):
    """x -> dense -> linear adapter -> tanh -> dense -> linear adapter -> class scores (float64, odd sizes)."""

    def __init__(self, d_in: int = 5, d: int = 7, r: int = 3, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(d_in, d).double()
        self.l2 = torch.nn.Linear(d, classes).double()
        self.a1 = LinearAdapter(d, r, 0.4).double()
        self.a2 = LinearAdapter(classes, r, 0.4).double()
        for a in (self.a1, self.a2):
            a.reset(g)
        self.a1.double(), self.a2.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, d_in] -> scores [B, C] (mean over T)
        h = self.l1(x)
        h = torch.tanh(self.a1(None, h))
        y = self.l2(h)
        return self.a2(None, y).mean(1)


def test_linear_adapter_meta_scores_equal_autograd_through_a_virtual_sgd_step_fp64():
    torch.manual_seed(3)
    net = _ToyNet()
    B, T, lr = 5, 3, 0.37
    x, xm = torch.randn(B, T, 5, dtype=torch.float64), torch.randn(4, T, 5, dtype=torch.float64)
    targets = torch.softmax(torch.randn(B, 3, dtype=torch.float64), -1)
    ym = torch.tensor([0, 2, 1, 2])
    adapters = {id(net.a1): net.a1, id(net.a2): net.a2}
    params = {n: p for n, p in net.named_parameters() if n.startswith("a")}
    # ours: per-example contractions from one forward and one output-gradient pass
    meta_loss = F.cross_entropy(net(xm), ym)
    gl = torch.autograd.grad(meta_loss, [net.a1.w1, net.a1.w2, net.a2.w1, net.a2.w2])
    meta_grads = {id(net.a1): gl[:2], id(net.a2): gl[2:]}
    holder = AdapterSet({AdapterTarget(0, "a1"): net.a1, AdapterTarget(1, "a2"): net.a2})
    with _Capture(holder) as cap:
        per = per_example_divergence(net(x), targets)
    ours = linear_adapter_meta_scores(cap.records, per, meta_grads, lr)
    assert set(map(id, (m for m, _, _ in cap.records))) == set(adapters)
    # reference: theta' = theta - lr * grad(sum_i eps_i l_i), d L_meta(theta') / d eps at eps = 0
    eps = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    per_ref = per_example_divergence(functional_call(net, params, (x,)), targets)
    grads = torch.autograd.grad((eps * per_ref).sum(), list(params.values()), create_graph=True)
    moved = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    d = torch.autograd.grad(F.cross_entropy(functional_call(net, moved, (xm,)), ym), eps)[0]
    torch.testing.assert_close(ours, -d, rtol=1e-10, atol=1e-14)
    assert (ours > 0).any() and (ours < 0).any()  # a real mix of helpful and harmful rows


def test_meta_scores_through_the_verbalizer_equal_a_real_virtual_step():
    """End to end on the tiny Llama through the label words (the module computes its scores in float32)."""
    from lit_ft.core.prompts import load_tokenizer

    tok, _, _ = tiny_files()
    module = few_shot_module()
    module.build_verbalizer(load_tokenizer(tok))
    cb = SelfTraining(bottleneck=3, init_std=0.2)
    cb._install(module)
    dm = few_shot_data(unlabelled_batch_size=5)
    dm.setup("fit")
    unl = next(iter(dm.stream_loader("unlabelled", 0)))
    meta = next(iter(dm.stream_loader("meta", 0)))
    targets = torch.softmax(torch.randn(5, 2), -1)
    lr = 3.0
    ours, per = meta_scores(module, cb.student, unl, targets, meta, lr)
    assert per.requires_grad and per.shape == (5,)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert params and all(".self_training." in n for n in params)
    eps = torch.zeros(5, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):  # the double backward needs the math attention kernel
        per_ref = per_example_divergence(functional_call(module, params, (unl["input_ids"], unl["attention_mask"])),
                                         targets)
        grads = torch.autograd.grad((eps * per_ref).sum(), list(params.values()), create_graph=True)
        moved = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        scores = functional_call(module, moved, (meta["input_ids"], meta["attention_mask"]))
        d = torch.autograd.grad(F.cross_entropy(scores, meta["labels"]), eps)[0]
    torch.testing.assert_close(ours, -d, rtol=2e-3, atol=1e-6)


def test_loss_pieces_match_float64_references():
    torch.manual_seed(1)
    s = torch.randn(5, 3, dtype=torch.float64)
    t = torch.randn(5, 3, dtype=torch.float64)
    p = pseudo_label_targets(t, temperature=0.5)
    ref_p = torch.exp(t / 0.5) / torch.exp(t / 0.5).sum(-1, keepdim=True)
    torch.testing.assert_close(p, ref_p)
    q = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    ref_kl = (ref_p * (ref_p.log() - q.log())).sum(-1)
    torch.testing.assert_close(per_example_divergence(s, ref_p), ref_kl.to(torch.float64), rtol=1e-6, atol=1e-9)
    hard = pseudo_label_targets(t, soft=False)
    torch.testing.assert_close(per_example_divergence(s, hard), -q.log()[torch.arange(5), hard].to(torch.float64))
    scores = torch.tensor([0.3, -0.1, 0.0, 0.7, -2.0], dtype=torch.float64)
    torch.testing.assert_close(normalise_meta_weights(scores, 0.0),
                               torch.tensor([0.3, 0, 0, 0.7, 0], dtype=torch.float64))
    assert normalise_meta_weights(-scores.abs(), 1e-6).abs().sum() == 0  # nothing helps: the batch adds nothing
    w = confidence_weights(torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]]), threshold=0.6)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 1.0]) / (2 + 1e-5))


def test_schedule_phases_learning_rates_and_defaults():
    cb = SelfTraining()
    assert (cb.teacher_steps, cb.num_sessions, cb.student_steps, cb.finetune_epochs) == (400, 6, 1000, 50)
    assert (cb.teacher_learning_rate, cb.student_learning_rate, cb.meta_learning_rate) == (5e-6, 1e-4, 5e-6)
    cb = SelfTraining(**TINY_SCHEDULE)
    got = [cb.phase_at(s) for s in range(8)]
    assert got == [("teacher", 0, 0), ("student", 1, 0), ("student", 1, 1), ("finetune", 1, 2), ("student", 2, 0),
                   ("student", 2, 1), ("finetune", 2, 2), ("done", 2, 0)]
    assert cb.total_steps() == 7
    assert [cb.learning_rate_at(s) for s in (1, 2, 3)] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert not cb.meta_active(0) and cb.meta_active(1)
    assert SelfTraining(student_steps=1000).meta_active(601) and not SelfTraining(student_steps=1000).meta_active(600)


# -- in a Trainer --------------------------------------------------------------------------------------------------
class _Watch(pl.Callback):
    """Snapshots of the adapters and the backbone after every step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, SelfTraining))
        self.steps.append({
            "student": {k: v.clone() for k, v in cb.student.state_dict().items()},
            "teacher": {k: v.clone() for k, v in cb.teacher.state_dict().items()},
            "session": cb._session_started,
            "scores": None if cb._teacher_scores is None else cb._teacher_scores.clone(),
        })


def test_sessions_refresh_the_teacher_reinit_the_student_and_train_only_adapters():
    module = few_shot_module()
    backbone = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb, watch = SelfTraining(**TINY_SCHEDULE), _Watch()
    trainer = quiet_trainer([cb, watch], max_steps=50, limit_val_batches=0)
    trainer.fit(module, datamodule=few_shot_data())
    assert trainer.global_step == 7  # stops after the last session, before max_steps
    for n, p in module.model.named_parameters():
        assert torch.equal(p, backbone[n]), n
    s = watch.steps
    assert [x["session"] for x in s] == [0, 1, 1, 1, 2, 2, 2, 2]  # the last batch only sees the schedule's end
    # at a session start the teacher is the adapters as they were (after the previous step) ...
    for start in (1, 4):
        assert_state_dicts_equal(s[start]["teacher"], s[start - 1]["student"])
        assert s[start]["scores"] is not None and s[start]["scores"].shape == (40, 2)
    assert any(not torch.equal(s[1]["teacher"][k], s[4]["teacher"][k]) for k in s[1]["teacher"])
    # ... and the student starts afresh from the session's seeded draw (then takes one step)
    g = torch.Generator().manual_seed(cb.seed + 1)
    first = next(iter(cb.student.adapters.values()))
    fresh = LinearAdapter(first.width, first.bottleneck, first.init_std, first.init)
    fresh.reset(g)
    key = next(iter(cb.student.adapters.keys()))
    assert not torch.equal(s[1]["student"][f"adapters.{key}.w1"], s[0]["student"][f"adapters.{key}.w1"])
    assert (s[1]["student"][f"adapters.{key}.w1"] - fresh.w1).abs().max() < 0.05  # one step away from the draw
    logged = trainer.callback_metrics
    for k in ("phase", "session", "unlabelled_loss", "labelled_loss", "meta_positive_fraction",
              "teacher_confidence", "pseudo_label_accuracy", "weight_sum"):
        assert f"lit_ft/self_training/{k}" in logged, k


def test_meta_weights_change_the_student_step():
    """The same run with confidence weights only (meta_warmup=1) ends with different adapters."""
    def run(**kw):
        torch.manual_seed(0)
        module = few_shot_module()
        cb = SelfTraining(**{**TINY_SCHEDULE, **kw})
        quiet_trainer([cb], max_steps=3, limit_val_batches=0).fit(module, datamodule=few_shot_data())
        return {k: v.clone() for k, v in cb.student.state_dict().items()}

    a, b = run(), run(meta_warmup=1.0)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_session_equals_the_uninterrupted_run(tmp_path):
    # step 2 = inside session 1 (a meta-weighted unlabelled step next); session 2 starts after the resume
    r = fit_and_resume(few_shot_module, lambda: [SelfTraining(**TINY_SCHEDULE)], tmp_path, max_steps=6,
                       make_datamodule=few_shot_data)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    (a,), (b,) = r.callbacks_full, r.callbacks_resumed
    assert_same_state(a.state_dict(), b.state_dict(), "SelfTraining.state_dict()")
    state = a.state_dict()
    assert state["session_started"] == 2 and state["streams"]["unlabelled"]["pos"] > 0
    assert state["streams"]["meta"]["pos"] > 0 and state["teacher_scores"].shape == (40, 2)
    ckpt = torch.load(r.ckpt, weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if "SelfTraining" in k)
    assert saved["session_started"] == 1 and saved["streams"]["unlabelled"]["pos"] == 1


def test_the_student_adapters_are_saved_when_fit_ends(tmp_path):
    from lit_ft.core.adapters import ADAPTER_CONFIG

    cb = SelfTraining(**{**TINY_SCHEDULE, "num_sessions": 0}, save_dir=str(tmp_path / "st"))
    quiet_trainer([cb], max_steps=1, limit_val_batches=0).fit(few_shot_module(), datamodule=few_shot_data())
    assert (tmp_path / "st" / ADAPTER_CONFIG).is_file()


# -- bad inputs ----------------------------------------------------------------------------------------------------
def test_an_unlabelled_pool_smaller_than_a_batch_is_refused_at_setup():
    dm = few_shot_data(unlabelled_batch_size=64)
    with pytest.raises(ValueError, match=r"unlabelled pool has 40 rows.*unlabelled_batch_size`=64"):
        quiet_trainer([SelfTraining(**TINY_SCHEDULE)], max_steps=5).fit(few_shot_module(), datamodule=dm)


def test_k_larger_than_the_data_and_a_class_without_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`shots_per_class`=30 is larger than the data: class 0 .* only 24"):
        few_shot_data(shots_per_class=30).setup("fit")
    import json

    rows = tmp_path / "one_class.jsonl"
    rows.write_text("".join(json.dumps({"text": f"w{i} apples", "label": 1}) + "\n" for i in range(12)))
    with pytest.raises(ValueError, match=r"class 0 \('0'\) has no labelled training rows"):
        few_shot_data(data=str(rows), num_labels=2).setup("fit")


def test_a_module_or_datamodule_it_cannot_drive_is_refused_naming_what_to_use():
    from tests.helpers import ListDataModule

    with pytest.raises(TypeError, match="SelfTrainingModule"):
        quiet_trainer([SelfTraining(**TINY_SCHEDULE)], max_steps=1).fit(PlainHFModule(), datamodule=few_shot_data())
    with pytest.raises(TypeError, match="FewShotDataModule"):
        quiet_trainer([SelfTraining(**TINY_SCHEDULE)], max_steps=1).fit(few_shot_module(),
                                                                         datamodule=ListDataModule(2))


@pytest.mark.parametrize("arg, value", [("teacher_steps", -1), ("student_steps", 0), ("meta_warmup", 1.5),
                                        ("temperature", 0.0), ("lr_schedule", "cosine"), ("soft_labels", 1),
                                        ("confidence_threshold", 1.0), ("meta_epsilon", -1e-6), ("bottleneck", 0)])
def test_bad_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=rf"SelfTraining: `{arg}`"):
        SelfTraining(**{arg: value})


def test_pool_labelling_shows_progress(monkeypatch):
    import lit_ft.callbacks.data_selection.self_training as st

    seen: list[tuple[str, int]] = []

    def recording(iterable, desc, total=None, enabled=True, unit="batch"):
        seen.append((desc, total))
        yield from iterable

    monkeypatch.setattr(st, "progress", recording)
    quiet_trainer([SelfTraining(**TINY_SCHEDULE)], max_steps=50, limit_val_batches=0).fit(
        few_shot_module(), datamodule=few_shot_data(eval_batch_size=16))
    assert seen == [("SelfTraining: teacher labels the unlabelled pool (session 1)", 3),
                    ("SelfTraining: teacher labels the unlabelled pool (session 2)", 3)]


def test_the_module_alone_is_plain_prompt_fine_tuning():
    module = few_shot_module()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer([], max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=few_shot_data())
    assert trainer.global_step == 2 and "train/loss" in trainer.callback_metrics
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    with pytest.raises(ValueError, match="max_grad_norm"):
        few_shot_module(max_grad_norm=-1.0)
