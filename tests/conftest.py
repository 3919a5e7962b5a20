import os
import warnings

import pytest
import torch
import torch_kiln

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session", autouse=True)
def kiln_enabled(tmp_path_factory):
    # A disk cache of the session's own: entries from earlier runs must not decide what a test
    # sees (a disk hit would hide a compile), and tests must not write to the user's cache.
    os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("kiln-cache"))
    # Synchronous compiles unless a test asks for background ones: most tests assert what the
    # compiled code did at a known call (tests/test_background.py tests the compile thread).
    # Subprocesses the tests start inherit this.
    os.environ["KILN_BACKGROUND"] = "0"
    torch_kiln.enable()
    yield
    torch_kiln.disable()
