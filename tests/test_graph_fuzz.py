"""The graph fuzzer's short run (fixed seed), its saved regressions, and checks that its
oracle does reject wrong answers. The long run: `.venv/bin/python tests/graph_fuzz.py`."""

import glob
import json
import os

import pytest
import torch

import graph_fuzz as gf

GRAPHS = int(os.environ.get("KILN_FUZZ_GRAPHS_PY", "300"))
REGRESSIONS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fuzz_regressions", "*.json")))


def test_random_torchscript_functions_match_eager():
    messages = []
    with_kiln, with_symbolic, failures = gf.fuzz(GRAPHS, seed=20261125, log=messages.append)
    assert not failures, "\n".join(messages)
    # Every generated op is one Kiln supports: each graph must have run Kiln code.
    assert with_kiln == GRAPHS
    # Shape sequences move dims: most graphs must have run code for symbolic sizes too.
    assert with_symbolic >= GRAPHS // 2, with_symbolic


@pytest.mark.parametrize("path", REGRESSIONS, ids=[os.path.basename(p) for p in REGRESSIONS])
def test_saved_regression(path):
    with open(path) as f:
        saved = json.load(f)
    problem, kiln_calls = gf.run_case(gf.Case.from_json(saved), saved["seed"], gf.kiln_runs)
    assert problem is None, f"{saved['problem']}: {problem}"
    assert kiln_calls > 0


def test_oracle_rejects_wrong_answers():
    x = torch.linspace(-3, 3, 50)
    want, exact = torch.exp(x), torch.exp(x.double())
    assert gf.agrees(want, [want], exact) is None
    assert gf.agrees(want * (1 + 1e-4), [want, want], exact) is not None
    nan_where_finite = want.clone()
    nan_where_finite[3] = float("nan")
    assert gf.agrees(nan_where_finite, [want], exact) is not None
    assert gf.agrees(want.double(), [want], exact) is not None  # wrong dtype
    ints = torch.arange(5)
    assert gf.agrees(ints + 1, [ints], ints) is not None
