"""issue 18 item 11 (compile): ``module.model = torch.compile(module.model)`` with ``CausalLMModule``. The token loss
runs the decoder trunk directly (hidden states for the fused op), so compiling the HF model compiled nothing; the
mixin now runs the trunk compiled with the user's own compile context."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import ListDataModule, SGDModule, quiet_trainer, tiny_config


def _fit(module):
    quiet_trainer([], max_steps=2, limit_val_batches=0).fit(module, datamodule=ListDataModule(n_batches=2))
    return {n.replace("._orig_mod", ""): p.detach().clone() for n, p in module.named_parameters()}


def test_compiled_model_compiles_the_trunk_and_trains_like_eager():
    """issue 18 item 11: with ``module.model = torch.compile(module.model, backend=...)`` the trunk goes through
    dynamo with that backend (graphs are compiled) and 2 SGD steps give the eager run's weights."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SGDModule(model_config=tiny_config())
    init = {k: v.clone() for k, v in eager.state_dict().items()}
    compiled = SGDModule(model_config=tiny_config())
    compiled.load_state_dict(init)
    counter = CompileCounterWithBackend("aot_eager")  # traced through autograd, run by eager kernels: exact
    compiled.model = torch.compile(compiled.model, backend=counter)
    want = _fit(eager)
    got = _fit(compiled)
    assert counter.frame_count > 0, "torch.compile(module.model) compiled nothing"
    assert counter.op_count > 20  # the decoder layers, not a stray helper
    assert want.keys() == got.keys()
    moved = False
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(w, init[name])
    assert moved
    # the wrapper keeps no second copy of the parameters and the checkpoint keys are the compiled model's own
    assert len(list(compiled.parameters())) == len(list(eager.parameters()))


def _fit_pairs(module, callbacks):
    from tests.pairs import PairData

    quiet_trainer(callbacks, max_steps=2, limit_val_batches=0).fit(module, datamodule=PairData(n_batches=2))
    return {n.replace("._orig_mod", ""): p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("with_dpo", [True, False], ids=["token_dpo", "sft_on_chosen"])
def test_a_compiled_preference_module_compiles_the_trunk_and_trains_like_eager(with_dpo):
    """PreferenceModule's own steps (TokenDPO's pair step, and SFT on the chosen side without one) run the trunk
    themselves; they take it from the mixin's ``loss_parts``, so a compiled model's trunk goes through dynamo (the
    matrix's compile cell for TokenDPO exercised nothing before) and 2 steps give the eager run's weights."""
    from lit_ft.callbacks import TokenDPO
    from tests.pairs import preference_module

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = preference_module()
    init = {k: v.clone() for k, v in eager.state_dict().items()}
    compiled = preference_module()
    compiled.load_state_dict(init)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.model = torch.compile(compiled.model, backend=counter)
    want = _fit_pairs(eager, [TokenDPO(beta=0.5)] if with_dpo else [])
    got = _fit_pairs(compiled, [TokenDPO(beta=0.5)] if with_dpo else [])
    assert counter.frame_count > 0 and counter.op_count > 20, "the preference step compiled nothing"
    moved = False
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(w, init[name])
    assert moved


@pytest.mark.parametrize("technique", ["QTuning", "GreenTrainer"])
def test_a_flops_measured_step_does_not_leave_a_compiled_model_eager_for_good(technique):
    """QTuning and GreenTrainer count a step's FLOPs at step 0 (FlopCounterMode; GreenTrainer also profiles under a
    dispatch mode). Dynamo skips a frame it meets under a dispatch mode and kept skipping it for the whole run, so a
    compiled model never compiled; the counted code now runs in dynamo's force_eager stance and steps 1-2 compile,
    with the eager run's weights."""
    import lit_ft.callbacks as cbs

    def fit(module):
        extra = {"plot_every_n_steps": 0} if technique == "QTuning" else {}
        quiet_trainer([getattr(cbs, technique)(**extra)], max_steps=3, limit_val_batches=0).fit(
            module, datamodule=ListDataModule(n_batches=3))
        return {n.replace("._orig_mod", ""): p.detach().clone() for n, p in module.named_parameters()}

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SGDModule(model_config=tiny_config())
    compiled = SGDModule(model_config=tiny_config())
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled.model = torch.compile(compiled.model, backend=counter)
    want, got = fit(eager), fit(compiled)
    assert counter.frame_count > 0, f"{technique}: the compiled model never compiled"
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_a_compiled_verbalizer_module_compiles_the_trunk_and_matches_eager():
    """VerbalizerClassificationModule scores label words from the trunk's last hidden state (it never calls the HF
    model): its trunk comes from ``lit_ft.core.compiled_trunk.loss_parts`` too, so compiling ``module.model``
    compiles the step (SelfTraining's classification case runs this module); loss and gradients equal eager's."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from lit_ft.modules import VerbalizerClassificationModule
    from lit_ft.testing import tiny_llama_config
    from tests.self_training_case import LABEL_WORDS, tiny_files

    tok = AutoTokenizer.from_pretrained(tiny_files()[0])

    def make():
        torch.manual_seed(0)
        m = VerbalizerClassificationModule(model_config=tiny_llama_config(vocab_size=384), label_words=LABEL_WORDS)
        m.build_verbalizer(tok)
        return m

    ids = torch.randint(3, 300, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1, 0])

    def loss_and_grads(m):
        loss = F.cross_entropy(m(ids, mask), labels)
        loss.backward()
        return loss.detach(), {n.replace("._orig_mod", ""): p.grad for n, p in m.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    eager, compiled = make(), make()
    counter = CompileCounterWithBackend("aot_eager")
    compiled.model = torch.compile(compiled.model, backend=counter)
    (want, gw), (got, gg) = loss_and_grads(eager), loss_and_grads(compiled)
    assert counter.frame_count > 0 and counter.op_count > 20, "the verbalizer step compiled nothing"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert gw.keys() == gg.keys() and gw
    for name, g in gw.items():
        torch.testing.assert_close(gg[name], g, rtol=1e-5, atol=1e-6, msg=name)
