#!/usr/bin/env bash
# The GPU work of the benchmarks, on a lent device machine (see "On a lent GPU machine" in
# benchmarks/README.md). Each machine starts bare and its time is short, so every step installs
# what it needs, stays inside STEP_SECONDS, and leaves everything worth keeping in $OUT:
#
#   bash benchmarks/device_run.sh check                      # versions + the CUDA tests of ops/codegen/backend
#   bash benchmarks/device_run.sh kernels --schemes nf4_dq --shapes qo_proj --m 1,16,4096
#   bash benchmarks/device_run.sh e2e --model 8b --layers 8
#
# Kernel and e2e results accumulate in benchmarks/results/gpu/ (the benchmarks merge a run's rows
# into the file already there, which travels with the working tree), and so does the autotune
# cache (autotune.json), so a later call neither re-measures nor re-tunes what an earlier one did.
# Copy the returned files back into benchmarks/results/gpu/ and commit them between calls.
set -uo pipefail

step=${1:?usage: device_run.sh check|kernels|e2e [benchmark arguments]}
shift
: "${OUT:?OUT must name the folder whose files come back (the device tool sets it)}"
PYTHON=${PYTHON:-python3}
STEP_SECONDS=${STEP_SECONDS:-540}  # the device tool stops a command at 600 s and returns nothing of a killed pipe
RESULTS=${RESULTS:-benchmarks/results/gpu}
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1 QCOMPILE_CACHE_DIR=${QCOMPILE_CACHE_DIR:-$RESULTS}
mkdir -p "$RESULTS" "$OUT"

install() {
    # bitsandbytes is not in the GPU image: its wheel travels in .whl/ (carry: [".whl"]).
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # --no-deps: the image's torch/triton are used as they are; nothing can be fetched there.
    "$PYTHON" -c "import qcompile.passes" 2>/dev/null \
        || "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || return 1
}

collect() {
    # At most 8 files come back from $OUT: the step's log, its JSON and plots, and the autotune cache.
    local name
    for name in "$@"; do
        cp "$RESULTS"/$name "$OUT"/ 2>/dev/null || true
    done
}

# Not piped: install exports PYTHONPATH for the steps below.
install >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; echo "install failed"; exit 1; }
rm -f "$OUT/install.log"
case "$step" in
    check)
        "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/check.log"
import torch, triton
import importlib.util
bnb = importlib.util.find_spec("bitsandbytes")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
print("torch", torch.__version__, "triton", triton.__version__,
      "bitsandbytes", __import__("bitsandbytes").__version__ if bnb else "missing")
EOF
        timeout "$STEP_SECONDS" "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/ops tests/codegen tests/backend \
            "$@" 2>&1 | tee -a "$OUT/check.log"
        status=$?
        ;;
    kernels)
        timeout "$STEP_SECONDS" "$PYTHON" -m benchmarks.kernels --out "$RESULTS" "$@" 2>&1 | tee "$OUT/kernels.log"
        status=$?
        collect kernels.json "kernels_*.png" autotune.json
        ;;
    e2e)
        timeout "$STEP_SECONDS" "$PYTHON" -m benchmarks.e2e --out "$RESULTS" "$@" 2>&1 | tee "$OUT/e2e.log"
        status=$?
        collect "e2e*.json" "e2e*.png" autotune.json
        ;;
    *)
        echo "unknown step $step: check, kernels or e2e" >&2
        exit 2
        ;;
esac
exit $status
