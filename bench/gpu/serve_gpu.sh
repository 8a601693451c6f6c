#!/usr/bin/env bash
# bench/serve.py on an NVIDIA GPU machine that has Python 3.12 + CUDA PyTorch but no package index.
# Expects .gpu/ beside the repo root (git-ignored), made on a machine with an index:
#   .gpu/trt.tar.xz    the nvidia-pytriton wheel's tritonserver (bin/, backends/, the 3.12 stub) + its libs
#   .gpu/np/*.whl      numpy 1.26.4 for cp312 (the Python backend's environment; numpy 2 returns zeros)
#   .gpu/whl/*.whl     pydantic, fastapi, starlette, uvicorn, tritonclient, alt-profanity-check (cp312)
#   .gpu/tokenizer.json
# Usage: bench/gpu/serve_gpu.sh [profile ...]      (prints the bench JSON line per profile)
set -euo pipefail
cd "$(dirname "$0")/../.."
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
  timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/serve.py --profile "$profile" --device gpu --tokenizer .gpu/tokenizer.json --max-tokens "${MAX_TOKENS:-64}" --requests "${REQUESTS:-8}" \
    --set serve.triton.server_dir=/tmp/trt/pytriton/tritonserver --set serve.triton.serve_env=/tmp/serve-env \
    --set serve.triton.instances=1 --set serve.triton.threads_per_instance=0 \
    --set serve.triton.max_batch_size=16 --set 'serve.triton.preferred_batch_sizes=[4,8,16]' \
    --set serve.gateway.cost_per_hour_usd=4.0 || echo "bench failed for $profile (exit $?)"
done
