#!/usr/bin/env bash
# Everything GPU in one call of the device tool: GPU tests, flow, pipeline, encoder and policy benchmarks.
# For the gl texture backend, unpack the GL loader .debs first (see docs/BENCHMARKS.md / the device README).
# Usage (on the GPU machine, from the repository root; OUT is the folder whose files come back):
#   FOVEA_SHARED_DATA=<copy of ../shared/data> OUT=<folder> bash tools/gpu_session.sh
# FOVEA_BENCHES picks the benchmarks (default: "flow pipeline encoder policy"); FOVEA_GPU_TESTS the test
# paths (default: test/unit).
# It uses the machine's own Python (no venv: that machine has no package registry); ROS is not needed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
# The gl texture backend: GL loader libraries and the PyOpenGL wheel from a git-ignored .gl/ folder
# (see docs/BENCHMARKS.md, "gl texture backend"); without it the gl tests and rows are skipped.
if [ -d .gl ]; then
  for deb in .gl/*.deb; do dpkg -x "$deb" /; done
  ldconfig
  ls .gl/pyopengl-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .gl/pyopengl-*.whl
  export PYOPENGL_PLATFORM=egl
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, cv2, numpy; print('torch', torch.__version__, 'cv2', cv2.__version__, 'numpy', numpy.__version__)" \
  | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -rs -p no:cacheprovider -m gpu -s ${FOVEA_GPU_TESTS:-test/unit} > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
declare -A bench_rc
for bench in ${FOVEA_BENCHES:-flow pipeline encoder policy}; do
  case $bench in
    flow) args=(--resolutions 640x480 1280x720 1920x1080 --scale 1.0 --grid 4 --runs 100 --presets ultrafast fast medium) ;;
    pipeline) args=(--resolutions 640x480 1280x720 1920x1080 --frames 200 --device cuda) ;;
    encoder) args=(--resolutions 1280x720 1920x1080 --device cuda --runs 200) ;;
    policy) args=(--device cuda --runs 1000 --frames 300 --resolution 1920x1080) ;;
    *) echo "unknown benchmark $bench"; continue ;;
  esac
  python3 -m fovea_vla.cli bench "$bench" "${args[@]}" --json "$OUT/bench_$bench.json" > "$OUT/bench_$bench.md" 2>&1
  bench_rc[$bench]=$?
done
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md"

echo "== GPU tests (rc=$tests_rc)"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
for bench in "${!bench_rc[@]}"; do
  echo "== bench $bench (rc=${bench_rc[$bench]})"
  grep -E "^\||reuse|Skipped|Error|error" "$OUT/bench_$bench.md" | head -60
done
