#!/usr/bin/env bash
# One-shot GPU check of the fused token CE (run on a CUDA machine from the repo root; logs go to $OUT or ./gpu_logs):
#   1. Triton path vs the fp64 reference (accuracy rule) at small and real lm_head shapes, PASS/FAIL per case;
#   2. benchmarks/token_ce.py --device cuda --dtype bf16 with --compare ours-input,liger,liger32,cce (ours-input =
#      weight_grad_accumulation="input", the memory-lean mode to set against Liger's default bf16 accumulation);
#   3. the CUDA-only pytest cases (opcheck + torch.compile(fullgraph=True) with the Triton kernel);
#   4. the prompt kernels (prompt_embed for DePT/EPT, rational for IAPT): Triton self-checks vs the reference, their
#      CUDA pytest cases, and prompt_embed vs DePT's .repeat formulation.
# Optional wheels for the baselines (liger-kernel, cut-cross-entropy) are installed from .whl/ when present.
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/liger_kernel ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:-.}:.
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. correctness (Triton path vs fp64 reference) =="
timeout ${T_CHECK:-75} $PY -m lit_ft.kernels.token_ce.selfcheck --device cuda --real 2>&1 | tee "$OUT/selfcheck.txt"

echo "== 2. benchmark =="
timeout ${T_BENCH:-110} $PY benchmarks/token_ce.py --device cuda --dtype bf16 --compare ${COMPARE:-ours-input,liger,liger32,cce} \
  --shapes 4096x128256 --n 16384 --keep 1.0,0.6,0.3 --warmup 2 --repeats 5 2>&1 | tee "$OUT/bench.txt"
timeout ${T_BENCH2:-60} $PY benchmarks/token_ce.py --device cuda --dtype bf16 --compare ${COMPARE:-ours-input,liger,liger32,cce} \
  --shapes 576x49152,2048x128256 --n 8192 --keep 1.0,0.6 --warmup 2 --repeats 5 2>&1 | tee -a "$OUT/bench.txt"

# memory-lean point: 'input' accumulation with 1024-row chunks (logits buffer 256 MiB instead of 1 GiB)
timeout ${T_BENCH3:-40} $PY benchmarks/token_ce.py --device cuda --dtype bf16 --compare ours-input --chunk-size 1024 \
  --shapes 4096x128256 --n 16384 --keep 1.0,0.6 --warmup 1 --repeats 3 2>&1 | tee -a "$OUT/bench.txt"

echo "== 3. CUDA pytest (opcheck, torch.compile) =="
timeout ${T_PYTEST:-45} $PY -m pytest -q -x -p no:cacheprovider tests/kernels/test_token_ce_triton.py \
  tests/kernels/test_token_ce.py -k "cuda" 2>&1 | tail -15 | tee "$OUT/pytest.txt"
echo "== 4. prompt kernels (prompt_embed, rational) =="
timeout ${T_PROMPT:-60} $PY -m lit_ft.kernels.prompt_embed.selfcheck --device cuda 2>&1 | tee "$OUT/prompt_kernels.txt"
timeout ${T_PROMPT:-60} $PY -m lit_ft.kernels.rational.selfcheck --device cuda 2>&1 | tee -a "$OUT/prompt_kernels.txt"
timeout ${T_PROMPT:-60} $PY -m pytest -q -p no:cacheprovider tests/kernels/test_prompt_embed.py \
  tests/kernels/test_rational.py -k "cuda" 2>&1 | tail -5 | tee -a "$OUT/prompt_kernels.txt"
timeout ${T_PROMPT:-60} $PY benchmarks/prompt_embed.py --device cuda --b 8,32 2>&1 | tee -a "$OUT/prompt_kernels.txt"
echo "== done =="
