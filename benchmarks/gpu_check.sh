#!/usr/bin/env bash
# One-shot GPU check (run on a CUDA machine from the repo root; logs go to $OUT or ./gpu_logs), about 8 minutes:
#   1. the fused token CE's CUDA paths vs the fp64 reference (accuracy rule), both GEMM routes, real lm_head shapes;
#   2. the peer benchmark (benchmarks/token_ce.py, one fresh process per method): naive, lit-ft (default fp32 and
#      'input' weight-gradient accumulation, chunk sizes, the no-sync Triton GEMM route), Liger-Kernel, CCE,
#      torchtune, at D=4096/V=128256/N=16384 and two smaller heads, bf16;
#   3. the CUDA-only pytest cases of every kernel (opcheck, torch.compile with the Triton kernels);
#   4. the prompt kernels (prompt_embed for DePT/EPT, rational for IAPT) and token_rows (LeMo): self-checks and
#      the prompt_embed benchmark.
# Optional peer wheels (liger-kernel, cut-cross-entropy, torchtune and its imports) are installed from .whl/.
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/liger_kernel ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || echo "note: some peer wheels did not install"
fi
export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. correctness (CUDA paths vs fp64 reference) =="
timeout ${T_CHECK:-100} $PY -m lit_ft.kernels.token_ce.selfcheck --device cuda --real 2>&1 | tee "$OUT/selfcheck.txt"

echo "== 2. peer benchmark =="
BIG=${BIG_METHODS:-naive,ours,ours-input,ours-input:chunk=512,ours-input:chunk=1024,ours:gemm=triton,liger,liger32,cce,torchtune}
timeout ${T_BENCH:-210} $PY benchmarks/token_ce.py --device cuda --dtype bf16 --methods "$BIG" \
  --shapes 4096x128256 --n 16384 --keep 1.0,0.6,0.3 --warmup 2 --repeats 5 --json "$OUT/bench_4096.json" \
  2>&1 | grep -v -i "warn" | tee "$OUT/bench.txt"
timeout ${T_BENCH2:-120} $PY benchmarks/token_ce.py --device cuda --dtype bf16 \
  --methods ${SMALL_METHODS:-naive,ours,ours-input,liger,cce} --shapes 2048x128256,576x49152 --n 8192 \
  --keep 1.0,0.6 --warmup 2 --repeats 5 --json "$OUT/bench_small.json" 2>&1 | grep -v -i "warn" | tee -a "$OUT/bench.txt"

echo "== 3. CUDA pytest (opcheck, torch.compile) =="
timeout ${T_PYTEST:-90} $PY -m pytest -q -x -p no:cacheprovider tests/kernels -k "cuda" 2>&1 | tail -15 \
  | tee "$OUT/pytest.txt"
echo "== 4. prompt kernels (prompt_embed, rational) and token_rows =="
timeout ${T_PROMPT:-45} $PY -m lit_ft.kernels.prompt_embed.selfcheck --device cuda 2>&1 | tee "$OUT/prompt_kernels.txt"
timeout ${T_PROMPT:-45} $PY -m lit_ft.kernels.rational.selfcheck --device cuda 2>&1 | tee -a "$OUT/prompt_kernels.txt"
timeout ${T_PROMPT:-45} $PY -m lit_ft.kernels.token_rows.selfcheck --device cuda 2>&1 | tee -a "$OUT/prompt_kernels.txt"
timeout ${T_PROMPT:-45} $PY benchmarks/prompt_embed.py --device cuda --b 8,32 2>&1 | tee -a "$OUT/prompt_kernels.txt"
echo "== done =="
