"""OneTokenRollout cost on CPU: forward + backward of the chunked OTR term (N rows, SmolLM2-135M head size), the
cross-entropy share alone vs K = 1 and K = 8 Gumbel-max draws. Run: OMP_NUM_THREADS=2 python benchmarks/one_token_rollout.py"""
import time, torch, resource
from lit_ft.kernels import chunked_linear_loss
from lit_ft.callbacks.objectives.one_token_rollout import otr_chunk_sum
torch.manual_seed(0)
n, d, v, k = 512, 576, 49152, 8
h = torch.randn(n, d, requires_grad=True); w = (torch.randn(v, d) * 0.02).requires_grad_(True)
t = torch.randint(0, v, (n,)); rows = {"targets": t, "weights": torch.ones(n), "row_ids": torch.arange(n)}
def run(kk, wt):
    t0 = time.perf_counter()
    loss = chunked_linear_loss(h, w, lambda z, **r: otr_chunk_sum(z, **r, seed=1, num_samples=kk, temperature=1.0,
                               negative_reward=-0.1, baseline=False, ce_weight=1.0 if wt else 0.0, weight=wt), rows)
    loss.backward(); return time.perf_counter() - t0
run(1, 1.0)
for kk, wt in ((8, 0.0), (1, 1.0), (8, 1.0)):
    print(f"K={kk} otr_weight={wt}: {run(kk, wt):.2f} s")
print("peak RSS GiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
