#!/usr/bin/env bash
# Set up everything (see scripts/env.sh), then lint and run the whole test suite.
#   bash scripts/test.sh [pytest args...]
# Exit status: ruff's if it fails, else pytest's (5 = no tests collected: a failure).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

# Lint the folders that exist (git keeps no empty folder, so a clean clone may lack one).
lint_dirs=()
for d in effilab tests benchmarks; do [ -d "$d" ] && lint_dirs+=("$d"); done
if [ ${#lint_dirs[@]} -gt 0 ]; then
    ruff check -q "${lint_dirs[@]}"
fi

# One thread per process: the suite's models are tiny, and on a 2-core machine a second thread only
# fights the loader workers, DDP ranks and notebook kernels the suite starts.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q "$@"
