"""BlackBoxPromptLearning: unsupervised discrete prompt learning through a black box's output probabilities.

The module trains no weight of the model: its parameters are the prompt's categorical distributions (logits
``[prompt_length, num_candidates]``); its state holds the pseudo-labels of the unlabelled training rows. The model
is reached only through :class:`lit_ft.modules.black_box.BlackBox` (texts -> label-word probabilities), so the loop
is Lightning's manual optimisation: each step sets the prompt logits' gradient to the policy-gradient estimate and
steps the optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from lit_ft.core.batch import require_keys
from lit_ft.core.progress import progress
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str
from lit_ft.modules.black_box import BlackBox, LocalBlackBox
from lit_ft.modules.black_box_prompt_math import (candidate_vocabulary, pick_demonstrations, sample_prompts,
                                                  select_reliable, vr_policy_gradient)
from lit_ft.modules.data_stats import log_data_stats
from lit_ft.modules.verbalizer import _check_label_words

OWNER = "BlackBoxPromptLearning"
POSITIONS = ("start", "before_query")
OPTIMIZERS = ("adam", "sgd")
#: checkpoint key of the candidate strings (the logits' columns; a resume must see the same ones)
CANDIDATES_KEY = "lit_ft_black_box_prompt_candidates"
_SEED_STRIDE = 1_000_003  # one generator seed per (seed, step): the draws of a step never depend on the steps before


@technique(name="black_box_prompt", family="prompt",
           paper="On Unsupervised Prompt Learning for Classification with Black-box Language Models",
           arxiv="2410.03124")
class BlackBoxPromptLearning(pl.LightningModule):
    """Unsupervised prompt learning for classification with a black-box LM (Zhang et al., 2024, arXiv 2410.03124).

    The LM is used only through its output probabilities (:class:`~lit_ft.modules.black_box.BlackBox`: texts ->
    the label words' probabilities; :class:`~lit_ft.modules.black_box.LocalBlackBox` over a local HF model, no
    gradients). Labels of the training data are never read: the training rows are unlabelled data.

    1. Candidates: ``num_candidates`` phrases from the unlabelled texts (PMI-ranked word bigrams, then frequent
       words; or ``candidates``). The prompt is ``prompt_length`` positions, position ``l`` a categorical
       distribution ``softmax(theta_l)`` over the candidates (``theta`` starts at 0: uniform).
    2. Reliable pseudo-labels: the black box labels every unlabelled text zero-shot; the ``reliable_per_class``
       most confident texts of each class are the reliable pseudo-labelled set (their labels stay fixed); the
       others start with their zero-shot label.
    3. Each step, for a batch of unlabelled texts: ``num_samples`` prompts are drawn; each text is queried as
       ``prompt + demonstrations + text`` with ``demonstrations_per_class`` reliable examples per class (text +
       label word) as in-context demonstrations — during training as at prediction; the loss of a prompt is the
       cross-entropy of the black box's class probabilities against the pseudo-labels. The variance-reduced
       policy gradient (``1/(I-1) sum_i (loss_i - mean loss) grad log p(prompt_i)``) is the logits' gradient.
    4. The non-reliable texts of the batch take as pseudo-label the argmax of their class probabilities averaged
       over the sampled prompts (``update_pseudo_labels``).
    5. Prediction (validation, ``predict_step``): the argmax prompt, the most confident reliable demonstrations.

    Args:
        model: the local model behind the black box (folder or lit_ft asset name).
        model_config: a config dict (random init; tests) instead of ``model``.
        tokenizer: the model's tokenizer (folder / asset); null = the DataModule's, else ``model``'s.
        torch_dtype: the black box model's dtype (float32, bfloat16, float16).
        label_words: one list of words per class (>= 2 classes); null = the DataModule's ``label_names``. The
            first word of a class is the one shown after its demonstrations.
        label_word_prefix: prepended to every label word (a space: the word follows the pattern's "Answer:").
        prompt_length: prompt positions ``L`` (>= 1; BDPL's code: 10 for RoBERTa, 20 for GPT-3).
        num_candidates: candidate phrases per position ``K`` (>= 2; BDPL's code: 200 / 50); ignored with
            ``candidates``.
        candidates: the candidate phrases themselves (>= 2 distinct non-empty strings); null = built from the
            unlabelled texts.
        num_samples: prompts drawn per step ``I`` (>= 2; BDPL's code: 20).
        learning_rate: the prompt logits' learning rate (> 0). BDPL's 1e-4 / 2e-4 apply to probabilities projected
            on the simplex; these are softmax logits, where 0.1 moves a candidate's logit by about 0.1 per step.
        optimizer: ``adam`` (BDPL's code: AdamW without weight decay on the distributions) or ``sgd``.
        clip_grad_norm: the estimate's norm is clipped to this (> 0; BDPL's code: 3); null = no clipping.
        reliable_per_class: reliable pseudo-labelled texts per class (>= 1), the demonstration pool.
        demonstrations_per_class: in-context demonstrations per class in every query (>= 0; 0 = none).
        resample_demonstrations: training queries draw their demonstrations at random from the reliable pool
            (never the text itself); false = the fixed prediction demonstrations for every query.
        prompt_position: ``start`` (prompt, demonstrations, text) or ``before_query`` (demonstrations, prompt,
            text).
        prior_correction: rank confidence and assign pseudo-labels by ``p(c|x) / mean_x p(c|x)`` (so a model biased
            towards one label word still yields every class); false = by ``p(c|x)``.
        update_pseudo_labels: relabel the non-reliable texts of each batch from the sampled prompts' predictions.
        query_batch_size: texts per black-box forward (>= 1).
        seed: seed of the prompt and demonstration draws (one generator per step, seeded by ``seed`` and the step).
    """

    technique_name = "black_box_prompt"

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        torch_dtype: str = "float32",
        label_words: list[list[str]] | None = None,
        label_word_prefix: str = " ",
        prompt_length: int = 10,
        num_candidates: int = 200,
        candidates: list[str] | None = None,
        num_samples: int = 20,
        learning_rate: float = 0.1,
        optimizer: str = "adam",
        clip_grad_norm: float | None = 3.0,
        reliable_per_class: int = 8,
        demonstrations_per_class: int = 1,
        resample_demonstrations: bool = True,
        prompt_position: str = "start",
        prior_correction: bool = True,
        update_pseudo_labels: bool = True,
        query_batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_str(OWNER, "model", model)
        if model_config is not None and not isinstance(model_config, Mapping):
            raise ValueError(f"{OWNER}: `model_config` must be a config dict or null, got {model_config!r}")
        check_str(OWNER, "tokenizer", tokenizer, allow_none=True)
        check_choice(OWNER, "torch_dtype", torch_dtype, ("float32", "bfloat16", "float16"))
        try:
            words = _check_label_words(label_words)
        except ValueError as e:
            raise ValueError(f"{OWNER}: `label_words`: {e}".replace("VerbalizerClassificationModule: ", "")) from None
        if not isinstance(label_word_prefix, str):
            raise ValueError(f"{OWNER}: `label_word_prefix` must be a string, got {label_word_prefix!r}")
        check_int(OWNER, "prompt_length", prompt_length, 1)
        check_int(OWNER, "num_candidates", num_candidates, 2)
        if candidates is not None:
            if not isinstance(candidates, (list, tuple)) or len(candidates) < 2 or any(
                    not isinstance(c, str) or not c.strip() for c in candidates) or len(set(candidates)) != len(
                    candidates):
                raise ValueError(f"{OWNER}: `candidates` must be >= 2 distinct non-empty strings or null, got "
                                 f"{candidates!r}")
        check_int(OWNER, "num_samples", num_samples, 2)
        check_number(OWNER, "learning_rate", learning_rate, 0.0, low_open=True)
        check_choice(OWNER, "optimizer", optimizer, OPTIMIZERS)
        check_number(OWNER, "clip_grad_norm", clip_grad_norm, 0.0, low_open=True, allow_none=True,
                     null_means="no clipping")
        check_int(OWNER, "reliable_per_class", reliable_per_class, 1)
        check_int(OWNER, "demonstrations_per_class", demonstrations_per_class, 0)
        if demonstrations_per_class > reliable_per_class:
            raise ValueError(f"{OWNER}: `demonstrations_per_class` must be <= `reliable_per_class` "
                             f"({reliable_per_class}), got {demonstrations_per_class}")
        for name, v in (("resample_demonstrations", resample_demonstrations), ("prior_correction", prior_correction),
                        ("update_pseudo_labels", update_pseudo_labels)):
            check_bool(OWNER, name, v)
        check_choice(OWNER, "prompt_position", prompt_position, POSITIONS)
        check_int(OWNER, "query_batch_size", query_batch_size, 1)
        check_int(OWNER, "seed", seed, 0)
        self.save_hyperparameters()
        self.automatic_optimization = False  # the gradient is an estimate set by hand, never a backward
        K = len(candidates) if candidates is not None else num_candidates
        self.prompt_logits = nn.Parameter(torch.zeros(prompt_length, K))
        self.label_words = words
        self.candidates: list[str] | None = list(candidates) if candidates is not None else None
        self.register_buffer("initialized", torch.tensor(False))
        self.box: BlackBox | None = None
        self.pool_texts: list[str] = []
        self.val_acc: torchmetrics.Metric | None = None

    # -- set-up -----------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self.label_words is None:
            raise RuntimeError(f"{OWNER}: the label words are not known before setup")
        return len(self.label_words)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _tokenizer(self) -> Any:
        tok = getattr(self._datamodule(), "tokenizer", None)
        if self.hparams.tokenizer is not None or tok is None:
            from lit_ft.core.prompts import load_tokenizer

            name = self.hparams.tokenizer or (self.hparams.model if self.hparams.model_config is None else None)
            if name is None:
                raise ValueError(f"{OWNER}: no tokenizer: pass `tokenizer` or use a DataModule with one "
                                 "(ClassificationDataModule)")
            return load_tokenizer(name)
        return tok

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ValueError(f"{OWNER}: runs in one process (the pseudo-labels and the prompt distributions are not "
                             f"synchronised across ranks); got world_size={self.trainer.world_size}")
        dm = self._datamodule()
        if self.label_words is None:
            names = getattr(dm, "label_names", None)
            if not names:
                raise ValueError(f"{OWNER}: no label words: `label_words` is null and the DataModule has no "
                                 "`label_names`; pass `label_words` (one list of words per class)")
            self.label_words = _check_label_words([[str(n)] for n in names])
        n = getattr(dm, "num_labels", None)
        if isinstance(n, int) and n != self.num_classes:
            raise ValueError(f"{OWNER}: `label_words` has {self.num_classes} classes but the data has {n} labels")
        tok = self._tokenizer()
        if self.box is None:
            self.box = LocalBlackBox(self.label_words, tok, model=self.hparams.model,
                                     model_config=self.hparams.model_config,
                                     label_word_prefix=self.hparams.label_word_prefix,
                                     torch_dtype=self.hparams.torch_dtype, batch_size=self.hparams.query_batch_size)
        self.decode_tokenizer = getattr(dm, "tokenizer", None) or tok
        self._build_pool(dm)
        if stage == "fit":
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"{OWNER}: {len(self.pool_texts)} training texts used as unlabelled data (their labels are "
                           "not read); the validation labels only measure accuracy")
        if self.candidates is None:
            self.candidates = candidate_vocabulary(self.pool_texts, self.hparams.num_candidates)
        if self.val_acc is None:
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes).to(self.device)

    def _build_pool(self, dm: Any) -> None:
        """The unlabelled texts (the training split, labels dropped) and the state sized by them."""
        if dm is not None and hasattr(dm, "_examples"):
            rows = [(int(e["sample_idx"]), e["input_ids"]) for e in dm._examples("train")]
        elif dm is not None and hasattr(dm, "train_dataloader"):
            rows = []
            for b in dm.train_dataloader():
                require_keys(b, ["input_ids", "sample_idx"], OWNER)
                mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
                rows += [(int(i), ids[m.bool()].tolist()) for i, ids, m in zip(b["sample_idx"], b["input_ids"], mask)]
        else:
            raise ValueError(f"{OWNER}: needs a DataModule whose training split is the unlabelled data "
                             "(lit_ft.data.ClassificationDataModule)")
        rows = sorted(dict(rows).items())
        N, C = len(rows), self.num_classes
        batch = int(getattr(dm, "batch_size", 1) or 1)
        if N < batch:
            raise ValueError(f"{OWNER}: the unlabelled set has {N} texts, fewer than one batch (`batch_size`="
                             f"{batch}); use more data or a smaller batch_size")
        if N < C * self.hparams.reliable_per_class:
            raise ValueError(f"{OWNER}: the unlabelled set has {N} texts, fewer than `reliable_per_class`="
                             f"{self.hparams.reliable_per_class} x {C} classes")
        self.pool_texts = [self.decode_tokenizer.decode(ids, skip_special_tokens=True) for _, ids in rows]
        device = self.prompt_logits.device
        self.register_buffer("pool_ids", torch.tensor([i for i, _ in rows], dtype=torch.long, device=device))
        if getattr(self, "pseudo_labels", None) is None or self.pseudo_labels.shape[0] != N:
            self.register_buffer("pseudo_labels", torch.zeros(N, dtype=torch.long, device=device))
            self.register_buffer("reliable", torch.zeros(N, dtype=torch.bool, device=device))
            self.register_buffer("pool_probs", torch.full((N, C), 1.0 / C, device=device))
            self.register_buffer("confidence", torch.zeros(N, device=device))

    def _on_device(self) -> BlackBox:
        assert self.box is not None, f"{OWNER}: run under a Trainer (setup builds the black box)"
        if isinstance(self.box, LocalBlackBox) and self.box.device != self.device:
            self.box.to(self.device)
        return self.box

    # -- the texts --------------------------------------------------------------------------------------------------
    def _prompt_text(self, indices: list[int]) -> str:
        assert self.candidates is not None
        return " ".join(self.candidates[k] for k in indices)

    def _demo_text(self, rows: list[int]) -> str:
        words = self.label_words
        assert words is not None
        return "\n\n".join(self.pool_texts[j] + self.hparams.label_word_prefix + words[int(self.pseudo_labels[j])][0]
                           for j in rows)

    def compose(self, prompt: str, demos: str, query: str) -> str:
        """The text sent to the black box: prompt, demonstrations and the (templated) text, in the configured
        order."""
        if self.hparams.prompt_position == "start":
            parts = [prompt, demos, query] if demos else [prompt, query]
            return parts[0] + "\n" + "\n\n".join(parts[1:])
        return (demos + "\n\n" if demos else "") + prompt + "\n" + query

    def prediction_demonstrations(self) -> list[int]:
        """The fixed demonstrations (pool rows): the most confident reliable texts of each class."""
        return pick_demonstrations(self.pseudo_labels.cpu(), self.reliable.cpu(), self.num_classes,
                                   self.hparams.demonstrations_per_class, None, None, self.confidence.cpu())

    def prompt(self) -> list[str]:
        """The argmax prompt's candidate phrases, one per position."""
        assert self.candidates is not None
        return [self.candidates[k] for k in self.prompt_logits.argmax(-1).tolist()]

    def _rows(self, sample_idx: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.pool_ids, sample_idx.to(self.pool_ids.device))
        bad = (pos >= len(self.pool_ids)) | (self.pool_ids[pos.clamp_max(len(self.pool_ids) - 1)] != sample_idx.to(
            self.pool_ids.device))
        if bad.any():
            raise ValueError(f"{OWNER}: batch sample_idx {sample_idx[bad.cpu()].tolist()[:5]} are not rows of the "
                             "unlabelled training split read at setup")
        return pos

    # -- the loop ---------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        log_data_stats(self)
        if bool(self.initialized):
            return
        box = self._on_device()
        C = self.num_classes
        bs = self.hparams.query_batch_size
        chunks = range(0, len(self.pool_texts), bs)
        probs = torch.cat([box.class_probs(self.pool_texts[i: i + bs]).to(self.device).view(-1, C)
                           for i in progress(chunks, f"{self.technique_name}: zero-shot pseudo-labels",
                                             total=len(chunks), enabled=self.trainer.is_global_zero)])
        labels, reliable = select_reliable(probs.cpu(), self.hparams.reliable_per_class,
                                           self.hparams.prior_correction)
        score = probs.double() / (probs.double().mean(0, keepdim=True).clamp_min(1e-12)
                                  if self.hparams.prior_correction else 1.0)
        self.pseudo_labels.copy_(labels.to(self.device))
        self.reliable.copy_(reliable.to(self.device))
        self.pool_probs.copy_(probs)
        self.confidence.copy_(score.gather(1, labels.to(self.device).view(-1, 1)).flatten().float())
        self.initialized.fill_(True)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        require_keys(batch, ["sample_idx"], OWNER)
        box = self._on_device()
        rows = self._rows(batch["sample_idx"])
        B, C, I = len(rows), self.num_classes, self.hparams.num_samples
        g = torch.Generator().manual_seed(self.hparams.seed * _SEED_STRIDE + int(self.global_step))
        samples = sample_prompts(self.prompt_logits, I, g)  # [I, L]
        per = self.hparams.demonstrations_per_class
        fixed = self.prediction_demonstrations() if per and not self.hparams.resample_demonstrations else None
        demos = []
        for r in rows.tolist():
            pick = fixed if fixed is not None else pick_demonstrations(
                self.pseudo_labels.cpu(), self.reliable.cpu(), C, per, r, g) if per else []
            demos.append(self._demo_text(pick) if pick else "")
        texts = [self.compose(self._prompt_text(samples[i].tolist()), demos[b], self.pool_texts[r])
                 for i in range(I) for b, r in enumerate(rows.tolist())]
        probs = box.class_probs(texts).to(self.device).view(I, B, C)
        targets = self.pseudo_labels[rows]
        nll = -torch.log(probs.gather(2, targets.view(1, B, 1).expand(I, B, 1)).squeeze(-1).clamp_min(1e-12))
        losses = nll.mean(1)  # [I]: each sampled prompt's loss on the batch
        grad = vr_policy_gradient(self.prompt_logits, samples, losses.cpu())
        opt = self.optimizers()
        opt.zero_grad()
        self.prompt_logits.grad = grad.to(self.prompt_logits)
        if self.hparams.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([self.prompt_logits], self.hparams.clip_grad_norm)
        opt.step()
        mean_probs = probs.mean(0)  # [B, C]
        self.pool_probs[rows] = mean_probs
        changed = torch.zeros((), device=self.device)
        if self.hparams.update_pseudo_labels:
            score = mean_probs / (self.pool_probs.mean(0, keepdim=True).clamp_min(1e-12)
                                  if self.hparams.prior_correction else 1.0)
            new = torch.where(self.reliable[rows], targets, score.argmax(-1))
            changed = (new != targets).float().mean()
            self.pseudo_labels[rows] = new
        loss = losses.mean()
        p = torch.softmax(self.prompt_logits.detach(), -1)
        name = self.technique_name
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log(f"lit_ft/{name}/prompt_entropy", -(p * p.clamp_min(1e-12).log()).sum(-1).mean(), batch_size=B)
        self.log(f"lit_ft/{name}/max_prob", p.max(-1).values.mean(), batch_size=B)
        self.log(f"lit_ft/{name}/loss_std", losses.std(), batch_size=B)
        self.log(f"lit_ft/{name}/pseudo_label_changes", changed, batch_size=B)
        self.log(f"lit_ft/{name}/class_fraction_0", (self.pseudo_labels == 0).float().mean(), batch_size=B)
        return loss.detach()

    # -- prediction -------------------------------------------------------------------------------------------------
    def predict_probs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class probabilities ``[B, C]`` of a batch's (templated) texts under the argmax prompt and the fixed
        demonstrations."""
        require_keys(batch, ["input_ids"], OWNER)
        box = self._on_device()
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        queries = [self.decode_tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                   for ids, m in zip(batch["input_ids"], mask)]
        demos = self._demo_text(self.prediction_demonstrations()) if self.hparams.demonstrations_per_class else ""
        prompt = " ".join(self.prompt())
        return box.class_probs([self.compose(prompt, demos, q) for q in queries]).to(self.device)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        require_keys(batch, ["input_ids", "labels"], OWNER)
        probs = self.predict_probs(batch)
        labels = batch["labels"].to(self.device)
        loss = -torch.log(probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12)).mean()
        assert self.val_acc is not None
        self.val_acc(probs.argmax(-1), labels)
        bs = labels.shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        return loss

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Predicted class ids ``[B]`` (argmax prompt + the most confident reliable demonstrations)."""
        return self.predict_probs(batch).argmax(-1)

    # -- checkpoints / optimiser -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CANDIDATES_KEY] = list(self.candidates or [])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CANDIDATES_KEY)
        if saved is not None and self.candidates is not None and saved != self.candidates:
            raise ValueError(f"{OWNER}: the checkpoint's candidate phrases differ from this run's (the prompt logits' "
                             "columns would mean other phrases); resume on the same unlabelled data and "
                             "`num_candidates`, or pass the saved ones as `candidates`")
        if saved is not None:
            self.candidates = list(saved)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD([self.prompt_logits], lr=self.hparams.learning_rate)
        return torch.optim.Adam([self.prompt_logits], lr=self.hparams.learning_rate)
