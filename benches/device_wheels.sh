#!/usr/bin/env bash
# Download into .whl/ (git-ignored) every wheel the device needs and its image lacks, for
# CPython 3.12 manylinux x86-64, pinned. The device has no network: a run names `.whl` in its
# carry and benches/gpu_run.sh installs .whl/*.whl into /tmp/site (on PYTHONPATH).
#
#   bash benches/device_wheels.sh        # here, with network; again is a no-op
#
# The device image already holds torch, triton, numpy, scipy, matplotlib, opencv-python-headless
# (mmengine's cv2), pillow, pyyaml, rich, six, tqdm, packaging, requests, psutil, pytest and
# hypothesis (its package list), so those are not carried. Every
# install is --no-deps: the list below is the closure of the Requires-Dist lines (extras aside)
# of what we carry, less what the image has.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl

WHEELS=(
  mmengine==0.10.7 mmcv-lite==2.0.1 mmdet==3.3.0 mmyolo==0.6.0  # the frameworks tests and benches compare with
  addict==2.4.0 yapf==0.43.0 termcolor==3.3.0   # mmengine (and mmcv-lite: addict, yapf)
  platformdirs==4.14.9                           # yapf's (`import mmdet` failed without it)
  pycocotools==2.0.11 shapely==2.2.0 terminaltables==3.1.10   # mmdet; pycocotools: rtmdet.evaluation too
  prettytable==3.19.0 wcwidth==0.7.0             # mmyolo; wcwidth: prettytable's
  lapx==0.11.1                                   # bench_hungarian.py's outside solvers: lapjv (module `lap`)
  torch-linear-assignment==0.1.0                 # pure Python since 0.1.0 (Triton on CUDA, scipy on CPU)
)
# lap installs the module `lap` too: in one --target folder it would overwrite lapx's files.
# It stays in .whl/lap/ (not installed by gpu_run.sh); to time it as well:
#   pip install --no-deps --target /tmp/lap .whl/lap/*.whl; bench_hungarian.py --lap-site /tmp/lap
APART=(lap==0.5.13)
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

fetch() {  # fetch DIR NAME==VERSION...: the wheels (pure-Python ones are py3-none-any)
  local dir=$1; shift
  mkdir -p "$dir"
  # (a pip configured with index folders that are absent here warns about each: noise)
  python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$dir" "$@" \
    2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2)
}

prune() {  # prune DIR NAME==VERSION...: one version per package; say what is not ours
  local dir=$1; shift
  declare -A want=()
  for spec in "$@"; do
    local name=${spec%%==*}
    want[${name//-/_}]=${spec##*==}
  done
  for f in "$dir"/*.whl; do
    local base name version
    base=$(basename "$f"); name=${base%%-*}; version=${base#*-}; version=${version%%-*}
    name=${name,,}
    if [[ -z ${want[$name]+x} ]]; then
      echo "device_wheels: $f is not from this list (kept)"
    elif [[ ${want[$name]} != "$version" ]]; then
      echo "device_wheels: removing $f (pinned: $name ${want[$name]})"; rm -f "$f"
    fi
  done
}

fetch "$DEST" "${WHEELS[@]}"
fetch "$DEST/lap" "${APART[@]}"
prune "$DEST" "${WHEELS[@]}"
prune "$DEST/lap" "${APART[@]}"

# every wheel must install on CPython 3.12 x86-64 Linux
bad=$(ls "$DEST"/*.whl "$DEST"/lap/*.whl | grep -v -E -e '-(py3|py2\.py3)-none-any\.whl$' \
      -e '-cp312-(cp312|abi3)-[^/]*manylinux[^/]*x86_64[^/]*\.whl$' || true)
if [[ -n $bad ]]; then echo "device_wheels: not for CPython 3.12 x86-64: $bad" >&2; exit 1; fi

ls -l "$DEST"/*.whl "$DEST"/lap/*.whl | awk '{printf "%10d  %s\n", $5, $9}'
total=$(cat "$DEST"/*.whl "$DEST"/lap/*.whl | wc -c)
echo "device_wheels: $(ls "$DEST"/*.whl "$DEST"/lap/*.whl | wc -l) wheels, $((total / 1024)) KiB" \
     "($(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB of the 64 MiB a run carries)"
if (( total > 48 * 1048576 )); then echo "device_wheels: too large to carry beside a build" >&2; exit 1; fi
