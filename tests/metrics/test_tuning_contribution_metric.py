"""TuCo metric: hand references on tiny models (0, 1, c/(1+c), hand-built components), PEFT adapters-off branch vs
a copy of the merged weights, prompt masking / causality, MetricCollection, reset, 2-process gloo sync, and the
fine-tuning-component scaling."""

from __future__ import annotations

import copy

import pytest
import torch
from torchmetrics import MeanMetric, MetricCollection

from lit_ft.core.introspect import find_decoder_layers, find_hf_model
from lit_ft.core.layer_hooks import layer_hooks_for
from lit_ft.metrics._pretrained_branch import AdapterDisabledBranch, CopyBranch, make_branch
from lit_ft.metrics.tuning_contribution import (
    TuningContributionMetric, evaluate_tuning_contribution, prompt_token_mask, scale_fine_tuning_component,
    tuco_from_components, tuning_components,
)

from helpers import random_batch, run_forked, tiny_hf_model


def _tuco(ft, pt, batch, token="last", prompt_only=True, norm=2.0):
    mask = prompt_token_mask(batch["labels"], batch["attention_mask"]) if prompt_only else batch["attention_mask"]
    ptc, ftc, valid = tuning_components(ft, make_branch(ft, pt), batch["input_ids"], batch["attention_mask"], mask,
                                        token)
    return tuco_from_components(ptc, ftc, norm), ptc, ftc, valid


def _perturbed(model, scale=0.05, seed=1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in find_decoder_layers(out):
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


# -- metric math on hand-built components ---------------------------------------------------------------------------
def test_hand_numbers():
    # layer 0: PTC (3, 0), FTC (0, 4); layer 1 adds nothing -> 4 / (3 + 4), in any p-norm (one non-zero coordinate)
    ptc = torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])
    ftc = torch.tensor([[[0.0, 4.0], [0.0, 0.0]]])
    for norm in (1.0, 2.0, float("inf")):
        assert tuco_from_components(ptc, ftc, norm).item() == pytest.approx(4 / 7)
    # L2 vs L1 differ once a sum has two non-zero coordinates: I_FTC = (3, 4) -> 5 (L2) or 7 (L1); I_PTC = (6, 0)
    ftc2 = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
    ptc2 = torch.tensor([[[2.0, 0.0], [4.0, 0.0]]])
    assert tuco_from_components(ptc2, ftc2, 2.0).item() == pytest.approx(5 / 11)
    assert tuco_from_components(ptc2, ftc2, 1.0).item() == pytest.approx(7 / 13)
    # the sums over layers, not the per-layer norms: opposite FTCs cancel (TuCo 0) while every layer has |FTC| = 1
    ptc3 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    ftc3 = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])
    assert tuco_from_components(ptc3, ftc3).item() == 0.0
    m = TuningContributionMetric(num_layers=2, bins=4)
    m.update(torch.cat([ptc, ptc3]), torch.cat([ftc, ftc3]))
    out = m.compute()
    assert out["tuco"].item() == pytest.approx((4 / 7 + 0) / 2)
    assert out["tuco_std"].item() == pytest.approx(4 / 7 / 2)
    assert out["prompts"].item() == 2
    torch.testing.assert_close(out["ptc_layer"], torch.tensor([(3 + 1) / 2, (0 + 1) / 2]))
    torch.testing.assert_close(out["ftc_layer"], torch.tensor([(4 + 1) / 2, (0 + 1) / 2]))
    torch.testing.assert_close(out["histogram"], torch.tensor([1.0, 0.0, 1.0, 0.0]))  # 0 -> bin 0, 4/7 -> bin 2


def test_both_sums_zero_is_zero_and_one_lands_in_the_last_bin():
    m = TuningContributionMetric(num_layers=1, bins=5)
    m.update(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3))
    m.update(torch.zeros(1, 1, 3), torch.ones(1, 1, 3))
    out = m.compute()
    assert out["tuco"].item() == pytest.approx(0.5)
    torch.testing.assert_close(out["histogram"], torch.tensor([1.0, 0, 0, 0, 1.0]))


