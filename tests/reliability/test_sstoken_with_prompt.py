"""issue 18 item 8: SSToken + PromptTuning. The prompt injector prepends ``n`` virtual positions at the decoder
trunk, so the layer SSToken reads has ``T + n`` positions while the batch's prompt-key mask has ``T``; the pair
crashed with an unexplained shape error. Now the virtual keys stay in the softmax (the layer attends to them), are
not prompt keys, and their query rows are dropped. Reference: the layer's eager attention weights of the same
forward built by hand (``inputs_embeds = [P; E[x]]``, the injector disabled)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from lit_ft.callbacks import PromptTuning, SSToken
from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding
from lit_ft.core.prompts import injector_for
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, quiet_trainer, tiny_config

N_VIRTUAL = 4


class RecordingSSToken(SSToken):
    """Keeps the attention score of every training step."""

    def _attention_scores(self, scores):
        out = super()._attention_scores(scores)
        self.__dict__.setdefault("recorded", []).append(out.detach().clone())
        return out


class EagerReference(Callback):
    """At the first batch (before its forward, same weights): prompt-key attention mass of the last layer from the
    model's own eager attention weights on ``[P; E[x]]``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if hasattr(self, "ref"):
            return
        hf = pl_module.model
        prompt = next(m for m in pl_module.modules() if isinstance(m, PromptEmbedding)).embedding.weight
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        B, T = ids.shape
        with torch.no_grad(), injector_for(hf).disabled():
            x = torch.cat([prompt.expand(B, N_VIRTUAL, -1), hf.get_input_embeddings()(ids)], dim=1)
            full_mask = torch.cat([torch.ones(B, N_VIRTUAL, dtype=am.dtype), am], dim=1)
            att = hf(inputs_embeds=x, attention_mask=full_mask, output_attentions=True).attentions[-1]
        assert att.shape[-1] == T + N_VIRTUAL
        keys = am.bool() & (labels == -100)  # the user's prompt tokens (not the virtual ones)
        user = att[:, :, N_VIRTUAL:, N_VIRTUAL:]  # queries and keys at the user's positions
        self.ref = (user * keys[:, None, None, :]).sum(-1).mean(1)  # [B, T]
        self.mask = am.bool()


def test_sstoken_with_prompt_tuning_trains_and_scores_like_eager_attention():
    """issue 18 item 8: the pair trains (the prompt moves, finite loss) and SSToken's attention score at the first
    step equals the eager attention weights of the prompted forward."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    module.model.set_attn_implementation("eager")  # output_attentions for the reference
    pt = PromptTuning(num_virtual_tokens=N_VIRTUAL, init="random")
    ref = EagerReference()
    ss = RecordingSSToken(keep_ratio=0.5, gamma=0.0)  # attention only: the part that had the shape error
    trainer = quiet_trainer([pt, ref, ss], max_steps=2, limit_val_batches=0)
    before = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert len(ss.recorded) == 2
    got = ss.recorded[0]
    assert got.shape == ref.ref.shape
    torch.testing.assert_close(got[ref.mask], ref.ref[ref.mask], rtol=1e-4, atol=1e-5)
    assert float(ref.ref[ref.mask].max()) > 0.05  # the prompt keys get real attention: the check is not 0 == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = [n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all("lit_ft_prompts" in n for n in moved)
