#!/bin/bash
# Runs N short CP 2 launcher runs (5 steps each, ~40 s on 2 CPU cores) and counts the runs that exit non-zero.
# A finished run must exit 0: a non-zero exit after the metrics were written is the exit abort of issue 14.
# Each failing run's log is kept in LOG_DIR, with the Python stacks of every thread (PYTHONFAULTHANDLER) and,
# when gdb is installed, the native backtrace of every thread from the core file.
#   bash scripts/stress_exit.sh [N=50]        LOG_DIR=/tmp/stress_exit  SCRIPT=run_magi_clm.sh
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
LOG_DIR=${LOG_DIR:-/tmp/stress_exit}
SCRIPT=${SCRIPT:-run_magi_clm.sh}
mkdir -p "$LOG_DIR"
ulimit -c unlimited 2>/dev/null || true
failed=0
for i in $(seq 1 "$N"); do
  run_dir=$(mktemp -d)
  log="$LOG_DIR/run$i.log"
  PYTHONFAULTHANDLER=1 MAX_STEPS=5 OUTPUT_DIR="$run_dir/out" bash "$SCRIPT" >"$log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    failed=$((failed + 1))
    # The ranks run in the repository root, where an aborting rank leaves its core (kernel.core_pattern "core").
    for core in core core.*; do
      [ -f "$core" ] || continue
      if command -v gdb >/dev/null; then
        gdb -q -batch -ex "thread apply all bt" "$(python3 -c "import sys; print(sys.executable)")" "$core" >"$LOG_DIR/run$i.$core.bt" 2>&1
      fi
      rm -f "$core"
    done
    echo "run $i: exit $rc (log: $log)"
  else
    rm -f "$log"
  fi
  rm -rf "$run_dir"
done
echo "$failed of $N runs exited non-zero"
[ $failed -eq 0 ]
