"""DSEE: the GreBsmo-style mask finds known sparse spikes, the LoRA + sparse math against a dense reference, zero
init, exact merge, a sparse gradient, a frozen backbone bit-identical under AdamW with weight decay, save -> load,
checkpoint -> resume, the sparse-diff export, stage-2 pruning (masks kept through training and resume), plain /
PEFT modules, clear errors."""

from __future__ import annotations

import pytest
import torch

from lit_ft.callbacks import DSEE
from lit_ft.callbacks.adapters.dsee import PRUNE_ATTR, DSEEAdapter, grebsmo_decompose, sparse_mask_indices
from lit_ft.core.adapters import AdapterError, AdapterSet, load_adapters, resolve_targets, save_adapters
from lit_ft.core.sparse_diff import compose_sparse_diffs, load_sparse_diff
from lit_ft.modules import CausalLMModule
from tests.callbacks.adapter_checks import (
    assert_plain_module_backbone_untouched,
    assert_resume_equals_uninterrupted,
    fit_on_peft_lora,
)
from tests.helpers import (
    ListDataModule,
    assert_state_dicts_equal,
    fit_and_resume,
    quiet_trainer,
    random_batch,
    tiny_config,
    tiny_hf_model,
)

FAST = {"rank": 4, "num_sparse": 8, "outer_iters": 3}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _spiky(seed, m=64, n=48, true_rank=3, spikes=12):
    """A rank-3 matrix at a weight-like scale (max 0.1) plus 12 spikes of ±0.05: smaller than the largest low-rank
    entries, so the largest |W| do not find them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, true_rank, generator=g) @ torch.randn(true_rank, n, generator=g)
    low = low / low.abs().max() * 0.1
    idx = torch.randperm(m * n, generator=g)[:spikes]
    w = low.clone()
    w.view(-1)[idx] += torch.where(torch.rand(spikes, generator=g) > 0.5, 1.0, -1.0) * 0.05
    return w, set(idx.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_decomposition_mask_finds_the_sparse_spikes(seed):
    w, spikes = _spiky(seed)
    n = w.shape[1]
    # three outer loops growing the rank by one reach the true rank 3 (the authors' 2 inner steps, 0.01 threshold)
    rows, cols = sparse_mask_indices(w, 12, outer_iters=3, rank_step=1)
    assert set((rows * n + cols).tolist()) == spikes
    naive = set(w.abs().reshape(-1).topk(12).indices.tolist())
    assert len(naive & spikes) <= 4  # a magnitude top-k would not have found them


def test_decomposition_authors_defaults_keep_a_residual_and_exact_count():
    w, _ = _spiky(0, m=24, n=16)
    u, v, raw = grebsmo_decompose(w)  # 100 outer loops: the rank stops below min(shape)
    assert v.shape[0] < 16 and raw.abs().max() > 0
    rows, cols = sparse_mask_indices(w, 20)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 20 and torch.all(rows[:-1] * 16 + cols[:-1]
                                                                           < rows[1:] * 16 + cols[1:])


def test_adapter_math_matches_a_dense_reference_and_the_gradient_is_sparse():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10)
    a = DSEEAdapter(12, 10, rank=3, alpha=32.0, num_sparse=5)
    rows, cols = torch.tensor([0, 2, 2, 7, 9]), torch.tensor([1, 0, 11, 5, 3])
    a.reset(torch.Generator().manual_seed(1), rows, cols)
    with torch.no_grad():
        a.lora_b.normal_()
        a.sparse_values.normal_()
    x = torch.randn(2, 4, 12)
    y = lin(x)
    dense_s = torch.zeros(10, 12)
    dense_s[rows, cols] = a.sparse_values.detach()
    want = y + (32.0 / 3) * (x @ (a.lora_b @ a.lora_a).T.detach() + x @ dense_s.T)
    got = a(x, y)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    # the reference gradient of S (dense) is nonzero everywhere; the adapter's exists only at the mask
    dense_param = dense_s.clone().requires_grad_(True)
    (y.detach() + (32.0 / 3) * (x @ dense_param.T)).sum().backward()
    torch.testing.assert_close(a.sparse_values.grad, dense_param.grad[rows, cols])
    assert a.sparse_values.grad.shape == (5,)


def test_adapter_runs_under_bf16_autocast():
    """bf16-mixed: the low-rank matmuls come out bf16, the sparse product float32 (an index_add dtype clash once)."""
    a = DSEEAdapter(12, 10, rank=3, alpha=32.0, num_sparse=5)
    a.reset(torch.Generator().manual_seed(1), torch.tensor([0, 2, 2, 7, 9]), torch.tensor([1, 0, 11, 5, 3]))
    x = torch.randn(2, 4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.Linear(12, 10)(x)
        out = a(x, y)
    assert out.dtype == y.dtype and out.shape == y.shape and torch.isfinite(out).all()


def _dsee_set(model, seed=0, moved=True, **kw):
    g = torch.Generator().manual_seed(seed)
    built = {}
    for t, m in resolve_targets(model, ["query", "value"]).items():
        rows, cols = sparse_mask_indices(m.weight, 6, outer_iters=3)
        a = DSEEAdapter(m.in_features, m.out_features, rank=4, num_sparse=6, **kw)
        a.reset(g, rows, cols)
        if moved:
            with torch.no_grad():
                a.lora_b.normal_(0, 0.05, generator=g)
                a.sparse_values.normal_(0, 0.05, generator=g)
        built[t] = a
    return AdapterSet(built)


def test_zero_init_leaves_outputs_identical():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    before = _logits(model, ids)
    for init in ("dsee", "zero"):
        s = _dsee_set(model, moved=False, init=init)
        s.attach(model)
        assert torch.equal(_logits(model, ids), before)
        s.detach()


def test_merge_is_exact():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    s = _dsee_set(model)
    s.attach(model)
    want = _logits(model, ids)
    assert (want - _logits_disabled(model, s, ids)).abs().max() > 1e-4
    s.merge()
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


def _logits_disabled(model, s, ids):
    with s.disabled():
        return _logits(model, ids)


def test_trainer_trains_only_the_adapters_backbone_bit_identical_under_weight_decay(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = DSEE(**FAST, save_dir="dsee")
    quiet_trainer([cb], max_steps=3, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=3))
    for n, p in module.named_parameters():
        if not n.startswith("lit_ft_adapters."):
            assert torch.equal(p, base[n]), f"backbone tensor {n} moved"
    owned = cb.owned_param_names(module)
    assert len(owned) == 4 * 3 and all(n.startswith("lit_ft_adapters.dsee.adapters.layer") for n in owned)
    a = cb.adapters.adapter(cb.adapters.targets[0])
    assert a.sparse_values.abs().min() > 0 and a.lora_b.abs().max() > 0  # both branches trained
    ids = random_batch(2, 9)["input_ids"]
    want = _logits(module.model.eval(), ids)
    # the artifact reloads onto a fresh base
    fresh = CausalLMModule(model_config=tiny_config())
    fresh.load_state_dict(base)
    loaded = load_adapters(fresh.model, tmp_path / "dsee")
    assert torch.equal(loaded.adapter(loaded.targets[0]).sparse_rows, a.sparse_rows)
    torch.testing.assert_close(_logits(fresh.model.eval(), ids), want)
    # the sparse part written at fit end: S⊙M only, num_sparse entries per target weight
    diff = load_sparse_diff(tmp_path / "dsee" / "sparse_diff.safetensors")
    assert diff.module_prefix == "model." and len(diff.entries) == 4
    assert all(e.kind == "sparse" and e.nnz == 8 for e in diff.entries.values())
    assert "model.model.layers.0.self_attn.q_proj.weight" in diff.entries
    # merged: the same outputs, no adapters left
    cb.merge()
    assert not hasattr(module, "lit_ft_adapters")
    torch.testing.assert_close(_logits(module.model, ids), want, rtol=1e-5, atol=1e-5)


def test_sparse_diff_export_composes_onto_the_base(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    cb = DSEE(**FAST)
    quiet_trainer([cb], max_steps=2).fit(module, datamodule=ListDataModule(n_batches=2))
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    sparse = cb.export_sparse_diff(str(tmp_path / "s.safetensors"))
    full = cb.export_sparse_diff(str(tmp_path / "full.safetensors"), include_lora=True)
    assert all(e.kind == "dense" for e in full.entries.values())
    # S⊙M alone on the bare HF model (names carry "model." and are stripped): only the masked entries move
    bare = tiny_hf_model()
    bare.load_state_dict(base)
    counts = compose_sparse_diffs(bare, [tmp_path / "s.safetensors"])
    assert set(counts.values()) == {8}
    t = cb.adapters.targets[0]
    a = cb.adapters.adapter(t)
    w0 = base[f"model.layers.{t.layer}.{t.path}.weight"].double()
    w1 = bare.get_parameter(f"model.layers.{t.layer}.{t.path}.weight").double()
    expect = torch.zeros_like(w0)
    expect[a.sparse_rows, a.sparse_cols] = a.sparse_values.detach().double() * a.scale
    torch.testing.assert_close(w1 - w0, expect, rtol=0, atol=1e-7)
    assert sparse.nnz == 4 * 8
    # the whole update as a dense diff gives exactly the merged weights
    bare2 = tiny_hf_model()
    bare2.load_state_dict(base)
    compose_sparse_diffs(bare2, [tmp_path / "full.safetensors"])
    cb.merge()
    for n, p in module.model.named_parameters():
        assert torch.equal(p, bare2.get_parameter(n)), n


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    assert_resume_equals_uninterrupted(lambda: DSEE(**FAST, learning_rate=5e-3), tmp_path,
                                       key=lambda k: k.endswith("sparse_rows"))


def test_pruning_at_a_step_keeps_pruned_weights_zero_and_resumes(tmp_path):
    kw = dict(**FAST, prune_ratio=0.2, prune_other_ratio=0.2, prune_at_step=1, freeze_backbone=False)
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
                       lambda: [DSEE(**kw)], tmp_path)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    module = r.full
    masks = getattr(module, PRUNE_ATTR)
    assert bool(masks.done)
    layer = module.model.model.layers[0]
    q_keep = masks.mask("layer0__self_attn__q_proj")
    k_keep = masks.mask("layer0__self_attn__k_proj")
    # 20% of the q/v entries pruned globally over q and v, 20% over the other linear layers; the backbone trained
    # (freeze_backbone=False) for 3 more steps and the pruned entries stayed zero
    qv_total = sum(masks.mask(k).numel() for k in masks.keys if k.endswith(("q_proj", "v_proj")))
    qv_pruned = sum((~masks.mask(k)).sum().item() for k in masks.keys if k.endswith(("q_proj", "v_proj")))
    assert qv_pruned == round(0.2 * qv_total)
    assert torch.all(layer.self_attn.q_proj.weight[~q_keep] == 0) and (~q_keep).any()
    assert torch.all(layer.self_attn.k_proj.weight[~k_keep] == 0) and (~k_keep).any()
    assert (layer.self_attn.k_proj.weight[k_keep] != 0).all()
    assert "layer0__mlp__down_proj" in masks.keys


def test_prune_method_scores_on_the_merged_weights(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    cb = DSEE(**FAST, prune_ratio=0.5)
    quiet_trainer([cb], max_steps=2).fit(module, datamodule=ListDataModule(n_batches=2))
    blocks = module.model.model.layers
    merged = {t.key: (blocks[t.layer].get_submodule(t.path).weight.double()
                      + cb.adapters.adapter(t).weight_delta()).abs() for t in cb.adapters.targets}
    flat = torch.cat([m.reshape(-1) for m in merged.values()])
    cut = flat.sort().values[round(0.5 * flat.numel()) - 1]
    assert cb.prune() == {"query_value": 0.5}
    masks = getattr(module, PRUNE_ATTR)
    for k, m in merged.items():
        assert torch.equal(masks.mask(k), m > cut)
    with pytest.raises(AdapterError, match="already pruned"):
        cb.prune()
    assert "layer0__self_attn__k_proj" not in masks.keys  # prune_other_ratio=0: only q/v


def test_drop_in_on_plain_and_peft_modules():
    assert_plain_module_backbone_untouched(lambda: DSEE(**FAST))
    cb = fit_on_peft_lora(lambda: DSEE(**FAST))
    assert len(cb.adapters.targets) == 4  # q/v found through the PEFT wrappers; W read from their base layers
    assert all(p.grad is not None or not p.requires_grad for p in cb.adapters.parameters())
    diff = cb.sparse_diff()
    assert all(n.endswith("base_layer.weight") for n in diff.entries)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "`rank` must be an int >= 1"),
    ({"alpha": 0}, "`alpha` must be a finite number > 0"),
    ({"num_sparse": 0}, "`num_sparse` must be an int >= 1"),
    ({"targets": []}, "`targets` must be a non-empty list"),
    ({"init": "lora"}, "`init` must be one of"),
    ({"outer_iters": 0}, "`outer_iters`"),
    ({"sparse_threshold": -1.0}, "`sparse_threshold`"),
    ({"prune_ratio": 1.0}, r"`prune_ratio` must be a number in \[0, 1\)"),
    ({"prune_score": "l2"}, "`prune_score` must be one of"),
    ({"prune_at_step": 3}, "`prune_at_step` is 3 but `prune_ratio` and `prune_other_ratio` are both 0"),
    ({"seed": -1}, "`seed`"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSEE(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": ["mlp.nope"]}, "DSEE: decoder layer 0 .* no module for target 'mlp.nope'"),
    ({"targets": ["mlp"]}, "DSEE: the target is a LlamaMLP, not an nn.Linear"),
    ({"num_sparse": 10_000}, "`num_sparse` is 10000 but self_attn.q_proj in layer 0 has only 1024 weights"),
])
def test_unsupported_targets_fail_at_setup_naming_them(kwargs, match):
    with pytest.raises(AdapterError, match=match):
        quiet_trainer([DSEE(**{**FAST, **kwargs})], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))


def test_prune_without_ratios_and_save_of_a_plain_set_are_clear(tmp_path):
    cb = DSEE(**FAST)
    with pytest.raises(AdapterError, match="nothing to prune"):
        cb.prune()
    with pytest.raises(AdapterError, match="no adapters are installed"):
        cb.sparse_diff()
    model = tiny_hf_model().eval()
    s = _dsee_set(model)
    s.attach(model)
    ids = random_batch(2, 9)["input_ids"]
    want = _logits(model, ids)
    save_adapters(s, tmp_path)
    fresh = tiny_hf_model().eval()
    load_adapters(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), want)
