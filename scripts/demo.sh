#!/usr/bin/env bash
# The main job: set up, train RTMDet-tiny on the built-in synthetic dataset, evaluate it with
# pycocotools, and write the loss/mAP curves and a few predicted images to runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off (only matters under torchrun on GPUs)
python -m pip install -q torch==2.13.0
python -m pip install -q --no-build-isolation -e ".[train]"
python -m rtmdet train --model tiny --data synthetic --preset cpu-demo --out runs/demo "$@"
