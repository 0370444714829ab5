"""Issue 18 item 4: labels other than ``ignore_index`` outside ``[0, V)`` (a padding label of -1, a tokenizer larger
than the model) and input ids >= V must fail with errors that name the vocabulary size — in the fused op and in
``CausalLMModule`` — where HF and ``F.cross_entropy`` raise, instead of training -1 as class V - 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_ft.kernels import fused_linear_token_ce
from lit_ft.modules import CausalLMModule

from helpers import VOCAB, random_batch, tiny_config

N, D, V = 10, 8, 16


def _op_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("bad", [-1, -7, V, V + 5])
def test_fused_op_refuses_labels_outside_the_vocabulary(bad):
    """issue 18 item 4: F.cross_entropy raises for these labels; the fused op (CPU path) raises too, naming V."""
    hidden, weight, labels = _op_inputs()
    labels[3] = bad
    with pytest.raises((IndexError, RuntimeError)):  # precondition: what torch itself does with such a label
        F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    for reduction in ("mean", "none"):
        with pytest.raises(ValueError, match=rf"V={V}\b.*ignore_index=-100.*from {bad} to {bad}"):
            fused_linear_token_ce(hidden, weight, labels, reduction=reduction, impl="torch")
    # dropped by keep is not a licence either (HF would raise for it as well)
    keep = torch.ones(N, dtype=torch.bool)
    keep[3] = False
    with pytest.raises(ValueError, match=rf"V={V}\b"):
        fused_linear_token_ce(hidden, weight, labels, keep=keep, impl="torch")


def test_fused_op_accepts_a_custom_ignore_index_and_the_vocabulary_edges():
    """issue 18 item 4: the check does not refuse valid labels (0, V - 1, a custom ignore_index): the loss equals
    F.cross_entropy's."""
    hidden, weight, labels = _op_inputs()
    labels[1], labels[2], labels[0] = 0, V - 1, -1
    got = fused_linear_token_ce(hidden, weight, labels, ignore_index=-1, impl="torch")
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _module():
    return CausalLMModule(model_config=tiny_config())


def test_causal_lm_module_refuses_a_negative_label_other_than_minus_100():
    """issue 18 item 4: a batch padded with label -1 fails at the first step with the vocabulary size, as HF's own
    loss does (before: trained as class V - 1)."""
    module = _module()
    batch = random_batch(2, 12)
    batch["labels"][0, -3:] = -1
    with pytest.raises((IndexError, RuntimeError, ValueError)):  # precondition: HF refuses the batch
        module.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    with pytest.raises(ValueError, match=rf"batch\['labels'\].*V={VOCAB}\b.*from -1 to -1"):
        module.training_step(batch, 0)


def test_causal_lm_module_refuses_input_ids_beyond_the_embeddings():
    """issue 18 item 4: a tokenizer larger than the model gives ids >= V: the error names the embeddings' size."""
    module = _module()
    batch = random_batch(2, 12)
    batch["input_ids"][1, 4] = VOCAB + 10
    batch["labels"][1, 4] = -100  # only the input id is out of range
    with pytest.raises(ValueError, match=rf"input_ids.*to {VOCAB + 10}.*{VOCAB} rows.*vocabulary size {VOCAB}"):
        module.training_step(batch, 0)
    with pytest.raises(ValueError, match=rf"vocabulary size {VOCAB}"):
        module.validation_step(batch, 0)


def test_causal_lm_module_refuses_labels_beyond_the_lm_head():
    """issue 18 item 4: a label >= V (and no out-of-range input id) fails with the vocabulary size."""
    module = _module()
    batch = random_batch(2, 12)
    batch["labels"][0, 8] = VOCAB
    with pytest.raises(ValueError, match=rf"V={VOCAB}\b.*from {VOCAB} to {VOCAB}"):
        module.training_step(batch, 0)
    batch = random_batch(2, 12)  # a valid batch still trains
    assert torch.isfinite(module.training_step(batch, 0))