def test_metric_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_layers"):
        TuningContributionMetric(num_layers=0)
    with pytest.raises(ValueError, match="norm"):
        TuningContributionMetric(num_layers=2, norm=0.5)
    with pytest.raises(ValueError, match="bins"):
        TuningContributionMetric(num_layers=2, bins=0)
    with pytest.raises(ValueError, match="ptc"):
        TuningContributionMetric(num_layers=2).update(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


# -- hand references on tiny models -----------------------------------------------------------------------------------
def test_identical_models_give_zero():
    model = tiny_hf_model()
    tuco, ptc, ftc, valid = _tuco(model, copy.deepcopy(model), random_batch(4, 12))
    assert valid.all()
    assert torch.equal(ftc, torch.zeros_like(ftc)) and ptc.abs().sum() > 0
    assert torch.equal(tuco, torch.zeros(4))


def _zero_branch_copy(model):
    """A pre-trained copy whose layers add nothing to the stream: attention and MLP write through zero matrices."""
    pt = copy.deepcopy(model)
    with torch.no_grad():
        for layer in find_decoder_layers(pt):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return pt


def test_zero_contribution_pre_trained_layers_give_one():
    ft = _perturbed(tiny_hf_model())
    tuco, ptc, ftc, _ = _tuco(ft, _zero_branch_copy(tiny_hf_model()), random_batch(4, 12))
    assert torch.equal(ptc, torch.zeros_like(ptc)) and ftc.abs().sum() > 0
    assert torch.equal(tuco, torch.ones(4))


@pytest.mark.parametrize("c", [1.0, 3.0])
def test_scaled_mlp_gives_c_over_one_plus_c(c):
    """Attention writes nothing (o_proj = 0) in both models and the fine-tuned down_proj is (1 + c) x the pre-trained
    one: at every layer f_FT(x) - x = (1 + c) m(x) and f_PT(x) - x = m(x), so FTC_l = c PTC_l and TuCo = c / (1 + c)
    for every prompt, and the per-layer FTC magnitudes are c x the PTC ones."""
    pt = tiny_hf_model()
    with torch.no_grad():
        for layer in find_decoder_layers(pt):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.mul_(10.0)  # a visible update
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        for layer in find_decoder_layers(ft):
            layer.mlp.down_proj.weight.mul_(1.0 + c)
    tuco, ptc, ftc, _ = _tuco(ft, pt, random_batch(4, 12))
    torch.testing.assert_close(tuco, torch.full((4,), c / (1 + c)), rtol=1e-5, atol=1e-5)
    m = TuningContributionMetric(num_layers=2)
    m.update(ptc, ftc)
    out = m.compute()
    torch.testing.assert_close(out["ftc_layer"], c * out["ptc_layer"], rtol=1e-5, atol=1e-6)


def test_the_stream_is_the_fine_tuned_one():
    """Layer 0 is unchanged and layer 1 fine-tuned: layer 1's PTC is the pre-trained layer on the *fine-tuned* stream
    (here equal to the pre-trained stream since layer 0 is shared), and the final stream is the fine-tuned model's."""
    pt = tiny_hf_model()
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        find_decoder_layers(ft)[1].mlp.down_proj.weight.mul_(3.0)
    batch = random_batch(2, 10)
    _, ptc, ftc, _ = _tuco(ft, pt, batch, prompt_only=False)
    assert torch.equal(ftc[:, 0], torch.zeros_like(ftc[:, 0])) and ftc[:, 1].abs().sum() > 0
    # x_L = x_0 + sum_l (PTC_l + FTC_l) at the read token = the fine-tuned trunk's last layer output there
    with torch.no_grad():
        hs = ft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states
    am = batch["attention_mask"].bool()
    last = torch.where(am, torch.arange(am.shape[1]), -1).amax(1)
    rows = torch.arange(2)
    x0 = hs[0][rows, last]
    x_final = x0 + (ptc + ftc).sum(1)
    emb = ft.model.embed_tokens(batch["input_ids"])[rows, last]
    torch.testing.assert_close(x0, emb)
    ref = _trunk_last_layer_output(ft, batch)[rows, last]
    torch.testing.assert_close(x_final, ref, rtol=1e-5, atol=1e-5)


def _trunk_last_layer_output(model, batch):
    out = {}
    h = find_decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: out.setdefault("x", o))
    try:
        with torch.no_grad():
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        h.remove()
    x = out["x"]
    return x if isinstance(x, torch.Tensor) else x[0]


