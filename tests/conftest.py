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
