import os

import sgdlab  # noqa: F401  (before torch computes anything: it sets MKL_CBWR, see sgdlab/__init__.py)

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated datasets in a per-session cache unless the user points SGDLAB_CACHE elsewhere."""
    if "SGDLAB_CACHE" not in os.environ:
        os.environ["SGDLAB_CACHE"] = str(tmp_path_factory.mktemp("sgdlab-cache"))
    yield
