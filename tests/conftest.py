import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: compiles or trains; still CPU-sized")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory):
    """Decoded data packs go to a temporary folder, never to the user's ~/.cache."""
    old = os.environ.get("FXBACKMATCH_CACHE")
    os.environ["FXBACKMATCH_CACHE"] = str(tmp_path_factory.mktemp("decoded"))
    yield
    if old is None:
        os.environ.pop("FXBACKMATCH_CACHE", None)
    else:
        os.environ["FXBACKMATCH_CACHE"] = old
