#!/usr/bin/env bash
# Runs a two-process test N times in a row and reports each failure, to show that a rare one is gone.
# The default is the 2-process eval that once ended with "terminate called without an active exception".
#   scripts/repeat_2proc.sh [N] [PYTEST_NODE_ID]
#   scripts/repeat_2proc.sh 20
#   scripts/repeat_2proc.sh 20 tests/test_multiprocess_faults.py::test_both_ranks_sigtermed_together_resume_bit_identical
# PYTHON names the interpreter (default: python), e.g. PYTHON=.venv/bin/python.
# Each run's output is kept in a temporary folder; the script names it and exits 1 when any run failed.
set -u
n=${1:-20}
test=${2:-tests/test_engine.py::test_two_processes_give_the_same_eval_as_one}
python=${PYTHON:-python}
cd "$(dirname "$0")/.."
logs=$(mktemp -d -t repeat-2proc-XXXX)
failed=0
for i in $(seq 1 "$n"); do
    log="$logs/run-$i.log"
    if "$python" -m pytest -q -p no:cacheprovider "$test" >"$log" 2>&1; then
        echo "run $i/$n: passed"
    else
        failed=$((failed + 1))
        echo "run $i/$n: FAILED (see $log)"
    fi
    if grep -q 'terminate called' "$log"; then
        echo "run $i/$n: 'terminate called' in the output"
    fi
done
echo "$failed of $n runs failed; logs in $logs"
[ "$failed" -eq 0 ]
