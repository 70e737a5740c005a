#!/usr/bin/env bash
# Set up (CPU torch wheel, the package with its C++ extension) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q --no-build-isolation -e ".[test,train,triton]"
python -c "import rtmdet, json; print(json.dumps(rtmdet.ops.backend_info(), indent=1))"
python -m pytest -q --durations=15 "$@"
