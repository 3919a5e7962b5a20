import warnings

import pytest
import torch
import torch_kiln

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session", autouse=True)
def kiln_enabled():
    torch_kiln.enable()
    yield
    torch_kiln.disable()
