#!/usr/bin/env bash
# Set up (CPU torch wheel, the package with its C++ extension) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q --no-build-isolation -e ".[test,train,triton]"
# The outside frameworks the integration tests run against, pinned. --no-deps: their own
# pins would pull another torch, a GUI OpenCV or mmcv's compiled build; their pure-Python
# needs are listed on the first line instead.
python -m pip install -q addict yapf termcolor rich shapely six terminaltables prettytable pyyaml \
    opencv-python-headless psutil polars requests ultralytics-thop
python -m pip install -q --no-deps mmengine==0.10.7 mmcv-lite==2.0.1 mmdet==3.3.0 mmyolo==0.6.0 \
    ultralytics==8.4.190 torchvision==0.28.0
python -c "import rtmdet, json; print(json.dumps(rtmdet.ops.backend_info(), indent=1))"
python -m pytest -q --durations=15 "$@"
