#!/usr/bin/env bash
# Command 1: set up (if needed) and run the demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$KILN_ROOT/scripts/setup.sh"
exec "$KILN_ROOT/.venv/bin/python" "$KILN_ROOT/examples/demo.py"
