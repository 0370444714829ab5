"""TokenDPO (cDPO's token-level DPO objective) with PreferenceModule: the loss against fp64 references (sequence
aggregation with unit weights = standard DPO; per-position with weights and ignored tokens), the per-token log-probs
through the fused op against full logits, a few Trainer steps raising the held-out margin, resume, exactness under
gradient accumulation and 2-process DDP, and the errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_ft.callbacks import TokenDPO
from lit_ft.callbacks.objectives.token_dpo import token_dpo_terms
from lit_ft.core.batch import BatchKeyError
from lit_ft.core.frozen import frozen_copy
from tests.helpers import PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer
from tests.pairs import PairData, pair_batch, preference_module

BETA = 0.7


def _logps(seed: int, b: int = 5, t: int = 13):
    g = torch.Generator().manual_seed(seed)
    pol = [(-torch.rand(b, t, generator=g, dtype=torch.float64) * 4).requires_grad_() for _ in range(2)]
    ref = [-torch.rand(b, t, generator=g, dtype=torch.float64) * 4 for _ in range(2)]
    masks = [torch.rand(b, t, generator=g) < 0.7 for _ in range(2)]
    masks[1][0] = False  # a rejected row with no target at all
    weights = [torch.rand(b, t, generator=g, dtype=torch.float64) * 2 for _ in range(2)]
    return pol, ref, masks, weights


def test_sequence_aggregation_with_unit_weights_is_standard_dpo():
    """-log σ(β[(Σ log π_c − Σ log π_ref_c) − (Σ log π_r − Σ log π_ref_r)]), summed over pairs: value and gradients."""
    (pc, pr), (rc, rr), (mc, mr), _ = _logps(0)
    out = token_dpo_terms(pc, pr, rc, rr, mc, mr, None, None, BETA, "sequence")
    gc, gr = torch.autograd.grad(out.loss_sum, [pc, pr])
    ref_loss = 0.0
    for i in range(pc.shape[0]):
        chosen = sum(float(pc[i, t] - rc[i, t]) for t in range(pc.shape[1]) if mc[i, t])
        rejected = sum(float(pr[i, t] - rr[i, t]) for t in range(pr.shape[1]) if mr[i, t])
        ref_loss += -float(F.logsigmoid(torch.tensor(BETA * (chosen - rejected), dtype=torch.float64)))
    torch.testing.assert_close(out.loss_sum, torch.tensor(ref_loss, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    u = BETA * (torch.where(mc, pc - rc, 0).sum(1) - torch.where(mr, pr - rr, 0).sum(1))
    s = -BETA * torch.sigmoid(-u).detach()  # d(-log σ(u))/du · du/dlogπ
    torch.testing.assert_close(gc, torch.where(mc, s[:, None], 0).to(gc.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gr, torch.where(mr, -s[:, None], 0).to(gr.dtype), rtol=1e-12, atol=1e-12)
    assert float(out.units) == pc.shape[0]
    torch.testing.assert_close(out.chosen_reward, BETA * torch.where(mc, pc - rc, 0).sum(1).detach())


def test_position_aggregation_matches_an_fp64_loop_with_weights_and_ignored_tokens():
    (pc, pr), (rc, rr), (mc, mr), (wc, wr) = _logps(1)
    out = token_dpo_terms(pc, pr, rc, rr, mc, mr, wc, wr, BETA, "position")
    grads = torch.autograd.grad(out.loss_sum, [pc, pr])
    pc2, pr2 = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    total, units = torch.zeros((), dtype=torch.float64), 0
    for i in range(pc.shape[0]):
        for t in range(pc.shape[1]):
            if not (mc[i, t] or mr[i, t]):
                continue  # neither side has a target here: no term
            u = (wc[i, t] * (pc2[i, t] - rc[i, t]) if mc[i, t] else 0.0) - \
                (wr[i, t] * (pr2[i, t] - rr[i, t]) if mr[i, t] else 0.0)
            total = total - F.logsigmoid(BETA * u)
            units += 1
    ref_grads = torch.autograd.grad(total, [pc2, pr2], allow_unused=True)
    torch.testing.assert_close(out.loss_sum, total, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert float(out.units) == units


def _setup(cb: TokenDPO, module) -> None:
    cb.setup(None, module, "fit")  # type: ignore[arg-type]


def _hand_terms(module, reference, batch, cb: TokenDPO):
    """The policy's and the reference's per-token log-probs from full fp64 logits, then an fp64 loop."""
    def logps(model, side):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
        return lp, labels[:, 1:] != -100

    (pc, mc), (pr, mr) = logps(module.model, "chosen"), logps(module.model, "rejected")
    with torch.no_grad():
        (rc, _), (rr, _) = logps(reference, "chosen"), logps(reference, "rejected")
    wr = batch["rejected_token_weights"][:, 1:].double()
    wc = batch["chosen_token_weights"][:, 1:].double() if cb.use_chosen_weights else torch.ones_like(wr)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(pc.shape[0]):
        if cb.aggregation == "sequence":
            u = (wc[i] * (pc[i] - rc[i]))[mc[i]].sum() - (wr[i] * (pr[i] - rr[i]))[mr[i]].sum()
            total = total - F.logsigmoid(cb.beta * u)
            continue
        for t in range(pc.shape[1]):
            if mc[i, t] or mr[i, t]:
                u = (wc[i, t] * (pc[i, t] - rc[i, t]) if mc[i, t] else 0.0) - \
                    (wr[i, t] * (pr[i, t] - rr[i, t]) if mr[i, t] else 0.0)
                total = total - F.logsigmoid(cb.beta * u)
    return total


@pytest.mark.parametrize("aggregation, chosen_w", [("position", False), ("sequence", True)])
def test_per_token_logps_through_the_fused_op_match_full_logits(aggregation, chosen_w):
    """Value and every parameter gradient of the module's DPO term (fused op, supervised rows only) against full fp64
    logits; odd sizes, ignored tokens, weights, and a rejected side narrower than the chosen side."""
    torch.manual_seed(0)
    module = preference_module().double()
    cb = TokenDPO(beta=0.5, aggregation=aggregation, reference="frozen_copy", use_chosen_weights=chosen_w)
    _setup(cb, module)
    reference = frozen_copy(module.model, "float32").double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a reference that differs from the policy
    cb._frozen.model = reference
    batch = pair_batch(3, batch_size=3, seq_len=11, weights=True)
    for k in ("rejected_input_ids", "rejected_attention_mask", "rejected_labels", "rejected_token_weights"):
        batch[k] = batch[k][:, :9]  # the rejected side narrower: padded to the chosen width inside
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    ours = cb.terms(module, batch).loss_sum
    g_ours = torch.autograd.grad(ours, list(module.model.parameters()))
    b2 = {k: (torch.nn.functional.pad(v, (0, 2), value=(-100 if "labels" in k else 0)) if k.startswith("rejected")
              else v) for k, v in batch.items()}
    hand = _hand_terms(module, reference, b2, cb)
    g_hand = torch.autograd.grad(hand, list(module.model.parameters()))
    torch.testing.assert_close(ours, hand, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_ours, g_hand):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_a_few_trainer_steps_raise_the_preference_margin_and_accuracy():
    torch.manual_seed(0)
    module = preference_module(learning_rate=3e-3)
    data = PairData(n_batches=2, batch_size=4)
    cb = TokenDPO(beta=0.5)
    before = quiet_trainer([cb]).validate(module, datamodule=data, verbose=False)[0]
    trainer = quiet_trainer([cb], max_steps=8, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    after = quiet_trainer([cb]).validate(module, datamodule=data, verbose=False)[0]
    assert before["val/margin"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy at the start
    assert after["val/margin"] > 0.5 and after["val/accuracy"] == 1.0
    assert after["val/loss"] < before["val/loss"] - 0.05
    for name in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert f"lit_ft/token_dpo/{name}" in trainer.callback_metrics


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    r = fit_and_resume(preference_module, lambda: [TokenDPO(beta=0.3)], tmp_path, make_datamodule=PairData)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    (a,), (b,) = r.callbacks_full, r.callbacks_resumed
    assert_state_dicts_equal(a.state_dict()["reference"], b.state_dict()["reference"])


class _GradCapture(pl.Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None},
                       self.path)


def _window_pairs() -> dict:
    """8 pairs whose supervised positions differ a lot between the first and the second half."""
    b = pair_batch(7, batch_size=8, seq_len=12, weights=True)
    b["chosen_labels"][:4, :9] = -100
    b["rejected_labels"][:4, :10] = -100
    return b


def _dpo_grads(tmp_path, aggregation, batch_size, accumulate=1, strategy="auto", devices=1):
    data = _window_pairs()
    batches = [{k: v[i: i + batch_size] for k, v in data.items()} for i in range(0, 8, batch_size)]
    torch.manual_seed(0)
    module = preference_module()
    path = tmp_path / f"{aggregation}-{batch_size}-{accumulate}-{devices}.pt"
    t = pl.Trainer(accelerator="cpu", strategy=strategy, devices=devices, max_steps=1,
                   accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[TokenDPO(aggregation=aggregation, beta=0.5), _GradCapture(path)],
                   use_distributed_sampler=True)
    t.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return torch.load(path)


def _same_grads(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=k)
    assert any(torch.count_nonzero(v) > 0 for v in a.values())


@pytest.mark.parametrize("aggregation", ["position", "sequence"])
def test_exact_under_gradient_accumulation(tmp_path, aggregation):
    """accumulate 4 x 2 pairs == 8 pairs: the units (pairs / aligned positions) are counted over the window."""
    _same_grads(_dpo_grads(tmp_path, aggregation, 2, accumulate=4), _dpo_grads(tmp_path, aggregation, 8))


@pytest.mark.slow
def test_exact_under_two_process_ddp(tmp_path):
    """2 gloo ranks x 4 pairs == 1 process x 8 pairs (rank 0's pairs hold far fewer aligned positions)."""
    _same_grads(_dpo_grads(tmp_path, "position", 4, strategy="ddp_spawn", devices=2),
                _dpo_grads(tmp_path, "position", 8))


def test_adapter_off_reference_is_the_model_without_its_lora():
    torch.manual_seed(0)
    module = preference_module(peft={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    cb = TokenDPO()  # "auto": adapter off on a PEFT model, no copy
    _setup(cb, module)
    assert cb._mode == "adapter_off" and cb.reference_model is None and cb.state_dict()["reference"] is None
    batch = pair_batch(1)
    t = cb.terms(module, batch)  # LoRA's B starts at 0: policy == reference
    assert torch.equal(t.chosen_reward, torch.zeros_like(t.chosen_reward))
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    t = cb.terms(module, batch)
    assert float(t.chosen_reward.abs().sum()) > 0


def test_adapter_off_without_adapters_is_refused():
    with pytest.raises(ValueError, match="reference='adapter_off' needs a PEFT-wrapped model"):
        _setup(TokenDPO(reference="adapter_off"), preference_module())


def test_a_plain_module_is_refused_naming_preference_module():
    with pytest.raises(TypeError, match="PlainHFModule.*lit_ft.modules.PreferenceModule"):
        quiet_trainer([TokenDPO()], max_steps=1).fit(PlainHFModule(), datamodule=PairData())


def test_a_missing_pair_key_is_named_with_its_provider():
    batch = pair_batch(0)
    del batch["rejected_labels"]
    with pytest.raises(BatchKeyError, match=r"(?s)'rejected_labels'.*PreferenceDataModule"):
        TokenDPO().check_batch(batch)


def test_weights_of_the_wrong_shape_are_refused():
    torch.manual_seed(0)
    module = preference_module()
    cb = TokenDPO()
    _setup(cb, module)
    batch = pair_batch(0)
    batch["rejected_token_weights"] = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"batch\['rejected_token_weights'\] must be a float tensor shaped like"):
        cb.terms(module, batch)


def test_without_token_dpo_the_module_trains_the_chosen_responses():
    torch.manual_seed(0)
    module = preference_module()
    batch = pair_batch(0)
    loss = module.training_step(batch, 0)
    logits = module.model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["chosen_labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-6)


def test_resumed_with_another_beta_keeps_the_reference_and_another_reference_is_refused(tmp_path):
    from lit_ft.core.resume import ResumeArgumentError

    r = fit_and_resume(preference_module, lambda: [TokenDPO(beta=0.3)], tmp_path / "a", make_datamodule=PairData)
    ckpt = r.ckpt
    torch.manual_seed(5)  # another initial model: the reference must come from the checkpoint, not from it
    cb = TokenDPO(beta=0.5)
    quiet_trainer([cb], max_steps=3).fit(preference_module(), datamodule=PairData(), ckpt_path=str(ckpt))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("TokenDPO")]
    assert_state_dicts_equal(cb.state_dict()["reference"], state["reference"])
    with pytest.raises(ResumeArgumentError, match="reference"):
        quiet_trainer([TokenDPO(beta=0.3, reference="frozen_copy")], max_steps=3).fit(
            preference_module(), datamodule=PairData(), ckpt_path=str(ckpt))
