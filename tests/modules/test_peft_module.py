"""CausalLMModule / ClassificationModule with ``peft={...}``: the dict becomes a PEFT adapter (only it trains), the
fused loss through the adapter equals the PEFT model's own loss, checkpoint -> resume reproduces an uninterrupted
run, and bad configs are refused naming the key."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.modules import CausalLMModule, ClassificationModule

from helpers import ListDataModule, assert_state_dicts_equal, fit_and_resume, random_batch, tiny_config

peft = pytest.importorskip("peft", reason="the optional `peft` extra is not installed")

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_module(**kw) -> CausalLMModule:
    kw.setdefault("peft", dict(LORA))
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, **kw)


def test_dict_becomes_a_lora_adapter_and_only_it_is_optimised(caplog):
    with caplog.at_level("INFO"):
        m = lora_module()
    assert isinstance(m.model, peft.PeftModel)
    assert m.model.peft_config["default"].task_type == "CAUSAL_LM" and m.model.peft_config["default"].r == 4
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = m.configure_optimizers()
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in m.parameters() if p.requires_grad}
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert f"{n_train:,} of {sum(p.numel() for p in m.parameters()):,} parameters trainable" in caplog.text


def test_fused_loss_through_the_adapter_equals_the_peft_models_own_loss():
    m = lora_module()
    with torch.no_grad():  # LoRA B starts at 0: move it so that the adapter changes the output
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.5)
    batch = random_batch(4, 12)
    ours = m.compute_token_loss(batch, m.causal_lm).mean
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    theirs = m.model(**inputs).loss
    base = m.model.get_base_model()
    with m.model.disable_adapter():
        without = base(**inputs).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(theirs, without, atol=1e-4)  # the comparison sees the adapter


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path):
    r = fit_and_resume(lora_module, lambda: [], tmp_path, max_steps=4)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    saved = torch.load(r.ckpt, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["peft"] == LORA
    assert any(".lora_A." in k for k in saved["state_dict"])


def test_classification_module_with_lora_trains_adapter_and_head():
    cfg = {"model_type": "bert", "vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
    m = ClassificationModule(model_config=cfg, num_labels=2, learning_rate=1e-2,
                             peft={"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"]})
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = torch.randint(5, 384, (8, 10), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 10, dtype=torch.long),
                "labels": torch.arange(4) % 2} for i in (0, 4)]
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    moved = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved == {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(".lora_" in n for n in moved) and any("classifier" in n for n in moved)  # SEQ_CLS saves the head
    assert not any(".lora_" not in n and "classifier" not in n for n in moved)


@pytest.mark.parametrize(
    "spec, match",
    [
        (["LORA"], r"CausalLMModule: peft must be a dict such as .* got list"),
        ({"r": 8}, r"peft\['peft_type'\] must be one of \[.*'LORA'.*got None"),
        ({"peft_type": "LOORA"}, r"peft\['peft_type'\] must be one of .*got 'LOORA'"),
        ({**LORA, "lora_alpah": 16}, r"peft\['lora_alpah'\] is not an argument of peft.LoraConfig "
                                     r"\(peft_type='LORA'\); did you mean \['lora_alpha'"),
        ({**LORA, "task_type": "SEQ_CLS"}, r"peft\['task_type'\] must be 'CAUSAL_LM' for this module"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
         r"peft\['peft_type'\]='PROMPT_TUNING' is a prompt-learning method.*PromptTuning"),
        ({**LORA, "target_modules": ["nope_proj"]}, r"peft\['target_modules'\] does not fit the model"),
    ],
)
def test_bad_peft_configs_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        lora_module(peft=spec)


def test_missing_peft_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"CausalLMModule: peft=\.\.\. needs the `peft` library; install it: "
                                          r"pip install 'lit-ft\[peft\]'"):
        lora_module()
    assert isinstance(CausalLMModule(model_config=tiny_config(), peft=None).model, torch.nn.Module)  # no peft needed


def test_a_model_the_user_wrapped_with_peft_trains_through_the_fused_loss():
    """``module.model = peft.get_peft_model(module.model, ...)`` (no ``peft=`` argument): the loss runs the wrapped
    HF model's trunk and head, equals PEFT's own loss, and only the adapter moves."""
    torch.manual_seed(0)
    m = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    m.model = peft.get_peft_model(m.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = random_batch(2, 12)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(m.compute_token_loss(batch, m.causal_lm).loss, m.model(**inputs).loss,
                                   rtol=1e-5, atol=1e-6)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=ListDataModule(n_batches=2))
    moved = [n for n, p in m.named_parameters() if not torch.equal(before[n], p)]
    assert moved and all("lora_" in n for n in moved), moved
