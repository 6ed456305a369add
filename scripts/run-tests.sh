#!/usr/bin/env bash
# Run the test suite with the project's venv. Extra arguments go to pytest, e.g. -m "not slow".
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
"$repo/.venv/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run-tests: pytest collected no tests" >&2
    rc=0
fi
exit "$rc"
