#!/usr/bin/env bash
# Command 2: set up (if needed) and run every test: Rust unit and kernel tests, then the
# Python end-to-end and differential tests against eager PyTorch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"
# The bridge's test binary links libtorch; the extension finds it through `import torch`.
export LD_LIBRARY_PATH="$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --release --workspace --exclude torch-kiln
# The kernel tests again with the AVX2 tiles (on an AVX-512 host they are not picked).
KILN_VECTOR_LANES=8 cargo test --release -p kiln-compiler --test gemm --test conv --test sparse
.venv/bin/python -m pytest -q tests "$@"
