
import lightning.pytorch as pl
import pytest
import torch

from lit_ft.core.loss import (
    TokenDecision,
    TokenPipeline,
    TokenScorer,
    TokenScores,
    compose_decisions,
    global_topk_mask,
    shift_targets,
)
from lit_ft.modules import CausalLMModule

from helpers import random_batch, tiny_config


def test_shift_targets_matches_hf_shift():
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, 6, 7]])
    assert shift_targets(labels).tolist() == [[2, 3, -100, -100], [-100, 6, 7, -100]]


def test_compose_multiplies_weights_and_ands_masks():
    valid = torch.tensor([[True, True, True, False]])
    a = TokenDecision(weights=torch.tensor([[2.0, 1.0, 3.0, 5.0]]), keep=torch.tensor([[True, False, True, True]]))
    b = TokenDecision(weights=torch.tensor([[0.5, 4.0, 2.0, 1.0]]), keep=torch.tensor([[True, True, False, True]]))
    w, keep = compose_decisions([a, b], valid)
    assert w.tolist() == [[1.0, 4.0, 6.0, 5.0]]
    assert keep.tolist() == [[True, False, False, False]]  # invalid stays dropped
    w, keep = compose_decisions([], valid)
    assert w is None and keep.tolist() == valid.tolist()


def test_compose_rejects_bad_shapes():
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep-mask must be bool"):
        compose_decisions([TokenDecision(keep=torch.ones(1, 4))], valid)


def test_global_topk_is_over_the_whole_batch_not_per_row():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    keep = global_topk_mask(scores, valid, 0.5)
    assert keep.tolist() == [[True, True, True, True], [False, False, False, False]]
    valid[0, 0] = False  # invalid tokens never kept and not counted
    keep = global_topk_mask(scores, valid, 0.5)
    assert keep.sum() == 4 and not keep[0, 0] and keep[1, 3]
    with pytest.raises(ValueError, match="ratio"):
        global_topk_mask(scores, valid, 0.0)


def test_training_loss_value_is_mean_and_gradient_is_normalised_by_the_window_count():
    """value = this micro-batch's mean over kept tokens; gradient = accumulate x world x d(sum) / C, with C the
    window's supervised-token count counted ahead (here given directly), so nothing is rescaled after backward."""
    pipe = TokenPipeline()
    pipe.window.totals = {"token": torch.tensor(12.0)}  # the window holds 12 supervised tokens
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = pipe.combine((x * x).sum(), torch.tensor(3), [], {"labels": torch.zeros(1, 4, dtype=torch.long)},
                        training=True, accumulate=4, world_size=2)
    assert torch.isclose(loss, torch.tensor(14.0 / 3))
    loss.backward()
    torch.testing.assert_close(x.grad, 4 * 2 * 2 * x.detach() / 12)
    pipe.end_window()  # the optimizer step closes the window: a forward outside one counts its own batch
    y = torch.tensor([1.0, 2.0], requires_grad=True)
    pipe.combine((y * y).sum(), torch.tensor(2), [], {"labels": torch.zeros(1, 3, dtype=torch.long)},
                 training=True).backward()
    torch.testing.assert_close(y.grad, 2 * y.detach() / 2)  # labels [1, 3] -> 2 supervised targets


class _PositionWeights(pl.Callback, TokenScorer):
    """A batch-independent weighting (w = 1 + target id mod 3) so that batch composition cannot change it."""

    scorer_name = "test_weights"

    def setup(self, trainer, pl_module, stage):
        pl_module.token_pipeline.register(self)

    def score_tokens(self, scores: TokenScores) -> TokenDecision:
        w = 1.0 + (scores.targets.clamp_min(0) % 3).float()
        keep = scores.targets % 5 != 0  # drop some tokens too
        return TokenDecision(weights=w, keep=keep)


class _GradCapture(CausalLMModule):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)  # lit_ft finalises the normalisation here
        self.captured = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


def _grads(batch_size: int, accumulate: int, data: list[dict], init_state) -> dict:
    module = _GradCapture(model_config=tiny_config())
    module.load_state_dict(init_state)
    merged = {k: torch.cat([d[k] for d in data]) for k in data[0]}
    n = merged["input_ids"].shape[0]
    batches = [{k: v[i : i + batch_size] for k, v in merged.items()} for i in range(0, n, batch_size)]
    trainer = pl.Trainer(
        max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[_PositionWeights()],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module.captured


def test_gradient_accumulation_equivalence():
    """accumulate_grad_batches=4 x batch 2 gives the same gradients as one batch of 8 (token counts differ per
    micro-batch, so a per-micro-batch mean would NOT match)."""
    torch.manual_seed(0)
    init = CausalLMModule(model_config=tiny_config()).state_dict()
    data = [random_batch(batch_size=8, seq_len=16, prompt_len=3, seed=1)]
    data[0]["labels"][:2, 3:12] = -100  # very unequal token counts across micro-batches
    g_big = _grads(8, 1, data, init)
    g_acc = _grads(2, 4, data, init)
    assert g_big.keys() == g_acc.keys() and len(g_big) > 0
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-6, msg=name)
    # precondition that makes this meaningful: micro-batches hold different token counts, so averaging
    # per-micro-batch means (what a plain `loss.mean()` does) would weight tokens unequally
    counts = [(shift_targets(data[0]["labels"][i : i + 2]) != -100).sum().item() for i in range(0, 8, 2)]
    assert len(set(counts)) > 1, counts


def test_empty_selection_gives_graph_connected_zero():
    module = CausalLMModule(model_config=tiny_config())
    batch = random_batch(2, 8)
    batch["labels"][:] = -100
    out = module.compute_token_loss(batch, module.model)
    assert out.loss.requires_grad and float(out.loss) == 0.0
    out.loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


def test_global_topk_keeps_exactly_k_and_breaks_ties_by_position():
    scores = torch.zeros(2, 5)  # all tied (e.g. excess vs the initial weights at step 0)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, 1] = False
    keep = global_topk_mask(scores, valid, 0.5)
    assert keep.sum() == 5  # ceil(0.5 * 9)
    assert keep.tolist() == [[True, False, True, True, True], [True, False, False, False, False]]
