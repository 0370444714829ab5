"""issue 18 item 11 (compile): ``module.model = torch.compile(module.model)`` with ``CausalLMModule``. The token loss
runs the decoder trunk directly (hidden states for the fused op), so compiling the HF model compiled nothing; the
mixin now runs the trunk compiled with the user's own compile context."""

from __future__ import annotations

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
