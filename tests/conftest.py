import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# property tests draw the same examples on every run: a failure reproduces, a pass is not luck
settings.register_profile("fxbackmatch", derandomize=True, deadline=None, database=None, print_blob=True)
settings.load_profile("fxbackmatch")


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="run the tests marked slow as well (the default run deselects them; -m EXPR selects by EXPR alone)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "slow: the full zoo, one process group per distributed mode, end-to-end scripts; "
                   "deselected unless -m selects them (pytest -m slow) or --runslow is given")


def _named(config) -> list[tuple[Path, str]]:
    """Test ids named on the command line (``path::name``): those run even when slow."""
    out = []
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        if sep:
            out.append((Path(path).resolve(), rest))
    return out


def pytest_collection_modifyitems(config, items):
    if not (config.getoption("--runslow") or config.getoption("markexpr")):
        named = _named(config)
        keep, slow = [], []
        for item in items:
            asked = any(item.path.resolve() == p and item.nodeid.split("::", 1)[-1].startswith(r) for p, r in named)
            (slow if item.get_closest_marker("slow") and not asked else keep).append(item)
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = keep
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
