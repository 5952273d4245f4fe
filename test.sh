#!/usr/bin/env bash
# The test command (README): every test; GPU tests skip cleanly without CUDA. Fails when any test
# fails or when no test ran (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")"
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: no tests ran" >&2; exit 1; fi
exit "$rc"
