#!/usr/bin/env bash
# One short device run for issue 15 (<= 8 minutes on an H100/H200), from the repository root:
#   device `run` with carry [".device-data", ".whl"] and command: bash benchmarks/gpu/run.sh
# Before it, here (no GPU needed):
#   mkdir -p .device-data && cp ../shared/data/enwik8-sample/enwiki_sample.xml .device-data/
#   echo /.device-data/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 jsonargparse==4.40.0   # what the image lacks
# Results land in $OUT (device-check.{md,jsonl}, zero.log); copy them to benchmarks/results/ with the date.
set -euo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# parity first (seconds), then throughput at 8k and 32k (every preset), then MFU at 8k
timeout 420 python3 benchmarks/gpu/device_check.py --out "$OUT" --lengths 8192 32768 2>&1 | tee "$OUT/device-check.log" || true
# DeepSpeed ZeRO-2 / ZeRO-3 through Lightning (rows of benchmarks/results/scaling-gpu.md): only where deepspeed
# imports (the image has none and PyPI ships it as source only: carry a wheel built for the image to run this)
if python3 -c "import deepspeed" 2>/dev/null; then
  for STAGE in zero2 zero3; do
    timeout 60 python3 scripts/pretrain.py fit --config configs/enwik8/transformer-xl-tiny.yaml \
        --data.path .device-data/enwiki_sample.xml --trainer.accelerator gpu --trainer.devices 1 \
        --trainer.precision bf16-mixed --trainer.strategy longlm.training.strategies.DeepSpeedZeRO \
        --trainer.strategy.config configs/deepspeed/$STAGE.json --trainer.max_steps 50 --trainer.limit_val_batches 0 \
        --trainer.default_root_dir /tmp/zero-$STAGE 2>&1 | tail -20 | tee -a "$OUT/zero.log" || true
  done
else
  echo "deepspeed is not importable on this machine: ZeRO rows not measured" | tee "$OUT/zero.log"
fi
