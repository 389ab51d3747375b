#!/usr/bin/env bash
# Set up everything (see scripts/env.sh), then run the main job:
#   bash scripts/main.sh [bench args...]   ->   python -m effilab bench [bench args...]
# Runs from the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

exec python -m effilab bench "$@"
