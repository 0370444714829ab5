"""Prompt techniques train at their paper's learning rates by default, not the LightningModule's.

Each technique's default rate must reach the optimizer (its tensors' param groups hold it as their base lr), and a
rate the user gives must win over the default. The module's own lr (1e-3) differs from every default, so a default
that silently fell back to the optimizer's lr fails here.
"""

from __future__ import annotations

import pytest
import torch

from lit_ft.callbacks import CPT, EPT, IAPT, PANDA, PTEC, DePT, PrefixTuning, ProMoT, PromptTuning
from lit_ft.callbacks.prompt import cpt, dept, panda, prefix_tuning, prompt_tuning
from lit_ft.modules import CausalLMModule
from tests.helpers import ListDataModule, quiet_trainer, tiny_config

MODULE_LR = 1e-3
EXAMPLES = [{"input": "3 plus 4", "output": "7"}, {"input": "2 plus 2", "output": "4"}]


def base_lr_of(optimizer, tensor: torch.Tensor) -> float:
    group = next(g for g in optimizer.param_groups if any(p is tensor for p in g["params"]))
    return float(group.get("initial_lr", group["lr"]))


def fitted(cb) -> tuple:
    """One optimizer step of a tiny causal LM (module lr ``MODULE_LR``, a warm-up scheduler) with ``cb``."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=MODULE_LR, weight_decay=0.1, warmup_steps=2)
    t = quiet_trainer([cb], max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=1))
    return module, t.optimizers[0]


def prompt_tensors(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if n.startswith("lit_ft_prompts.")}


# (factory with default rates, expected base lr per tensor-name suffix (first match wins))
DEFAULTS = {
    "prompt_tuning": (lambda tok: PromptTuning(num_virtual_tokens=4), {"": 0.3}),
    "prefix_tuning": (lambda tok: PrefixTuning(num_virtual_tokens=4), {"": 5e-3}),
    "promot": (lambda tok: ProMoT(num_virtual_tokens=4, prompt_steps=5), {"": 0.3}),
    "dept": (lambda tok: DePT(num_virtual_tokens=4, rank=2), {"lora_embedding_A": 5e-3, "lora_embedding_B": 5e-3,
                                                              "": 0.3}),
    "ept": (lambda tok: EPT(num_virtual_tokens=4, rank=2, num_subspaces=2, projection_rank=2, fusion_dim=8),
            {"embedding.weight": 0.3, "": 5e-3}),
    "cpt": (lambda tok: CPT(examples=EXAMPLES, tokenizer=tok), {"": 1e-4}),
}


def expected_lr(name: str, table: dict[str, float]) -> float:
    return next(v for suffix, v in table.items() if name.endswith(suffix))


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_default_rates_reach_the_optimizer(key, tiny_tokenizer_path):
    make, table = DEFAULTS[key]
    module, opt = fitted(make(tiny_tokenizer_path))
    tensors = prompt_tensors(module)
    assert tensors
    for name, p in tensors.items():
        lr = base_lr_of(opt, p)
        assert lr == pytest.approx(expected_lr(name, table)), name
        assert lr != MODULE_LR


def test_dept_default_weight_decay_is_the_authors():
    module, opt = fitted(DePT(num_virtual_tokens=4, rank=2))
    for name, p in prompt_tensors(module).items():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        assert group["weight_decay"] == dept.DEFAULT_WEIGHT_DECAY, name


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_an_explicit_rate_overrides_the_default(key, tiny_tokenizer_path):
    make, _ = DEFAULTS[key]
    cb = make(tiny_tokenizer_path)
    cb.learning_rate = 0.0123  # as if given to the constructor
    if hasattr(cb, "lowrank_learning_rate"):
        cb.lowrank_learning_rate = 0.0456
    module, opt = fitted(cb)
    for name, p in prompt_tensors(module).items():
        low = "lora_embedding_" in name or (key == "ept" and not name.endswith("embedding.weight"))
        assert base_lr_of(opt, p) == pytest.approx(0.0456 if low else 0.0123), name


def test_explicit_constructor_rates_and_null_mean_the_optimizers():
    cb = DePT(num_virtual_tokens=4, rank=2, learning_rate=0.02, lowrank_learning_rate=None)
    module, opt = fitted(cb)
    for name, p in prompt_tensors(module).items():
        want = MODULE_LR if "lora_embedding_" in name else 0.02
        assert base_lr_of(opt, p) == pytest.approx(want), name


def test_constructor_defaults_are_the_documented_constants():
    """The techniques whose fit needs more set-up (a source prompt, a classifier) are checked at construction; the
    shared path that carries a rate into the optimizer is the one tested above."""
    assert PromptTuning().learning_rate == prompt_tuning.DEFAULT_LEARNING_RATE == 0.3
    assert PrefixTuning().learning_rate == prefix_tuning.DEFAULT_LEARNING_RATE == 5e-3
    assert ProMoT().learning_rate == 0.3
    d = DePT()
    assert (d.learning_rate, d.lowrank_learning_rate, d.weight_decay) == (0.3, 5e-3, 1e-5)
    e = EPT()
    assert (e.learning_rate, e.lowrank_learning_rate, e.weight_decay) == (0.3, 5e-3, 1e-5)
    assert CPT(examples=EXAMPLES).learning_rate == cpt.DEFAULT_LEARNING_RATE == 1e-4
    assert PANDA().learning_rate == panda.DEFAULT_LEARNING_RATE == 7e-3
    p = PTEC()
    assert (p.learning_rate, p.head_learning_rate) == (3e-3, 1e-5)
    assert IAPT().learning_rate is None  # not settled from the paper: the optimizer's (documented on iapt.md)