def test_prompt_last_token_equals_running_the_prompt_alone_and_padding_is_ignored():
    pt = tiny_hf_model()
    ft = _perturbed(pt)
    batch = random_batch(4, 14, prompt_len=5)  # rows 0 and 2 right-padded
    tuco, _, _, _ = _tuco(ft, pt, batch)
    for b in range(4):
        alone = {"input_ids": batch["input_ids"][b : b + 1, :5], "attention_mask": torch.ones(1, 5, dtype=torch.long),
                 "labels": torch.full((1, 5), -100)}
        t, _, _, _ = _tuco(ft, pt, alone)
        torch.testing.assert_close(t, tuco[b : b + 1], rtol=1e-5, atol=1e-6)


def test_prompt_token_mask():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, -100], [1, 2, 3, -100, -100]])
    am = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(prompt_token_mask(labels, am), expected)


def test_mean_token_is_the_mean_of_single_position_components():
    pt = tiny_hf_model()
    ft = _perturbed(pt)
    batch = random_batch(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 1:4] = True
    branch = make_branch(ft, pt)
    ptc, ftc, _ = tuning_components(ft, branch, batch["input_ids"], batch["attention_mask"], mask, "mean")
    singles = []
    for t in range(1, 4):
        one = torch.zeros_like(mask)
        one[:, t] = True
        singles.append(tuning_components(ft, branch, batch["input_ids"], batch["attention_mask"], one, "last"))
    torch.testing.assert_close(ptc, sum(s[0] for s in singles) / 3)
    torch.testing.assert_close(ftc, sum(s[1] for s in singles) / 3)


def test_a_row_without_prompt_is_invalid():
    pt = tiny_hf_model()
    batch = random_batch(2, 8)
    batch["labels"][1] = batch["input_ids"][1]  # supervised from the first token: no prompt
    _, _, _, valid = _tuco(_perturbed(pt), pt, batch)
    assert valid.tolist() == [True, False]


# -- PEFT: the same layers with the adapters off == a copy of the base, against the merged weights ------------------
def test_adapter_branch_equals_copy_branch_on_merged_weights():
    import peft

    base = tiny_hf_model()
    pre_trained = copy.deepcopy(base)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False)).eval()
    merged = copy.deepcopy(lora).merge_and_unload()
    batch = random_batch(4, 12)
    via_adapters, p1, f1, _ = _tuco(lora, None, batch)
    via_copy, p2, f2, _ = _tuco(merged, pre_trained, batch)
    assert via_adapters.min() > 0.01
    torch.testing.assert_close(via_adapters, via_copy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-5)
    # the adapters are on again, requires_grad untouched, no hook left
    assert all(not m.disable_adapters for m in lora.modules() if hasattr(m, "_disable_adapters"))
    assert layer_hooks_for(find_hf_model(lora), create=False) is None


def test_adapter_branch_errors():
    import peft

    with pytest.raises(ValueError, match="PEFT adapter"):
        make_branch(tiny_hf_model(), None)
    lora = peft.get_peft_model(tiny_hf_model(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                init_lora_weights=False))
    lora.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        _tuco(lora, None, random_batch(2, 8))
    assert isinstance(make_branch(lora, None), AdapterDisabledBranch)
    assert isinstance(make_branch(lora, tiny_hf_model()), CopyBranch)


def test_token_argument_is_checked():
    m = tiny_hf_model()
    with pytest.raises(ValueError, match="token"):
        tuning_components(m, make_branch(m, m), torch.ones(1, 4, dtype=torch.long), token="first")


# -- composition, reset, DDP ----------------------------------------------------------------------------------------
def test_metric_collection_and_reset():
    pt = tiny_hf_model()
    _, ptc, ftc, _ = _tuco(_perturbed(pt), pt, random_batch(4, 12))
    coll = MetricCollection({"tuco": TuningContributionMetric(num_layers=2), "mean": MeanMetric()})
    coll["tuco"].update(ptc, ftc)
    coll["mean"].update(torch.tensor([1.0, 3.0]))
    out = coll.compute()
    assert out["mean"].item() == 2.0
    assert out["tuco"].item() == pytest.approx(tuco_from_components(ptc, ftc).mean().item(), rel=1e-6)
    assert out["prompts"].item() == 4 and out["ptc_layer"].shape == (2,)
    coll.reset()
    assert coll["tuco"].count.item() == 0 and coll["tuco"].histogram.sum().item() == 0
    assert coll["tuco"].ptc_layer_sum.abs().sum().item() == 0


