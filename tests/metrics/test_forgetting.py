"""ForgettingMetric: hand references, MetricCollection, reset, 2-process gloo sync, retention / recovery."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torchmetrics import MetricCollection

from lit_ft.metrics.forgetting import ForgettingMetric, recovery, retention
from tests.helpers import REPO


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """[1, T, V] logits whose softmax is ``probs`` (log of the probabilities)."""
    return torch.tensor(probs, dtype=torch.float32).log().unsqueeze(0)


def test_generation_loss_and_prefix_match_by_hand():
    # position 0 predicts label[1] = 1 with p = 0.5 (argmax 1: a hit); position 1 predicts label[2] = 2 with
    # p = 0.25 (argmax 0: a miss); position 2 predicts nothing (the sequence ends)
    logits = _logits([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    labels = torch.tensor([[-100, 1, 2]])
    one = ForgettingMetric(["t"], match_tokens=1)
    one.update(logits, labels, "t")
    two = ForgettingMetric(["t"], match_tokens=2)
    two.update(logits, labels, "t")
    assert one.compute()["t/loss"].item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    assert one.compute()["t/accuracy"].item() == 1.0  # the first answer token is reproduced
    assert two.compute()["t/accuracy"].item() == 0.0  # the second is not
    none = ForgettingMetric(["t"], match_tokens=0)
    none.update(logits, labels, "t")
    assert "t/accuracy" not in none.compute()


def test_choice_accuracy_and_gold_loss_by_hand():
    # two items x two single-token labels (token 1 = "no", token 2 = "yes"); the label token is at position 1,
    # predicted from position 0. Item 0: gold "yes", p(no)=0.2, p(yes)=0.6 -> correct. Item 1: gold "no",
    # p(no)=0.1, p(yes)=0.3 -> wrong.
    p0, p1 = [0.2, 0.2, 0.6], [0.6, 0.1, 0.3]
    rows = [p0, p0, p1, p1]
    logits = torch.stack([_logits([p, [1 / 3] * 3])[0] for p in rows])
    labels = torch.tensor([[-100, 1], [-100, 2], [-100, 1], [-100, 2]])
    groups = torch.tensor([0, 0, 1, 1])
    gold = torch.tensor([False, True, True, False])
    m = ForgettingMetric(["cls"])
    m.update(logits, labels, "cls", groups=groups, gold=gold)
    out = m.compute()
    assert out["cls/accuracy"].item() == 0.5
    # the loss counts the gold rows only: -(log 0.6 + log 0.1) / 2
    assert out["cls/loss"].item() == pytest.approx(-(math.log(0.6) + math.log(0.1)) / 2, rel=1e-6)


def test_choice_score_sum_penalises_longer_labels_and_mean_does_not():
    # one item, label A = 1 token with log p = -1.0, label B (gold) = 2 tokens with log p = -0.6 each:
    # sum: A -1.0 > B -1.2 (wrong); mean: A -1.0 < B -0.6 (correct)
    a, b = math.exp(-1.0), math.exp(-0.6)
    row_a = [[(1 - a) / 2, a, (1 - a) / 2], [1 / 3] * 3, [1 / 3] * 3]
    row_b = [[(1 - b) / 2, (1 - b) / 2, b]] * 2 + [[1 / 3] * 3]
    logits = torch.stack([_logits(row_a)[0], _logits(row_b)[0]])
    labels = torch.tensor([[-100, 1, -100], [-100, 2, 2]])
    kw = dict(groups=torch.tensor([0, 0]), gold=torch.tensor([False, True]))
    by_sum, by_mean = ForgettingMetric(["c"], choice_score="sum"), ForgettingMetric(["c"], choice_score="mean")
    by_sum.update(logits, labels, "c", **kw)
    by_mean.update(logits, labels, "c", **kw)
    assert by_sum.compute()["c/accuracy"].item() == 0.0
    assert by_mean.compute()["c/accuracy"].item() == 1.0
    assert by_mean.compute()["c/loss"].item() == pytest.approx(0.6, rel=1e-5)  # the gold row's tokens only


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`tasks`"):
        ForgettingMetric([])
    with pytest.raises(ValueError, match="`match_tokens`"):
        ForgettingMetric(["a"], match_tokens=-1)
    with pytest.raises(ValueError, match="`choice_score`"):
        ForgettingMetric(["a"], choice_score="max")
    m = ForgettingMetric(["a"])
    with pytest.raises(ValueError, match="`task`.*'b'"):
        m.update(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), "b")
    with pytest.raises(ValueError, match="exactly one `gold`"):
        m.update(torch.zeros(2, 2, 3), torch.ones(2, 2, dtype=torch.long), "a", groups=torch.tensor([0, 0]),
                 gold=torch.tensor([True, True]))


def _random_updates(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        logits = torch.randn(3, 6, 11, generator=g)
        labels = torch.randint(0, 11, (3, 6), generator=g)
        labels[:, :2] = -100
        out.append((logits, labels, "a" if i % 2 else "b"))
    return out


def test_metric_collection_composes_and_reset_restarts():
    ups = _random_updates()
    alone = ForgettingMetric(["a", "b"], match_tokens=2)
    coll = MetricCollection({"plain": ForgettingMetric(["a", "b"], match_tokens=2),
                             "strict": ForgettingMetric(["a", "b"], match_tokens=4)})
    for logits, labels, task in ups:
        alone.update(logits, labels, task)
        coll.update(logits, labels, task=task)
    ref = alone.compute()
    got = coll.compute()
    assert set(got) == {f"{p}_{k}" for p in ("plain", "strict") for k in ref}  # flattened per member
    for k, v in ref.items():
        assert torch.equal(got[f"plain_{k}"], v)
        if k.endswith("/loss"):  # the same tokens whatever match_tokens
            assert torch.equal(got[f"strict_{k}"], v)
    coll.reset()
    alone.reset()
    assert float(alone.tokens.sum()) == 0 and float(alone.nll_sum.sum()) == 0
    logits, labels, task = ups[0]
    alone.update(logits, labels, task)
    fresh = ForgettingMetric(["a", "b"], match_tokens=2)
    fresh.update(logits, labels, task)
    assert alone.compute().keys() == fresh.compute().keys() == {f"{task}/loss", f"{task}/accuracy"}
    for k in fresh.compute():
        assert torch.equal(alone.compute()[k], fresh.compute()[k])


_DDP = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, {repo!r})
    from lit_ft.metrics.forgetting import ForgettingMetric

    def work(rank, world, init, updates, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        m = ForgettingMetric(["a", "b"], match_tokens=2)
        for i, (logits, labels, task) in enumerate(torch.load(updates)):
            if i % world == rank:  # this rank's share of the updates
                m.update(logits, labels, task)
        res = {{k: float(v) for k, v in m.compute().items()}}
        if rank == 0:
            json.dump(res, open(out, "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(2, *sys.argv[1:]), nprocs=2)
""")


