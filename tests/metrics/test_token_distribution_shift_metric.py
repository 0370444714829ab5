"""TokenDistributionShiftMetric (URIAL's token distribution shift): ranks and counts against hand-built logits whose
ranks are known by construction, MetricCollection composition, reset, and a 2-process gloo synchronisation."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torchmetrics import MetricCollection
from torchmetrics.aggregation import SumMetric

from lit_ft.metrics.token_distribution_shift import TokenDistributionShiftMetric, base_ranks
from helpers import run_forked

V = 10


def logits_with_ranks(tokens: torch.Tensor, ranks: torch.Tensor, vocab: int = V, seed: int = 0) -> torch.Tensor:
    """[B, T, V] logits under which ``tokens[b, t]`` has exactly rank ``ranks[b, t]``: a random ordering of the
    vocabulary with scores vocab, vocab-1, ..., 1, the token placed at slot ``rank - 1``."""
    g = torch.Generator().manual_seed(seed)
    B, T = tokens.shape
    out = torch.empty(B, T, vocab)
    for b in range(B):
        for t in range(T):
            others = [v for v in torch.randperm(vocab, generator=g).tolist() if v != int(tokens[b, t])]
            order = others[: int(ranks[b, t]) - 1] + [int(tokens[b, t])] + others[int(ranks[b, t]) - 1:]
            for slot, v in enumerate(order):
                out[b, t, v] = float(vocab - slot)
    return out


def test_base_ranks_hand_cases():
    logits = torch.tensor([[[0.1, 3.0, 2.0, -1.0], [5.0, 5.0, 1.0, 0.0]]])
    # token 1 is top (rank 1), token 2 second, token 3 last; a tie with the top counts as rank 1
    assert base_ranks(logits[:, :1].expand(1, 1, 4), torch.tensor([[1]])).tolist() == [[1]]
    assert base_ranks(logits[:, :1], torch.tensor([[2]])).tolist() == [[2]]
    assert base_ranks(logits[:, :1], torch.tensor([[3]])).tolist() == [[4]]
    assert base_ranks(logits[:, 1:], torch.tensor([[1]])).tolist() == [[1]]
    assert base_ranks(logits[:, 1:], torch.tensor([[2]])).tolist() == [[3]]
    with pytest.raises(ValueError, match="base_logits"):
        base_ranks(logits, torch.tensor([[1]]))


def test_base_equals_aligned_means_all_unshifted():
    logits = torch.randn(3, 7, V, generator=torch.Generator().manual_seed(1))
    tokens = logits.argmax(-1)  # the aligned model's greedy tokens are the base's own top tokens
    m = TokenDistributionShiftMetric(max_positions=7, vocab_size=V)
    m.update(logits, tokens)
    r = m.compute()
    assert r["unshifted_share"] == 1 and r["marginal_share"] == 0 and r["shifted_share"] == 0
    assert r["tokens"] == 21 and m.top_shifted() == []


def test_counts_shares_positions_and_tokens_from_known_ranks():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 1, 2]])
    ranks = torch.tensor([[1, 2, 3, 4, 1, 10], [5, 1, 1, 2, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # row 1 ended early
    m = TokenDistributionShiftMetric(max_positions=4, first_k=2, vocab_size=V)
    m.update(logits_with_ranks(tokens, ranks), tokens, mask)
    r = m.compute()
    # counted by hand from the table above (masked position excluded): ranks 1,2,3,4,1,10 and 5,1,1,2,7
    # unshifted (rank 1): 4, marginal (2-3): 3, shifted (>3): 4 -> 11 tokens
    assert r["tokens"] == 11
    assert r["unshifted_share"].item() == pytest.approx(4 / 11)
    assert r["marginal_share"].item() == pytest.approx(3 / 11)
    assert r["shifted_share"].item() == pytest.approx(4 / 11)
    # positions 0..1: ranks (1,5), (2,1) -> one shifted of four
    assert r["shifted_share_first_k"].item() == pytest.approx(1 / 4)
    # per-position curve for positions 0..3 only (4, 5 are beyond max_positions but in the totals)
    expected = torch.tensor([[0.5, 0, 0.5], [0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    torch.testing.assert_close(r["position_shares"], expected)
    assert r["position_counts"].tolist() == [2, 2, 2, 2]
    # shifted tokens: 4 (rank 4), 6 (rank 10), 7 (rank 5), 1 (rank 7); token 1 was also decoded once unshifted
    assert m.top_shifted() == [(1, 1, 2), (4, 1, 1), (6, 1, 1), (7, 1, 1)]
    assert m.top_shifted(2) == [(1, 1, 2), (4, 1, 1)]


def test_thresholds_are_arguments():
    tokens = torch.tensor([[0, 1, 2, 3]])
    ranks = torch.tensor([[1, 2, 5, 6]])
    m = TokenDistributionShiftMetric(unshifted_max_rank=2, marginal_max_rank=5, max_positions=4, first_k=1)
    m.update(logits_with_ranks(tokens, ranks), tokens)
    r = m.compute()
    assert (r["unshifted_share"].item(), r["marginal_share"].item(), r["shifted_share"].item()) == (0.5, 0.25, 0.25)


def test_no_tokens_gives_nan_shares_and_curve():
    m = TokenDistributionShiftMetric(max_positions=3, first_k=3)
    m.update(torch.zeros(0, 0, V), torch.zeros(0, 0, dtype=torch.long))
    r = m.compute()
    assert r["tokens"] == 0 and math.isnan(r["shifted_share"].item())
    assert torch.isnan(r["position_shares"]).all()


def test_metric_collection_composition_and_reset():
    tokens = torch.tensor([[3, 4, 5]])
    ranks = torch.tensor([[1, 3, 8]])
    coll = MetricCollection({"tds": TokenDistributionShiftMetric(max_positions=3, first_k=1, vocab_size=V),
                             "n": SumMetric()})
    coll["tds"].update(logits_with_ranks(tokens, ranks), tokens)
    coll["n"].update(torch.tensor(3.0))
    out = coll.compute()
    for key in ("unshifted_share", "marginal_share", "shifted_share", "shifted_share_first_k", "position_shares"):
        assert any(k.endswith(key) for k in out), (key, sorted(out))
    shifted = next(v for k, v in out.items() if k.endswith("_shifted_share") or k == "shifted_share")
    assert shifted.item() == pytest.approx(1 / 3) and out["n"] == 3
    coll.reset()
    tds = coll["tds"]
    assert tds.counts.sum() == 0 and tds.position_category_counts.sum() == 0 and tds.shifted_by_token.sum() == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(unshifted_max_rank=0), "unshifted_max_rank"),
    (dict(marginal_max_rank=0), "marginal_max_rank"),
    (dict(max_positions=0), "max_positions"),
    (dict(first_k=40), "first_k"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenDistributionShiftMetric(**kwargs)


def test_update_checks_shapes_and_ids():
    m = TokenDistributionShiftMetric(vocab_size=4)
    with pytest.raises(ValueError, match="mask"):
        m.update(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="token ids"):
        m.update(torch.zeros(1, 2, 6), torch.tensor([[1, 5]]))


# -- 2 gloo processes -----------------------------------------------------------------------------------------------
def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if rank == 0:
        tokens, ranks = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 4, 2]])
    else:
        tokens, ranks = torch.tensor([[2, 5, 6], [7, 2, 9]]), torch.tensor([[9, 1, 1], [1, 6, 3]])
    return tokens, ranks, logits_with_ranks(tokens, ranks, seed=rank)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = TokenDistributionShiftMetric(max_positions=3, first_k=1, vocab_size=V)
        tokens, _, logits = _rank_data(rank)
        m.update(logits, tokens)
        r = m.compute()
        with m.sync_context():
            top = m.top_shifted()
        torch.save({"results": r, "top": top, "local": m.counts.clone()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_sync_to_the_single_process_result(tmp_path):
    run_forked(_worker, nprocs=2, args=(_free_port(), str(tmp_path)))
    single = TokenDistributionShiftMetric(max_positions=3, first_k=1, vocab_size=V)
    for rank in (0, 1):
        tokens, _, logits = _rank_data(rank)
        single.update(logits, tokens)
    expected = single.compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        for key, value in expected.items():
            torch.testing.assert_close(got["results"][key], value, equal_nan=True, msg=key)
        assert got["top"] == single.top_shifted()  # the global list on every rank
        assert got["local"].sum() == (3 if rank == 0 else 6)  # compute() left the local states unsynced
    # shifted: rank 4 (token 2), 9 (token 2), 6 (token 2) -> token 2 shifted 3 times, decoded 3 times
    assert single.top_shifted() == [(2, 3, 3)]
    assert expected["shifted_share"].item() == pytest.approx(3 / 9)
