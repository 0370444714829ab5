"""The auxiliary-loss extension point of TokenLossMixin (lit_ft.core.tokens.AuxiliaryLoss): a registered term is
added to the token-loss sum and normalised with it; logits_at gives the model's logits at the asked positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_ft.core.tokens import AuxiliaryLoss, AuxLossInputs, shift_targets, token_pipeline_for
from lit_ft.modules import CausalLMModule
from tests.helpers import random_batch, tiny_config


class SquaredLogits(AuxiliaryLoss):
    """``c * mean(z^2)`` over the valid positions, as a per-token mean (times n_tokens, per the contract)."""

    def __init__(self, c: float) -> None:
        self.c = c
        self.seen: list[AuxLossInputs] = []

    def aux_loss(self, inputs):
        self.seen.append(inputs)
        z = inputs.logits_at(inputs.valid)
        return self.c * (z**2).mean() * inputs.n_tokens


def module():
    torch.manual_seed(0)
    m = CausalLMModule(model_config=tiny_config(), loss_impl="torch")
    m.train()
    return m


def test_aux_term_value_gradient_and_logits_at():
    m = module()
    aux = SquaredLogits(0.3)
    token_pipeline_for(m).register_aux(aux)
    batch = random_batch(batch_size=3, seq_len=9, prompt_len=2)
    out = m.compute_token_loss(batch, m.model)
    # by hand, from the HF model's own logits
    logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = shift_targets(batch["labels"])
    valid = targets != -100
    ce = F.cross_entropy(logits[valid], targets[valid])
    extra = 0.3 * (logits[valid] ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), (ce + extra).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mean, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux, extra.detach(), rtol=1e-5, atol=1e-6)
    inputs = aux.seen[-1]
    assert inputs.training and torch.equal(inputs.valid, valid) and int(inputs.n_tokens) == int(valid.sum())
    torch.testing.assert_close(inputs.logits_at(valid).detach(), logits[valid].detach(), rtol=1e-5, atol=1e-6)
    # gradient after the deferred normalisation = gradient of the hand loss
    out.loss.backward()
    token_pipeline_for(m).finalize_gradients(m.parameters())
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (ce + extra).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_eval_and_unregister():
    m = module()
    aux = SquaredLogits(0.3)
    pipe = token_pipeline_for(m)
    pipe.register_aux(aux)
    pipe.register_aux(aux)  # idempotent
    assert pipe.aux_losses == [aux]
    batch = random_batch()
    with torch.no_grad():
        out = m.compute_token_loss(batch, m.model)
    assert not aux.seen[-1].training
    torch.testing.assert_close(out.loss, out.mean + out.aux)
    pipe.unregister_aux(aux)
    with torch.no_grad():
        plain = m.compute_token_loss(batch, m.model)
    assert plain.aux is None and torch.equal(plain.loss, plain.mean)


def test_bad_providers():
    pipe = token_pipeline_for(module())
    with pytest.raises(TypeError, match="aux_loss"):
        pipe.register_aux(object())

    class Vector(AuxiliaryLoss):
        def aux_loss(self, inputs):
            return torch.ones(2)

    pipe.register_aux(Vector())
    with pytest.raises(ValueError, match="scalar"):
        pipe.aux_sum(None)
