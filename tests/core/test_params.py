"""Tests for lit_ft.core.params (name-keyed parameter plans, composition, masks) and the optimizer helpers of
lit_ft.core.optim that act on plans (param groups by name, optimizer state, layouts)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from lit_ft.core.optim import (
    DEFAULT_NO_DECAY_PATTERNS,
    apply_optimizer_layout,
    build_param_groups,
    masked_state_reset,
    optimizer_layout,
    rebuild_param_groups,
    reset_optimizer_state,
    verify_optimizer,
)
from lit_ft.core.params import (
    FROZEN,
    MASK,
    TRAINABLE,
    ParamPatternError,
    ParamPlan,
    ParamPlanConflict,
    PlanEntry,
    apply_plan,
    compose,
    mask_gradients,
    pack_mask,
    reproject_masked,
    select_param_names,
    snapshot_masked,
    unpack_mask,
)


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.LayerNorm(7), nn.Linear(7, 3))


def llama_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, plan=None, ref=None) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    if plan is not None:
        mask_gradients(model, plan)
    opt.step()
    if ref is not None:
        reproject_masked(model, plan, ref)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


# ---------------------------------------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------------------------------------


def test_glob_regex_exact_and_single_string(llama):
    names = select_param_names(llama, ["model.layers.1.*"])
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert len(names) == 9
    assert select_param_names(llama, "re:.*layers\\.[01]\\.self_attn\\.q_proj\\.weight") == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    # regex is fullmatch: a bare fragment does not match
    with pytest.raises(ParamPatternError):
        select_param_names(llama, "re:q_proj")
    assert select_param_names(llama, "lm_head.weight") == ["lm_head.weight"]
    # model order, no duplicates when patterns overlap
    both = select_param_names(llama, ["*norm*", "model.norm.weight"])
    assert both == [n for n, _ in llama.named_parameters() if "norm" in n]


def test_no_match_error_names_pattern_and_available_names(llama):
    with pytest.raises(ParamPatternError) as ei:
        ParamPlan.trainable_only(llama, ["lm_head.weight", "model.layers.7.*"], owner="FreezeLayers")
    msg = str(ei.value)
    assert "'model.layers.7.*'" in msg and "FreezeLayers" in msg
    assert "model.embed_tokens.weight" in msg  # a few available names are listed
    with pytest.raises(ParamPatternError, match=r"model\.layers\.0\.\*"):  # module name instead of param name
        ParamPlan.freeze(llama, "model.layers.0")
    with pytest.raises(ParamPatternError, match="invalid regular expression"):
        ParamPlan.freeze(llama, "re:(")
    with pytest.raises(TypeError, match="patterns"):
        ParamPlan.freeze(llama, 3)  # type: ignore[arg-type]


def test_tied_alias_resolves_to_canonical_name():
    m = Tied()
    assert [n for n, _ in m.named_parameters()] == ["emb.weight", "body.weight", "body.bias"]
    plan = ParamPlan.trainable_only(m, "head.weight", owner="TrainOnly")
    assert plan["emb.weight"].state == TRAINABLE
    assert plan["body.weight"].state == FROZEN
    masks = ParamPlan.from_masks({"head.weight": torch.ones(10, 4, dtype=torch.bool).tril()}, model=m)
    assert list(masks) == ["emb.weight"] and masks["emb.weight"].state == MASK


# ---------------------------------------------------------------------------------------------------------------
# plans and composition
# ---------------------------------------------------------------------------------------------------------------


def test_trainable_only_and_freeze(seq):
    a = ParamPlan.trainable_only(seq, ["3.*"], owner="A")
    assert a.names(TRAINABLE) == ["3.weight", "3.bias"]
    assert a.names(FROZEN) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert a["0.weight"].restricted_by == ("A",)
    f = ParamPlan.freeze(seq, "*bias", owner="B")
    assert list(f) == ["0.bias", "2.bias", "3.bias"]  # other names unconstrained
    c = compose([a, f])
    assert c.owner == "A+B"
    assert c.names(TRAINABLE) == ["3.weight"]
    assert set(c.names(FROZEN)) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.bias"}
    assert c["3.bias"].restricted_by == ("B",)


def test_mask_and_and_normalisation(seq):
    m1 = torch.zeros(7, 5, dtype=torch.bool)
    m1[:4] = True
    m2 = torch.zeros(7, 5, dtype=torch.bool)
    m2[:, :2] = True
    a = ParamPlan.from_masks({"0.weight": m1}, owner="LT-SFT", model=seq)
    b = ParamPlan.from_masks({"0.weight": m2, "3.weight": torch.ones(3, 7, dtype=torch.bool)}, owner="HFT")
    assert b["3.weight"].state == TRAINABLE  # all-True mask is stored as trainable
    c = compose([a, b])
    assert c["0.weight"].state == MASK
    assert torch.equal(c["0.weight"].mask, m1 & m2)
    assert int(c["0.weight"].mask.sum()) == 8
    assert c["0.weight"].restricted_by == ("LT-SFT", "HFT")
    # disjoint masks on a tensor nobody requires -> frozen
    d = ParamPlan.from_masks({"0.weight": ~m1}, owner="D")
    assert compose([a, d])["0.weight"].state == FROZEN
    # mask and trainable -> mask
    t = ParamPlan.trainable_only(seq, "0.*", owner="T")
    assert torch.equal(compose([t, a])["0.weight"].mask, m1)


def test_conflict_required_vs_frozen_names_both_owners(llama):
    prompt = ParamPlan.trainable_only(llama, "model.embed_tokens.weight", owner="PromptTuning", required=True)
    assert prompt["model.embed_tokens.weight"].required
    freezer = ParamPlan.freeze(llama, "*embed_tokens*", owner="FreezeLayers")
    with pytest.raises(ParamPlanConflict) as ei:
        compose([prompt, freezer])
    msg = str(ei.value)
    assert "PromptTuning" in msg and "FreezeLayers" in msg and "model.embed_tokens.weight" in msg
    assert ei.value.required_by == ("PromptTuning",) and ei.value.restricted_by == ("FreezeLayers",)
    # the requirement survives an earlier composition: owners are still named
    other = ParamPlan.freeze(llama, "lm_head.weight", owner="Other")
    with pytest.raises(ParamPlanConflict, match="PromptTuning.*FreezeLayers"):
        compose([compose([prompt, other]), freezer])
    # composing without a freezer is fine and keeps the mark
    assert compose([prompt, other])["model.embed_tokens.weight"].required_by == ("PromptTuning",)


def test_conflict_required_with_empty_mask_and(seq):
    m = torch.zeros(7, 5, dtype=torch.bool)
    m[0, 0] = True
    a = ParamPlan.from_masks({"0.weight": m}, owner="Sparse", required=True)
    b = ParamPlan.from_masks({"0.weight": ~m}, owner="Green")
    with pytest.raises(ParamPlanConflict) as ei:
        compose([a, b])
    assert "Sparse" in str(ei.value) and "Green" in str(ei.value) and "'0.weight'" in str(ei.value)
    # non-empty AND with a required tensor is fine
    b2 = ParamPlan.from_masks({"0.weight": m | (~m & (torch.rand(7, 5) > 0.5))}, owner="Green")
    assert compose([a, b2])["0.weight"].required_by == ("Sparse",)


def test_plan_input_errors(seq):
    with pytest.raises(TypeError, match="torch.bool"):
        ParamPlan.from_masks({"0.weight": torch.ones(7, 5)}, owner="X")
    with pytest.raises(ValueError, match=r"shape \(5, 7\).*\(7, 5\)"):
        ParamPlan.from_masks({"0.weight": torch.ones(5, 7, dtype=torch.bool)}, owner="X", model=seq)
    with pytest.raises(KeyError, match="'0.weigth'"):
        ParamPlan.from_masks({"0.weigth": torch.ones(7, 5, dtype=torch.bool)}, owner="X", model=seq)
    with pytest.raises(ValueError, match="'trainable', 'frozen'"):
        ParamPlan({"0.weight": "train"}, owner="X")
    with pytest.raises(TypeError, match="owner"):
        ParamPlan({}, owner="")
    with pytest.raises(ParamPlanConflict, match="required"):
        ParamPlan({"0.weight": FROZEN}, owner="X", required=["0.weight"])
    with pytest.raises(ValueError, match="at least one"):
        compose([])
    with pytest.raises(KeyError, match="nope"):
        apply_plan(seq, ParamPlan({"nope": FROZEN}, owner="X"))
    with pytest.raises(ValueError, match="unlisted"):
        apply_plan(seq, ParamPlan({}, owner="X"), unlisted="maybe")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# apply, mask enforcement, re-projection with real AdamW steps
# ---------------------------------------------------------------------------------------------------------------


def test_apply_plan_summary_and_unlisted(seq):
    m = torch.zeros(7, 5, dtype=torch.bool)
    m[:, 0] = True
    plan = compose([ParamPlan.trainable_only(seq, "0.*", owner="A"), ParamPlan.from_masks({"0.weight": m}, owner="B")])
    s = apply_plan(seq, plan)
    assert seq[0].weight.requires_grad and seq[0].bias.requires_grad
    assert not seq[3].weight.requires_grad and not seq[2].bias.requires_grad
    assert s.total == sum(p.numel() for p in seq.parameters()) == 35 + 7 + 14 + 21 + 3
    assert s.trainable == 7 + 7  # 7 mask elements + full bias
    assert s.fraction == pytest.approx(14 / 80)
    assert s.by_tensor["0.weight"].state == MASK and s.by_tensor["0.weight"].trainable == 7
    # a plan that names only some tensors keeps the others ("keep") or forces them
    seq[3].weight.requires_grad_(False)
    only = ParamPlan.freeze(seq, "0.bias", owner="F")
    s2 = apply_plan(seq, only)
    assert not seq[0].bias.requires_grad and not seq[3].weight.requires_grad and seq[0].weight.requires_grad
    assert s2.by_tensor["3.weight"].state == "unlisted"
    apply_plan(seq, only, unlisted="trainable")
    assert seq[3].weight.requires_grad and not seq[0].bias.requires_grad


def _sparse_plan(model: nn.Module) -> tuple[ParamPlan, dict[str, torch.Tensor]]:
    """Layer 1 trainable; q_proj of layer 1 and lm_head element-masked; everything else frozen."""
    g = torch.Generator().manual_seed(1)
    masks = {
        "model.layers.1.self_attn.q_proj.weight": torch.rand(32, 32, generator=g) > 0.7,
        "lm_head.weight": torch.rand(128, 32, generator=g) > 0.5,
    }
    a = ParamPlan.trainable_only(model, ["model.layers.1.*", "lm_head.weight"], owner="FreezeLayers")
    b = ParamPlan.from_masks(masks, owner="LT-SFT", model=model)
    return compose([a, b]), masks


def _run(model, plan, reproject: bool, compact: bool = False, steps: int = 3):
    apply_plan(model, plan)
    ref = snapshot_masked(model, plan, compact=compact) if reproject else None
    opt = torch.optim.AdamW(build_param_groups(model, plan, 1e-2, 0.1), lr=1e-2, weight_decay=0.1)
    before = params_of(model)
    for s in range(steps):
        llama_step(model, opt, s, plan, ref)
    return before, params_of(model), opt


@pytest.mark.parametrize("compact", [False, True])
def test_frozen_and_masked_out_are_bit_identical_with_reprojection(llama, compact):
    plan, masks = _sparse_plan(llama)
    twin = copy.deepcopy(llama)
    before, after, opt = _run(llama, plan, reproject=True, compact=compact)
    for n in before:
        entry = plan.get(n)
        if entry.state == FROZEN:
            assert torch.equal(before[n], after[n]), n
        elif entry.state == MASK:
            m = masks[n]
            assert torch.equal(before[n][~m], after[n][~m]), n
            assert not torch.equal(before[n][m], after[n][m]), n  # the allowed elements did train
        else:
            assert not torch.equal(before[n], after[n]), n
    # the same run without re-projection: weight decay moves masked-out elements although their grads are zero
    _, after_np, _ = _run(twin, plan, reproject=False)
    for n, m in masks.items():
        moved = before[n][~m] != after_np[n][~m]
        assert moved.any(), n


def test_mask_gradients_zeroes_masked_and_drops_frozen_grads(llama):
    plan, masks = _sparse_plan(llama)
    for p in llama.parameters():  # everything requires grad: mask_gradients must still enforce the plan
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 8))
    llama(input_ids=ids, labels=ids).loss.backward()
    mask_gradients(llama, plan)
    named = dict(llama.named_parameters())
    for n, m in masks.items():
        g = named[n].grad
        assert torch.all(g[~m] == 0) and g[m].abs().sum() > 0
    assert named["model.layers.0.mlp.up_proj.weight"].grad is None
    assert named["model.layers.1.mlp.up_proj.weight"].grad is not None


def test_reproject_errors(seq):
    m = torch.zeros(7, 5, dtype=torch.bool)
    m[0] = True
    plan = ParamPlan.from_masks({"0.weight": m}, owner="X")
    with pytest.raises(KeyError, match="snapshot_masked"):
        reproject_masked(seq, plan, {})
    with pytest.raises(ValueError, match="neither"):
        reproject_masked(seq, plan, {"0.weight": torch.zeros(3)})
    snap = snapshot_masked(seq, plan, compact=True)
    assert snap["0.weight"].shape == (30,)  # only the masked-out elements
    with torch.no_grad():
        seq[0].weight.add_(1.0)
    reproject_masked(seq, plan, snap)
    assert torch.equal(seq[0].weight[~m], snap["0.weight"])


# ---------------------------------------------------------------------------------------------------------------
# param groups
# ---------------------------------------------------------------------------------------------------------------


def test_build_param_groups_decay_split_and_lr_overrides(llama):
    plan = ParamPlan.freeze(llama, "model.layers.0.*", owner="FreezeLayers")
    groups = build_param_groups(
        llama,
        plan,
        base_lr=1e-3,
        weight_decay=0.1,
        lr_overrides={"lm_head.weight": 5e-3, "model.layers.1.mlp.*": 2e-3, "*down_proj*": 9.0},
        lr_multipliers={"model.layers.1.*": 0.5},
    )
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert not any(n.startswith("model.layers.0.") for n in by_name)  # only trainable tensors
    assert len(by_name) == sum(len(g["params"]) for g in groups) == 21 - 9
    assert by_name["lm_head.weight"] == (5e-3, 0.1)
    assert by_name["model.embed_tokens.weight"] == (1e-3, 0.1)
    assert by_name["model.norm.weight"] == (1e-3, 0.0)
    assert by_name["model.layers.1.input_layernorm.weight"] == (1e-3 * 0.5, 0.0)
    assert by_name["model.layers.1.self_attn.q_proj.weight"] == (1e-3 * 0.5, 0.1)
    # first matching pattern in insertion order wins, then the multiplier applies
    assert by_name["model.layers.1.mlp.up_proj.weight"] == (2e-3 * 0.5, 0.1)
    assert by_name["model.layers.1.mlp.down_proj.weight"] == (2e-3 * 0.5, 0.1)
    # groups are unique by (lr, wd), params and names line up
    ids = [g["group_id"] for g in groups]
    assert len(ids) == len(set(ids))
    named = dict(llama.named_parameters())
    for g in groups:
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"]))
    opt = torch.optim.AdamW(groups)  # accepted by torch as is
    assert len(opt.param_groups) == len(groups)
    verify_optimizer(opt, llama, plan)


def test_build_param_groups_exact_name_beats_pattern_and_errors(seq):
    groups = build_param_groups(
        seq, None, 0.1, 0.0, lr_overrides={"*weight": 0.2, "3.weight": 0.3}, no_decay_patterns=()
    )
    lr = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lr == {"0.weight": 0.2, "0.bias": 0.1, "2.weight": 0.2, "2.bias": 0.1, "3.weight": 0.3, "3.bias": 0.1}
    with pytest.raises(ParamPatternError, match="lr_overrides.*'4.weight'"):
        build_param_groups(seq, None, 0.1, 0.0, lr_overrides={"4.weight": 1.0})
    with pytest.raises(ValueError, match="base_lr"):
        build_param_groups(seq, None, -1.0, 0.0)
    with pytest.raises(TypeError, match=r"lr_multipliers\['\*'\]"):
        build_param_groups(seq, None, 0.1, 0.0, lr_multipliers={"*": "half"})  # type: ignore[dict-item]
    assert "*bias" in DEFAULT_NO_DECAY_PATTERNS


def test_rebuild_param_groups_mid_run(llama):
    plan1 = ParamPlan.trainable_only(llama, ["model.layers.0.*", "lm_head.weight"], owner="Phase1")
    apply_plan(llama, plan1)
    opt = torch.optim.AdamW(build_param_groups(llama, plan1, 1e-2, 0.1))
    for s in range(2):
        llama_step(llama, opt, s)
    named = dict(llama.named_parameters())
    head = named["lm_head.weight"]
    l0, l1 = named["model.layers.0.mlp.up_proj.weight"], named["model.layers.1.mlp.up_proj.weight"]
    head_state = {k: v.clone() for k, v in opt.state[head].items()}
    assert opt.state[l0] and not opt.state.get(l1)
    n_groups = len(opt.param_groups)

    # LMFlow #726: switching requires_grad alone leaves layer 1 out of the optimizer
    plan2 = ParamPlan.trainable_only(llama, ["model.layers.1.*", "lm_head.weight"], owner="Phase2")
    apply_plan(llama, plan2)
    with pytest.raises(RuntimeError, match="missing from the optimizer.*model.layers.1"):
        verify_optimizer(opt, llama, plan2)

    report = rebuild_param_groups(opt, llama, plan2, 1e-2, 0.1)
    assert "lm_head.weight" in report.kept
    assert set(report.removed) == {n for n in named if n.startswith("model.layers.0.")}
    assert set(report.added) == {n for n in named if n.startswith("model.layers.1.")}
    assert report.groups_added == []  # layer 1 joins the existing (lr, wd) groups
    assert len(opt.param_groups) == n_groups
    # state kept / dropped / empty
    for k, v in head_state.items():
        assert torch.equal(opt.state[head][k], v)
    assert l0 not in opt.state and l1 not in opt.state
    # no duplicates, names follow params
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    for g in opt.param_groups:
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"]))
    verify_optimizer(opt, llama, plan2)

    l0_before, l1_before, head_before = l0.detach().clone(), l1.detach().clone(), head.detach().clone()
    llama_step(llama, opt, 7)
    assert not torch.equal(l1, l1_before)  # newly trainable tensor updated by the next step
    assert torch.equal(l0, l0_before)  # newly frozen tensor not touched (no decay either)
    assert not torch.equal(head, head_before)
    assert opt.state[l1]["step"].item() == 1 and opt.state[head]["step"].item() == 3


def test_rebuild_adds_group_removes_duplicates_and_follows_scheduler(seq):
    plan1 = ParamPlan.trainable_only(seq, ["0.weight", "3.weight"], owner="P1")
    apply_plan(seq, plan1)
    opt = torch.optim.SGD(build_param_groups(seq, plan1, 0.1, 0.01), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    x = torch.randn(4, 5)
    for _ in range(2):
        opt.zero_grad()
        seq(x).sum().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    opt.param_groups[0]["params"].append(seq[3].weight)  # a duplicate, as after a bad resume (FTS #30)
    opt.param_groups[0]["param_names"].append("3.weight")

    plan2 = ParamPlan.trainable_only(seq, ["0.*", "3.weight"], owner="P2")
    report = rebuild_param_groups(opt, seq, plan2, 0.1, 0.01)
    assert report.duplicates_removed == ["3.weight"]
    assert report.added == ["0.bias"] and report.groups_added == [1]
    new = opt.param_groups[1]
    assert new["param_names"] == ["0.bias"] and new["weight_decay"] == 0.0
    assert new["initial_lr"] == pytest.approx(0.1) and new["lr"] == pytest.approx(0.025)  # follows the schedule
    assert new["momentum"] == 0.9  # optimizer defaults filled in
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 3

    # a user optimizer without param_names and without group ids: new tensors join the group with equal lr/wd
    seq2 = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    seq2[1].requires_grad_(False)
    opt2 = torch.optim.AdamW([p for p in seq2.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    plan3 = ParamPlan.trainable_only(seq2, "*", owner="All")
    rep = rebuild_param_groups(opt2, seq2, plan3, 0.1, 0.0)
    assert rep.groups_added == [] and len(opt2.param_groups[0]["params"]) == 4
    assert "param_names" not in opt2.param_groups[0]


# ---------------------------------------------------------------------------------------------------------------
# optimizer state surgery
# ---------------------------------------------------------------------------------------------------------------


def test_reset_optimizer_state_clears_exactly_the_chosen_tensors(llama):
    opt = torch.optim.AdamW(build_param_groups(llama, None, 1e-3, 0.1))
    llama_step(llama, opt, 0)
    named = dict(llama.named_parameters())
    saved = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in named.items()}
    chosen = {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    n = reset_optimizer_state(opt, ["lm_head.weight", "*q_proj*"], model=llama)
    assert n == 3
    for name, p in named.items():
        if name in chosen:
            assert p not in opt.state
        else:
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(opt.state[p][k], saved[name][k]) for k in saved[name])
    # names without model resolve through the groups' param_names; tensors work too
    assert reset_optimizer_state(opt, "model.norm.weight") == 1
    assert reset_optimizer_state(opt, [named["model.embed_tokens.weight"]]) == 1
    assert reset_optimizer_state(opt, [named["model.embed_tokens.weight"]]) == 0  # nothing left to clear
    # the next step starts fresh for reset tensors only
    llama_step(llama, opt, 1)
    assert opt.state[named["lm_head.weight"]]["step"].item() == 1
    assert opt.state[named["model.layers.0.mlp.up_proj.weight"]]["step"].item() == 2
    with pytest.raises(ValueError, match="not in the optimizer"):
        reset_optimizer_state(opt, [nn.Parameter(torch.zeros(3))])
    with pytest.raises(ParamPatternError, match="'nope.*'"):
        reset_optimizer_state(opt, "nope.*")
    plain = torch.optim.SGD(llama.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="param_names"):
        reset_optimizer_state(plain, "lm_head.weight")


def test_masked_state_reset(seq):
    opt = torch.optim.AdamW(seq.parameters(), lr=1e-2)
    x = torch.randn(4, 5)
    seq(x).sum().backward()
    opt.step()
    w = seq[0].weight
    before = {k: v.clone() for k, v in opt.state[w].items()}
    mask = torch.rand(7, 5) > 0.5
    keys = masked_state_reset(opt, w, mask)
    assert set(keys) == {"exp_avg", "exp_avg_sq"}
    for k in keys:
        assert torch.all(opt.state[w][k][~mask] == 0)
        assert torch.equal(opt.state[w][k][mask], before[k][mask])
        assert before[k][~mask].abs().sum() > 0  # there was something to zero
    assert torch.equal(opt.state[w]["step"], before["step"])
    with pytest.raises(ValueError, match="shape"):
        masked_state_reset(opt, w, torch.ones(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in the optimizer"):
        masked_state_reset(opt, nn.Parameter(torch.zeros(2)), torch.ones(2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# packed masks and plan checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 0, 3), (13, 11)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    m = torch.rand(shape, generator=g) > 0.5
    packed = pack_mask(m)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == (m.numel() + 7) // 8
    assert np.array_equal(packed["bits"].numpy(), np.packbits(m.reshape(-1).numpy()))
    out = unpack_mask(packed)
    assert out.dtype == torch.bool and out.shape == m.shape and torch.equal(out, m)


def test_unpack_rejects_malformed():
    p = pack_mask(torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs 2"):
        unpack_mask({**p, "bits": p["bits"][:1]})
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask({**p, "bits": p["bits"].int()})
    with pytest.raises(ValueError, match="pack_mask"):
        unpack_mask({"shape": [9]})
    with pytest.raises(TypeError, match="torch.bool"):
        pack_mask(torch.ones(3))


def test_plan_state_dict_round_trip(llama):
    plan, masks = _sparse_plan(llama)
    required = ParamPlan.trainable_only(llama, "lm_head.weight", owner="Head", required=True)
    plan = compose([plan, required])
    sd = plan.state_dict()
    # masks are stored packed: 1 bit per element
    packed = sd["entries"]["lm_head.weight"]["mask"]
    assert packed["bits"].numel() == 128 * 32 // 8
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    back = ParamPlan.from_state_dict(loaded)
    assert back.owner == plan.owner
    assert list(back) == list(plan)
    assert dict(back) == dict(plan)
    assert torch.equal(back["lm_head.weight"].mask, masks["lm_head.weight"])
    assert back["lm_head.weight"].required_by == ("Head",)
    # in-place load into an existing plan
    other = ParamPlan({}, owner="empty")
    other.load_state_dict(sd)
    assert dict(other) == dict(plan)
    # a changed mask makes plans unequal (the equality above could fail)
    changed = ParamPlan.from_masks({"lm_head.weight": ~masks["lm_head.weight"]}, owner="LT-SFT")
    assert changed["lm_head.weight"] != plan["lm_head.weight"]
    with pytest.raises(ValueError, match="version"):
        ParamPlan.from_state_dict({**sd, "version": 99})
    with pytest.raises(ValueError, match="format"):
        ParamPlan.from_state_dict({"entries": {}})


def test_plan_entry_semantics():
    e = PlanEntry(MASK, torch.tensor([True, False, True]))
    assert e.trainable and e.trainable_count(3) == 2
    assert PlanEntry(FROZEN).trainable_count(5) == 0 and not PlanEntry(FROZEN).trainable
    assert PlanEntry(TRAINABLE).trainable_count(5) == 5


def test_optimizer_layout_round_trip_reorders_groups_and_keeps_state(seq):
    named = dict(seq.named_parameters())
    opt = torch.optim.AdamW(build_param_groups(seq, None, 1e-2, 0.1), lr=1e-2)
    seq(torch.randn(2, 5)).sum().backward()
    opt.step()
    layout = optimizer_layout(opt, seq)
    assert sorted(n for g in layout for n in g) == sorted(named)
    target = [list(reversed(g)) for g in reversed(layout)]  # other group order, other order inside the groups
    state = {n: opt.state[p]["exp_avg"].clone() for n, p in named.items()}
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    origin = apply_optimizer_layout(opt, seq, target)
    assert origin == [len(layout) - 1 - i for i in range(len(layout))]
    assert optimizer_layout(opt, seq) == target
    for g in opt.param_groups:
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"]))
        assert all(lrs[n] == g["lr"] for n in g["param_names"])
    assert all(torch.equal(opt.state[p]["exp_avg"], state[n]) for n, p in named.items())
    assert apply_optimizer_layout(opt, seq, target) is None  # already so: unchanged
    with pytest.raises(ValueError, match="does not hold the tensors"):
        apply_optimizer_layout(opt, seq, [g[:-1] for g in target])
    with pytest.raises(ValueError, match="not parameters"):
        apply_optimizer_layout(opt, seq, [["nope"]])