def _ddp_worker(rank: int, init_file: str, ptc: torch.Tensor, ftc: torch.Tensor, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m = TuningContributionMetric(num_layers=ptc.shape[1], bins=7)
        rows = slice(0, 1) if rank == 0 else slice(1, None)  # unequal shares: 1 and 4 prompts
        m.update(ptc[rows], ftc[rows])
        out = m.compute()
        if rank == 0:
            torch.save(out, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_compute_what_one_process_computes(tmp_path):
    g = torch.Generator().manual_seed(0)
    ptc, ftc = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    single = TuningContributionMetric(num_layers=3, bins=7)
    single.update(ptc, ftc)
    expected = single.compute()
    out_file = str(tmp_path / "out.pt")
    run_forked(_ddp_worker, nprocs=2, args=(str(tmp_path / "init"), ptc, ftc, out_file))
    got = torch.load(out_file)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)


# -- the fine-tuning-component scaling ------------------------------------------------------------------------------
def test_scaling_alpha_one_is_fine_tuned_alpha_zero_is_pre_trained_layers():
    pt = tiny_hf_model()
    ft = _perturbed(pt, scale=0.1)  # decoder layers only: embeddings, final norm and head are shared
    ids = random_batch(2, 10)["input_ids"]
    with torch.no_grad():
        ft_logits, pt_logits = ft(input_ids=ids).logits, pt(input_ids=ids).logits
        with scale_fine_tuning_component(ft, pt, alpha=1.0):
            one = ft(input_ids=ids, use_cache=False).logits
        with scale_fine_tuning_component(ft, pt, alpha=0.0):
            zero = ft(input_ids=ids, use_cache=False).logits
        with scale_fine_tuning_component(ft, pt, alpha=2.0):
            two = ft(input_ids=ids, use_cache=False).logits
        after = ft(input_ids=ids).logits
    torch.testing.assert_close(one, ft_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero, pt_logits, rtol=1e-5, atol=1e-5)
    assert (two - ft_logits).abs().max() > 1e-3  # amplified fine-tuning changes the output
    assert torch.equal(after, ft_logits) and layer_hooks_for(ft, create=False) is None  # hook removed


def test_scaling_under_peft_alpha_zero_is_the_base_model():
    import peft

    base = tiny_hf_model()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).eval()
    ids = random_batch(2, 10)["input_ids"]
    with torch.no_grad():
        with lora.disable_adapter():
            base_logits = lora(input_ids=ids).logits
        with scale_fine_tuning_component(lora, None, alpha=0.0):
            zero = lora(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(zero, base_logits, rtol=1e-5, atol=1e-5)


def test_scaling_refuses_a_kv_cache():
    pt = tiny_hf_model()
    ft = _perturbed(pt)
    with pytest.raises(ValueError, match="use_cache=False"):
        with scale_fine_tuning_component(ft, pt, alpha=0.5), torch.no_grad():
            ft(input_ids=random_batch(1, 6)["input_ids"], use_cache=True)


def test_evaluate_tuning_contribution_matches_the_metric():
    pt = tiny_hf_model()
    ft = _perturbed(pt)
    batches = [random_batch(3, 12, seed=s) for s in range(3)]
    out = evaluate_tuning_contribution(pt, ft, batches, max_batches=2)
    per = torch.cat([_tuco(ft, pt, b)[0] for b in batches[:2]])
    assert out["prompts"] == 6 and len(out["per_prompt"]) == 6
    torch.testing.assert_close(torch.tensor(out["per_prompt"]), per)
    assert out["tuco"] == pytest.approx(per.mean().item(), rel=1e-5)
    assert len(out["ftc_layer"]) == 2 and sum(out["histogram"]) == 6


@pytest.mark.parametrize("ft_dtype, copy_dtype", [(torch.float32, "bfloat16"), (torch.bfloat16, "float32")])
def test_a_copy_in_another_dtype_gets_every_input_cast(ft_dtype, copy_dtype):
    """The copy's layer receives the stream, the RoPE cos/sin and the mask in its own dtype (a bfloat16 copy of a
    float32 run failed in attention before the keyword arguments were cast); the same weights give a TuCo near 0
    (rounding only)."""
    from lit_ft.core.frozen import frozen_copy

    model = tiny_hf_model()
    pt = frozen_copy(model, copy_dtype)
    ft = copy.deepcopy(model).to(ft_dtype)
    out = evaluate_tuning_contribution(pt, ft, [random_batch(3, 12)])
    assert out["prompts"] == 3 and 0.0 <= out["tuco"] < 0.05
