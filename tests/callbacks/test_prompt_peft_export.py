"""Prompt artifacts that PEFT loads: a PromptTuning / PrefixTuning save is also a PEFT adapter folder, and
``PeftModel.from_pretrained`` on it gives the outputs lit_ft gives with the same prompt."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lit_ft.callbacks import PrefixTuning, PromptTuning
from lit_ft.callbacks.prompt.prefix_tuning import PrefixEncoder
from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding
from lit_ft.core.prompt_peft import PEFT_CONFIG, PEFT_WEIGHTS, write_peft_adapter
from lit_ft.core.prompts import attach_prompt, load_prompt, model_geometry, save_prompt
from lit_ft.modules import CausalLMModule
from tests.helpers import ListDataModule, quiet_trainer, random_batch, tiny_config, tiny_hf_model

peft = pytest.importorskip("peft")
N = 4


def _source(kind: str, model, projection: int = 0):
    g = model_geometry(model)
    src = PromptEmbedding(g, N) if kind == "prompt" else PrefixEncoder(g, N, projection_hidden_size=projection)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.5)
    return src


def _peft_logits(base, folder, ids, mask, kind):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask).logits
    return logits[:, N:] if kind == "prompt" else logits  # PEFT keeps the virtual positions of an embedding prompt


@pytest.mark.parametrize("kind, projection", [("prompt", 0), ("prefix", 0), ("prefix", 16)])
def test_saved_prompt_loads_in_peft_with_the_same_outputs(tmp_path, kind, projection):
    base = tiny_hf_model().eval()
    src = _source(kind, base, projection)
    save_prompt(src, tmp_path, metadata={"base_model": "tiny-llama"})
    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == ("PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING")
    assert cfg["base_model_name_or_path"] == "tiny-llama" and (tmp_path / PEFT_WEIGHTS).is_file()
    b = random_batch(batch_size=2, seq_len=7)
    ref = _peft_logits(base, tmp_path, b["input_ids"], b["attention_mask"], kind)
    mine = copy.deepcopy(base)
    attach_prompt(mine, load_prompt(tmp_path, mine))  # lit_ft's own artifact, from the same folder
    with torch.no_grad():
        out = mine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    # and the prompt matters: the base model alone gives other logits
    with torch.no_grad():
        plain = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (plain[real] - ref[real]).abs().max() > 1e-3


def test_trained_prompt_saved_at_fit_end_is_a_peft_adapter(tmp_path):
    module = CausalLMModule(model_config=tiny_config())
    cb = PromptTuning(num_virtual_tokens=N, save_dir="prompt_out")  # relative: under default_root_dir
    data = ListDataModule(n_batches=2, batch_size=2, seq_len=8)
    quiet_trainer([cb], max_steps=2, default_root_dir=str(tmp_path)).fit(module, datamodule=data)
    out = tmp_path / "prompt_out"
    assert (out / "prompt.safetensors").is_file() and (out / PEFT_CONFIG).is_file()
    base = copy.deepcopy(module.model)
    from lit_ft.core.prompts import detach_prompt

    detach_prompt(base)
    ids = torch.randint(3, 300, (2, 6))
    ref = _peft_logits(base.eval(), out, ids, torch.ones_like(ids), "prompt")
    with torch.no_grad():
        mine = module.model.eval()(input_ids=ids).logits  # the trained model, prompt attached
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_sources_peft_cannot_run_write_only_lit_ft_files(tmp_path):
    from lit_ft.callbacks.prompt.dept import DePTEmbedding

    base = tiny_hf_model()
    src = DePTEmbedding(model_geometry(base), N, max_length=16, rank=2)  # a PromptEmbedding subclass PEFT cannot run
    save_prompt(src, tmp_path)
    assert (tmp_path / "prompt.safetensors").is_file() and not (tmp_path / PEFT_CONFIG).exists()


def test_write_peft_adapter_names_a_bad_type(tmp_path):
    with pytest.raises(ValueError, match="peft_type must be"):
        write_peft_adapter("LORA", {}, 4, tmp_path)
