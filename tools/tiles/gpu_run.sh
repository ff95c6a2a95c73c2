#!/usr/bin/env bash
# The GPU run for a short GPU slot: everything a lent GPU should tell us, within TOTAL_S seconds (default 500) from
# a bare machine, each step bounded so a hang or a failure costs only its own share:
#   1. env.txt     the card, driver, versions, commit
#   2. tests.txt   the CUDA test suite (test_compile_report left out: CPU-only, CI runs it), 8 pytest workers
#                  (pytest-xdist) so Triton's compiles run side by side; tests.xml has every test's outcome
#   3. tune.txt    python -m tools.tiles.tune: candidate attention tiles timed (bench/results/<card>/tiles.md|json)
#   4. gpt-train.txt  300 steps of gpt-train --preset reference with its defaults, beside SDPA + native LayerNorm
#                  and with --cuda-graphs: each run's final speed line (bench/results/<card>/gpt-train.md)
#   5. suite.txt   python -m bench.suite --skip-tests with the time left: attention, LayerNorm, training, decoding,
#                  the headline pytest-benchmark shapes (bench/results/<card>/)
#   6. results.tgz bench/results, to commit under bench/results/<card>/
# A step that fails is recorded and the run goes on. Everything lands in $OUT (default /tmp/gpu-out).
# Run from the checkout's root on the GPU machine: bash tools/tiles/gpu_run.sh
# DRY_RUN=1 checks the plumbing on a machine without a GPU (tests/test_gpu_run.py does): a handful of tests, the
# tuner's every candidate checked on CPU without timing, the suite's steps listed, the tarball.
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# The checkout's .venv when `make` built one, else the machine's python3 (the lent GPU machines have torch there).
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
OUT=${OUT:-/tmp/gpu-out}
TOTAL_S=${TOTAL_S:-500}
TESTS_S=${TESTS_S:-150}
TUNE_S=${TUNE_S:-110}
TRAIN_S=${TRAIN_S:-150}
mkdir -p "$OUT"
started=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - started) )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PYTHON" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  date -u; git log -1 --format='%H %s' 2>/dev/null; } > "$OUT/env.txt" 2>&1

# pytest-xdist and pytest-timeout where installed (the GPU machines have both); SIGINT at the step's end, so
# pytest still prints its summary of failures and writes the XML.
plugins=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")
plugins="$plugins $("$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")"
dry=${DRY_RUN:+--dry-run}
selected=${DRY_RUN:+-k public_api}
timeout -s INT -k 20 "$TESTS_S" "$PYTHON" -m pytest -v --tb=short $plugins -p no:cacheprovider -rfE $selected \
  --ignore=tests/test_compile_report.py --junitxml="$OUT/tests.xml" tests > "$OUT/tests.txt" 2>&1
echo "tests exit $? after $(( $(date +%s) - started )) s" >> "$OUT/tests.txt"

timeout $(( TUNE_S + 60 )) "$PYTHON" -m tools.tiles.tune --budget-s "$TUNE_S" $dry > "$OUT/tune.txt" 2>&1
echo "tune exit $? after $(( $(date +%s) - started )) s" >> "$OUT/tune.txt"

steps=${DRY_RUN:+--preset cpu --device cpu --max-iters 3 --eval-interval 3 --eval-iters 1}
steps=${steps:---preset reference --max-iters 300 --eval-interval 300 --eval-iters 10}
{ echo "# gpt-train, $steps: the final summary's speed (evaluation and warm-up left out)"; echo
  echo "| run | flags | speed |"; echo "| --- | --- | --- |"
  for run in "defaults:" "sdpa:--attention sdpa --layernorm eager" "cuda-graphs:--cuda-graphs"; do
    name=${run%%:*}; flags=${run#*:}
    timeout $(( TRAIN_S / 3 )) "$PYTHON" -m gpt.train $steps --sample-tokens 0 --out-dir "$OUT/gpt-train-$name" \
      $flags > "$OUT/gpt-train-$name.txt" 2>&1
    echo "| $name | ${flags:-none} | $(grep -m1 '^speed: [0-9]' "$OUT/gpt-train-$name.txt" | cut -c8-) |"
  done; } > "$OUT/gpt-train.txt"
if [ -z "${DRY_RUN:-}" ]; then
  card=$("$PYTHON" -c "import torch; from bench.common import card_slug as s; print(s(torch.cuda.get_device_name()))")
  mkdir -p "bench/results/$card" && cp "$OUT/gpt-train.txt" "bench/results/$card/gpt-train.md"
fi
echo "gpt-train done after $(( $(date +%s) - started )) s" >> "$OUT/gpt-train.txt"

suite_s=$(( $(left) - 15 ))
timeout $(( suite_s + 10 )) "$PYTHON" -m bench.suite --skip-tests --total-s "$suite_s" $dry > "$OUT/suite.txt" 2>&1
echo "suite exit $? after $(( $(date +%s) - started )) s" >> "$OUT/suite.txt"

tar czf "$OUT/results.tgz" bench/results 2>/dev/null
cat "$OUT/env.txt"; grep -E "passed|failed|exit" "$OUT/tests.txt" | tail -3
grep -A3 "should change" -m1 "$OUT/tune.txt"; tail -12 "$OUT/tune.txt" | grep exit; cat "$OUT/gpt-train.txt"; tail -20 "$OUT/suite.txt"
