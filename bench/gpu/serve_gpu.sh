#!/usr/bin/env bash
# bench/serve.py on one NVIDIA GPU, under 8 minutes, on a machine with Python + CUDA PyTorch but no package
# index: the gpt2-124m shape in bf16, the continuous-batching engine and the per-execute() scheduler side by
# side at c1/c4/c16/c32, the plain eager PyTorch KV-cache decode (GPT.generate / generate_batch) at batch 1
# and 32 on the same GPU as the anchor, the gateway, one JSON line per profile.
#
# Expects .gpu/ beside the repo root (git-ignored), made on a machine with an index:
#   .gpu/trt.tar.xz    the nvidia-pytriton wheel's tritonserver (bin/, backends/, the 3.12 stub) + its libs
#   .gpu/np/*.whl      numpy 1.26.4 for cp312 (the Python backend's environment; numpy 2 returns zeros)
#   .gpu/whl/*.whl     pydantic, fastapi, starlette, uvicorn, tritonclient, alt-profanity-check (cp312)
#   .gpu/tokenizer.json
# Usage: bench/gpu/serve_gpu.sh [profile ...]      (default gpt2-124m)
#        bench/gpu/serve_gpu.sh --dry              the same benchmark end to end on CPU in this checkout's
#                                                  environment (tiny shape, few requests): what the tests run
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMON=(--concurrency "${CONCURRENCY:-1,4,16,32}" --rounds "${ROUNDS:-1}")
if [[ "${1:-}" == "--dry" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  exec timeout "${BENCH_TIMEOUT:-420}" "$PY" bench/serve.py --profile tiny --device cpu --max-tokens 8 \
    --requests "${REQUESTS:-12}" --concurrency "${CONCURRENCY:-1,4}" --rounds 1 --rates "${RATES:-5}" \
    --set serve.triton.instances=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PY=$(command -v python3)
mkdir -p /tmp/trt && tar xJf .gpu/trt.tar.xz -C /tmp/trt
"$PY" -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
"$PY" -m venv --without-pip /tmp/serve-env
SITE=$(/tmp/serve-env/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$PY" -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" .gpu/np/*.whl
"$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' > "$SITE/_main.pth"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
/tmp/serve-env/bin/python -c 'import numpy, torch; print("backend env: numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
for profile in "${@:-gpt2-124m}"; do
  timeout "${BENCH_TIMEOUT:-420}" "$PY" bench/serve.py --profile "$profile" --device gpu --tokenizer .gpu/tokenizer.json \
    --max-tokens "${MAX_TOKENS:-64}" --requests "${REQUESTS:-64}" --rates "${RATES:-10,40,160,640}" "${COMMON[@]}" \
    --set serve.triton.server_dir=/tmp/trt/pytriton/tritonserver --set serve.triton.serve_env=/tmp/serve-env \
    --set serve.triton.instances=1 --set serve.triton.threads_per_instance=0 \
    --set serve.engine.max_seqs=32 --set serve.engine.max_batch_tokens=2048 \
    --set serve.gateway.cost_per_hour_usd=4.0 || echo "bench failed for $profile (exit $?)"
done