def test_two_gloo_processes_sync_to_the_single_process_result(tmp_path):
    script, updates, out = tmp_path / "ddp.py", tmp_path / "updates.pt", tmp_path / "out.json"
    script.write_text(_DDP.format(repo=REPO))
    torch.save(_random_updates(), updates)
    proc = subprocess.run([sys.executable, str(script), f"file://{tmp_path / 'init'}", str(updates), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    synced = json.loads(out.read_text())
    single = ForgettingMetric(["a", "b"], match_tokens=2)
    for logits, labels, task in _random_updates():
        single.update(logits, labels, task)
    ref = {k: float(v) for k, v in single.compute().items()}
    assert synced.keys() == ref.keys()
    for k in ref:
        assert synced[k] == pytest.approx(ref[k], rel=1e-6), k


def test_retention_and_recovery_formulas():
    before = {"t/loss": 2.0, "t/accuracy": 0.8}
    now = {"t/loss": 3.0, "t/accuracy": 0.4}
    assert retention(now, before, ["t"]) == {"t/loss_ratio": 1.5, "t/accuracy_retention": 0.5}
    # conjugate: before it cost 0.1 accuracy / 0.2 loss; after fine-tuning it gains 0.2 accuracy / 0.5 loss
    conj_before = {"t/loss": 2.2, "t/accuracy": 0.7}
    conj_now = {"t/loss": 2.5, "t/accuracy": 0.6}
    rec = recovery(now, conj_now, before, conj_before, ["t"])
    assert rec["t/recovery_accuracy"] == pytest.approx((0.6 - 0.4) - (0.7 - 0.8))
    assert rec["t/recovery_loss"] == pytest.approx((3.0 - 2.5) - (2.0 - 2.2))
    assert math.isnan(retention({"t/accuracy": 0.5}, {"t/accuracy": 0.0}, ["t"])["t/accuracy_retention"])
