#!/usr/bin/env bash
# Everything GPU in one call of the device tool: GPU tests, flow, pipeline and encoder benchmarks.
# For the gl texture backend, unpack the GL loader .debs first (see docs/BENCHMARKS.md / the device README).
# Usage (on the GPU machine, from the repository root; OUT is the folder whose files come back):
#   FOVEA_SHARED_DATA=<copy of ../shared/data> OUT=<folder> bash tools/gpu_session.sh
# FOVEA_BENCH_FLOW=0 skips the flow benchmark (when flow did not change).
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

python3 -m pytest -q -rs -p no:cacheprovider -m gpu -s test/unit > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
flow_rc=skipped
if [ "${FOVEA_BENCH_FLOW:-1}" = 1 ]; then
  python3 -m fovea_vla.cli bench flow --resolutions 640x480 1280x720 1920x1080 --scale 1.0 --grid 4 --runs 100 \
    --presets ultrafast fast medium --json "$OUT/bench_flow.json" > "$OUT/bench_flow.md" 2>&1
  flow_rc=$?
fi
python3 -m fovea_vla.cli bench pipeline --resolutions 640x480 1280x720 1920x1080 --frames 200 --device cuda \
  > "$OUT/bench_pipeline.md" 2>&1
pipeline_rc=$?
python3 -m fovea_vla.cli bench encoder --resolutions 1280x720 1920x1080 --device cuda --runs 200 \
  --json "$OUT/bench_encoder.json" > "$OUT/bench_encoder.md" 2>&1
encoder_rc=$?
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md"

echo "== GPU tests (rc=$tests_rc)"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
echo "== bench flow (rc=$flow_rc)"; grep -E "^\|" "$OUT/bench_flow.md" | head -40
echo "== bench pipeline (rc=$pipeline_rc)"; grep -E "total|flow" "$OUT/bench_pipeline.md" | head -20
echo "== bench encoder (rc=$encoder_rc)"; grep -E "^\||reuse|Skipped|Error|error" "$OUT/bench_encoder.md" | head -60
