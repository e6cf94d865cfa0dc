#!/usr/bin/env bash
# Run the project's checks: set the host up (idempotent, see scripts/_setup.sh), then
# ruff, mypy, lint-imports (the layers of pyproject.toml) and pytest. Arguments go to pytest:
#   bash scripts/test.sh                       # everything
#   bash scripts/test.sh tests/test_doctor.py -x
# Exit code: pytest's when it fails, otherwise 1 if ruff, mypy or lint-imports found problems.
set -euo pipefail
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
c2l_setup
cd "$C2L_ROOT"

lint=0
c2l_log "ruff check"
"$C2L_VENV/bin/ruff" check . || lint=1
"$C2L_VENV/bin/ruff" format --check . || lint=1
c2l_log "mypy"
"$C2L_VENV/bin/mypy" || lint=1
c2l_log "lint-imports"
"$C2L_VENV/bin/lint-imports" --no-cache || lint=1

c2l_log "pytest $*"
set +e
"$C2L_VENV/bin/pytest" "$@"
rc=$?
set -e
if ((rc != 0)); then
    exit "$rc"
fi
if ((lint != 0)); then
    c2l_log "tests passed, but ruff, mypy or lint-imports reported problems (above)"
    exit 1
fi
