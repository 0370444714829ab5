"""VerbalizerClassificationModule: classify with a causal LM through label-word logits (PET patterns, SciPrompt's
weighted verbalizer), computing the lm_head only for the label words' rows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lit_ft.core.compiled_trunk import loss_parts
from lit_ft.core.introspect import causal_lm_parts, find_hf_model
from lit_ft.modules.causal_lm import _DTYPES, load_causal_lm
from lit_ft.modules.data_stats import log_data_stats
from lit_ft.modules.optim import MODULE_NO_DECAY_PATTERNS, adamw_param_groups

MULTI_TOKEN = ("mean", "first")
CALIBRATION_AVERAGES = ("logits", "probs")
#: checkpoint key of the calibration vector
CALIBRATION_KEY = "lit_ft_verbalizer_calibration"
VERBATIM = "<!>"


# ------------------------------------------------------------------------------------------------------------------
# The math (pure functions; the module and the tests use them)
# ------------------------------------------------------------------------------------------------------------------
def label_word_log_probs(word_logits: torch.Tensor, word_mask: torch.Tensor,
                         calibration: torch.Tensor | None = None) -> torch.Tensor:
    """``log p_w``: log-softmax of ``word_logits`` ``[B, C, W]`` over *all* valid label words of all classes
    (``word_mask`` ``[C, W]``; padded slots get ``-inf``). With ``calibration`` ``[C, W]`` (probabilities on the
    support set): ``p_w / cal_w`` renormalised over the label words (contextual calibration), in log space."""
    B = word_logits.shape[0]
    z = word_logits.float().masked_fill(~word_mask, float("-inf"))
    logp = torch.log_softmax(z.reshape(B, -1), dim=-1).reshape(z.shape)
    if calibration is not None:
        logp = logp - torch.log(calibration.float()).masked_fill(~word_mask, 0.0)
        logp = torch.log_softmax(logp.reshape(B, -1), dim=-1).reshape(z.shape)
    return logp


def word_weights(word_scores: torch.Tensor, word_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax_w(temperature * s_w)`` within each class over its valid words ``[C, W]``."""
    s = (temperature * word_scores.float()).masked_fill(~word_mask, float("-inf"))
    return torch.softmax(s, dim=-1)


def weighted_verbalizer_scores(word_logits: torch.Tensor, word_mask: torch.Tensor, word_scores: torch.Tensor,
                               temperature: float = 1.0, calibration: torch.Tensor | None = None) -> torch.Tensor:
    """SciPrompt's class scores ``[B, C]``: ``score_c = sum_{w in V_c} softmax_w(temperature * s_w) * log p_w``."""
    logp = label_word_log_probs(word_logits, word_mask, calibration)
    a = word_weights(word_scores, word_mask, temperature)
    return (logp.masked_fill(~word_mask, 0.0) * a).sum(-1)


def calibration_vector(word_logits: torch.Tensor, word_mask: torch.Tensor, average: str = "logits") -> torch.Tensor:
    """Label-word probabilities ``[C, W]`` on a support set (``word_logits`` ``[N, C, W]``): ``"logits"`` = softmax
    of the mean label-word logits (SciPrompt's code: mean of the vocabulary logits, then project and normalise);
    ``"probs"`` = mean of the per-sample label-word probabilities."""
    if average not in CALIBRATION_AVERAGES:
        raise ValueError(f"calibration average must be one of {CALIBRATION_AVERAGES}, got {average!r}")
    if average == "logits":
        return label_word_log_probs(word_logits.float().mean(0, keepdim=True), word_mask)[0].exp()
    return label_word_log_probs(word_logits, word_mask).exp().mean(0)


def ensemble_scores(pattern_scores: torch.Tensor) -> torch.Tensor:
    """PET's pattern ensemble: the class scores ``[B, P, C]`` of one input under ``P`` patterns averaged over the
    patterns (uniform weights) -> ``[B, C]``."""
    return pattern_scores.mean(1)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of each row's last real token (rightmost 1 of the mask; left or right padding)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)
    return (pos * (attention_mask != 0)).argmax(-1)


# ------------------------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------------------------
def _check_label_words(label_words: Any) -> list[list[str]] | None:
    if label_words is None:
        return None
    if not isinstance(label_words, (list, tuple)) or len(label_words) < 2:
        raise ValueError(f"VerbalizerClassificationModule: `label_words` must list >= 2 classes, got {label_words!r}")
    out = []
    for c, words in enumerate(label_words):
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, (list, tuple)) or not words:
            raise ValueError(f"VerbalizerClassificationModule: `label_words[{c}]` is empty; give each class >= 1 word")
        for w in words:
            if not isinstance(w, str) or not w.replace(VERBATIM, "").strip():
                raise ValueError(f"VerbalizerClassificationModule: `label_words[{c}]` has an empty label word {w!r}")
        out.append(list(words))
    return out


class VerbalizerClassificationModule(pl.LightningModule):
    """Classification with a causal LM's label-word logits: PET patterns and SciPrompt's weighted verbalizer.

    Papers: Schick & Schütze, *Exploiting Cloze Questions for Few Shot Text Classification* (PET, EACL 2021);
    You et al., *SciPrompt: Knowledge-augmented Prompting for Fine-grained Categorization of Scientific Topics*
    (EMNLP 2024), code ``zhiwenyou103/SciPrompt`` (``WeightedVerbalizer``).

    The text arrives wrapped in a pattern (``ClassificationDataModule(template="{text} ... Answer:")``); the LM reads
    it and, at the last real token (the next-token position, the causal analogue of PET's ``[MASK]``):

    1. label-word logits ``z_w = h · E_out[w]`` for the label words' rows of the output embedding only — the
       full-vocabulary lm_head is never run (``lm_head.forward`` is not called); a word of several tokens gets the
       mean of its tokens' logits at that position (``multi_token="mean"``, SciPrompt's handler) or its first
       token's (``"first"``);
    2. ``p = softmax(z)`` over all label words of all classes; optional contextual calibration
       ``p_w <- (p_w / cal_w) / sum_v (p_v / cal_v)`` with ``cal`` the label-word probabilities on a support set;
    3. ``score_c = sum_{w in V_c} softmax_w(tau * s_w) * log p_w`` with trainable relevance scores ``s_w``
       (``tau = 1`` in training, ``pred_temp`` at evaluation);
    4. loss: cross-entropy of the class scores (as the authors' script; with one word per class the scores are
       already log-probabilities and this is their NLL); prediction: argmax;
    5. PET's pattern ensemble at prediction: with ``ClassificationDataModule(patterns=[...])`` each input comes under
       several patterns and ``predict_step`` takes the argmax of the class scores averaged over them.

    PET fine-tunes the whole LM (``freeze_backbone=false``, default); with a prompt callback (``PromptTuning``,
    ``DePT``, ...) the callback freezes the backbone (and ``s_w``) and trains its prompt.

    Args:
        model: causal LM folder or lit_ft asset name (default SmolLM2-135M-Instruct). Ignored with ``model_config``.
        model_config: transformers config dict with ``model_type`` for a random model (tests, smoke runs).
        num_hidden_layers: keep only the first N decoder layers.
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        label_words: per class, its label words (a list of strings, or one string); class ``c`` is the DataModule's
            label ``c``. None = the DataModule's ``label_names``, one word per class.
        word_scores: initial relevance scores ``s_w``, same nesting as ``label_words`` (SciPrompt's retrieval
            scores; clamped >= 0 as the code does). None = 0 (uniform weights).
        label_word_prefix: put before every label word when tokenising (default ``" "``: the word follows the
            pattern after a space); a word starting with ``"<!>"`` is used verbatim (OpenPrompt's convention).
        multi_token: ``"mean"`` or ``"first"`` (see step 1).
        trainable_word_weights: train ``s_w`` (SciPrompt); false keeps the initial weights.
        pred_temp: ``tau`` (> 0) applied to ``s_w`` at evaluation only (SciPrompt's ``pred_temp``, default 1).
        calibration_samples: contextual calibration from this many training samples (seeded pick) when training
            starts (0 = off); stored in checkpoints.
        calibration_average: ``"logits"`` (SciPrompt's code: softmax of the mean label-word logits) or
            ``"probs"`` (mean of the per-sample label-word probabilities).
        freeze_backbone: freeze the LM (only ``s_w`` and whatever callbacks add train).
        tokenizer: tokenizer for the label words when the DataModule has none (default: the ``model`` folder's).
        learning_rate: AdamW lr (> 0; SciPrompt 3e-5).
        weight_decay: AdamW weight decay (>= 0; SciPrompt 0.01), not on biases, norms and embeddings.
        seed: seed of the calibration sample pick.
    """

    no_decay_patterns = MODULE_NO_DECAY_PATTERNS

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        model_config: dict[str, Any] | None = None,
        num_hidden_layers: int | None = None,
        torch_dtype: str = "float32",
        label_words: list[list[str]] | list[str] | None = None,
        word_scores: list[list[float]] | None = None,
        label_word_prefix: str = " ",
        multi_token: str = "mean",
        trainable_word_weights: bool = True,
        pred_temp: float = 1.0,
        calibration_samples: int = 0,
        calibration_average: str = "logits",
        freeze_backbone: bool = False,
        tokenizer: str | None = None,
        learning_rate: float = 3e-5,
        weight_decay: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = "VerbalizerClassificationModule"
        words = _check_label_words(label_words)
        if torch_dtype not in _DTYPES:
            raise ValueError(f"{owner}: `torch_dtype` must be one of {sorted(_DTYPES)}, got {torch_dtype!r}")
        if num_hidden_layers is not None and (isinstance(num_hidden_layers, bool) or num_hidden_layers < 1):
            raise ValueError(f"{owner}: `num_hidden_layers` must be >= 1 or null, got {num_hidden_layers!r}")
        if multi_token not in MULTI_TOKEN:
            raise ValueError(f"{owner}: `multi_token` must be one of {MULTI_TOKEN}, got {multi_token!r}")
        if calibration_average not in CALIBRATION_AVERAGES:
            raise ValueError(f"{owner}: `calibration_average` must be one of {CALIBRATION_AVERAGES}, got "
                             f"{calibration_average!r}")
        if isinstance(pred_temp, bool) or not isinstance(pred_temp, (int, float)) or not math.isfinite(pred_temp) \
                or pred_temp <= 0:
            raise ValueError(f"{owner}: `pred_temp` must be a finite number > 0, got {pred_temp!r}")
        if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) or calibration_samples < 0:
            raise ValueError(f"{owner}: `calibration_samples` must be an int >= 0, got {calibration_samples!r}")
        if not isinstance(label_word_prefix, str):
            raise ValueError(f"{owner}: `label_word_prefix` must be a string, got {label_word_prefix!r}")
        for name, v in (("trainable_word_weights", trainable_word_weights), ("freeze_backbone", freeze_backbone)):
            if not isinstance(v, bool):
                raise ValueError(f"{owner}: `{name}` must be true or false, got {v!r}")
        if not learning_rate > 0:
            raise ValueError(f"{owner}: `learning_rate` must be > 0, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"{owner}: `weight_decay` must be >= 0, got {weight_decay}")
        if word_scores is not None:
            if words is None:
                raise ValueError(f"{owner}: `word_scores` needs `label_words` (one score per label word)")
            if len(word_scores) != len(words) or any(
                    not isinstance(s, (list, tuple)) or len(s) != len(w) for s, w in zip(word_scores, words)):
                raise ValueError(f"{owner}: `word_scores` must have the shape of `label_words` "
                                 f"({[len(w) for w in words]} words per class), got {word_scores!r}")
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                   for s in word_scores for x in s):
                raise ValueError(f"{owner}: `word_scores` must be finite numbers, got {word_scores!r}")
        self.save_hyperparameters()
        self.model = load_causal_lm(model, model_config, num_hidden_layers, torch_dtype)
        self.model.train()
        if freeze_backbone:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.label_words = words
        if words is not None:
            self.word_scores = nn.Parameter(self._score_matrix(words, word_scores),
                                            requires_grad=trainable_word_weights)
        self.register_buffer("calibration", None, persistent=False)  # [C, W] once calibrated (checkpointed apart)
        self.verbalizer_ready = False
        self.train_acc: torchmetrics.Metric | None = None
        self.val_acc: torchmetrics.Metric | None = None
        if words is not None:
            self._make_metrics(len(words))

    @staticmethod
    def _score_matrix(words: list[list[str]], scores: list[list[float]] | None) -> torch.Tensor:
        W = max(len(w) for w in words)
        m = torch.zeros(len(words), W)
        if scores is not None:
            for c, s in enumerate(scores):
                m[c, : len(s)] = torch.tensor([float(x) for x in s]).clamp_min(0.0)
        return m

    def _make_metrics(self, num_classes: int) -> None:
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    @property
    def num_classes(self) -> int:
        if self.label_words is None:
            raise RuntimeError("VerbalizerClassificationModule: label words are not known yet (label_words=None takes "
                               "them from the DataModule at setup; call build_verbalizer(tokenizer, label_names))")
        return len(self.label_words)

    # -- verbalizer -------------------------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            return tok
        from lit_ft.core.prompts import load_tokenizer

        name = self.hparams.tokenizer or (self.hparams.model if self.hparams.model_config is None else None)
        if name is None:
            raise ValueError("VerbalizerClassificationModule: no tokenizer for the label words: use a DataModule with "
                             "a `tokenizer` (ClassificationDataModule) or pass `tokenizer`")
        return load_tokenizer(name)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "label_names", None)
        if not self.verbalizer_ready:
            self.build_verbalizer(self._tokenizer(), names)
            self._warn_tokenizer_mismatch(dm)
        n = getattr(dm, "num_labels", None)
        if isinstance(n, int) and n != self.num_classes:
            raise ValueError(f"VerbalizerClassificationModule: `label_words` has {self.num_classes} classes but the "
                             f"data has {n} labels ({names})")

    def _warn_tokenizer_mismatch(self, dm: Any) -> None:
        """The DataModule must tokenise with the model's tokenizer (ClassificationDataModule defaults to MiniLM's)."""
        name = getattr(dm, "tokenizer_name", None)
        if name is None or self.hparams.model_config is not None:
            return
        from lightning.pytorch.utilities import rank_zero_warn

        from lit_ft.assets import resolve

        try:
            same = Path(resolve(name)).resolve() == Path(resolve(self.hparams.model)).resolve()
        except Exception:  # noqa: BLE001 - unknown names: nothing to compare
            return
        if not same:
            rank_zero_warn(f"VerbalizerClassificationModule: the DataModule tokenises with {name!r} but the model is "
                           f"{self.hparams.model!r}; set data.tokenizer to the model's tokenizer")

    def build_verbalizer(self, tokenizer: Any, label_names: list[str] | None = None) -> None:
        """Tokenise the label words (``label_names`` when ``label_words`` is None) into the id tensors."""
        owner = "VerbalizerClassificationModule"
        if self.label_words is None:
            if not label_names:
                raise ValueError(f"{owner}: `label_words` is null and the DataModule has no `label_names`; pass "
                                 "`label_words` (one list of words per class)")
            self.label_words = _check_label_words([[str(n)] for n in label_names])
            self.register_buffer("word_scores", self._score_matrix(self.label_words, None), persistent=False)
            self._make_metrics(len(self.label_words))
        words = self.label_words
        assert words is not None
        hf = find_hf_model(self.model, require_lm_head=True)
        vocab = int(causal_lm_parts(hf).weight.shape[0])
        unk = getattr(tokenizer, "unk_token_id", None)
        prefix = self.hparams.label_word_prefix
        seen: dict[str, int] = {}
        ids: list[list[list[int]]] = []
        for c, ws in enumerate(words):
            ids.append([])
            for w in ws:
                text = w[len(VERBATIM):] if w.startswith(VERBATIM) else prefix + w
                if text in seen:
                    raise ValueError(f"{owner}: label word {w!r} is listed for class {seen[text]} and class {c}")
                seen[text] = c
                t = tokenizer(text, add_special_tokens=False)["input_ids"]
                if not t:
                    raise ValueError(f"{owner}: label word {w!r} (class {c}) tokenises to nothing")
                if unk is not None and unk in t:
                    raise ValueError(f"{owner}: label word {w!r} (class {c}) is not in the tokenizer's vocabulary "
                                     f"(it maps to the unknown token); choose another word")
                bad = [i for i in t if not 0 <= i < vocab]
                if bad:
                    raise ValueError(f"{owner}: label word {w!r} (class {c}) has token ids {bad} outside the model's "
                                     f"vocabulary ({vocab} rows); the tokenizer does not match the model")
                ids[-1].append(t)
        C, W = len(ids), max(len(x) for x in ids)
        L = max(len(t) for x in ids for t in x)
        tok_ids = torch.zeros(C, W, L, dtype=torch.long)
        tok_mask = torch.zeros(C, W, L, dtype=torch.bool)
        for c, x in enumerate(ids):
            for w, t in enumerate(x):
                tok_ids[c, w, : len(t)] = torch.tensor(t)
                tok_mask[c, w, : len(t)] = True
        uniq, inv = torch.unique(tok_ids[tok_mask], return_inverse=True)
        inverse = torch.zeros(C, W, L, dtype=torch.long)
        inverse[tok_mask] = inv
        device = next(self.model.parameters()).device
        self.register_buffer("word_token_ids", tok_ids.to(device), persistent=False)
        self.register_buffer("word_token_mask", tok_mask.to(device), persistent=False)
        self.register_buffer("word_mask", tok_mask.any(-1).to(device), persistent=False)
        self.register_buffer("unique_token_ids", uniq.to(device), persistent=False)
        self.register_buffer("token_index", inverse.to(device), persistent=False)
        self.verbalizer_ready = True

    def _check_ready(self) -> None:
        if not self.verbalizer_ready:
            raise RuntimeError("VerbalizerClassificationModule: the label words are not tokenised yet; run under a "
                               "Trainer (setup does it) or call build_verbalizer(tokenizer)")

    # -- forward ----------------------------------------------------------------------------------------------------
    def word_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Label-word logits ``[B, C, W]`` at each row's last real token (padded word slots: 0)."""
        self._check_ready()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # the trunk compiled when the user compiled `self.model` (this forward never calls the HF model itself)
        parts = loss_parts(self, find_hf_model(self.model, require_lm_head=True))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = parts.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        B = hidden.shape[0]
        h = hidden[torch.arange(B, device=hidden.device), last_real_index(attention_mask)]  # [B, D]
        w = parts.weight[self.unique_token_ids]  # [U, D]: the label words' rows only
        z = h @ w.t()
        if parts.bias is not None:
            z = z + parts.bias[self.unique_token_ids]
        z = z.float()
        if parts.logit_scale is not None:
            z = z * parts.logit_scale
        if parts.logit_softcap is not None:
            z = parts.logit_softcap * torch.tanh(z / parts.logit_softcap)
        tok = z[:, self.token_index]  # [B, C, W, L]
        m = self.word_token_mask
        if self.hparams.multi_token == "first":
            return tok[..., 0] * self.word_mask
        return (tok * m).sum(-1) / m.sum(-1).clamp_min(1)

    def class_scores(self, word_logits: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` weighted-verbalizer scores (``pred_temp`` applies when the module is in eval mode)."""
        temp = 1.0 if self.training else float(self.hparams.pred_temp)
        return weighted_verbalizer_scores(word_logits, self.word_mask, self.word_scores, temp, self.calibration)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_scores(self.word_logits(input_ids, attention_mask))

    def _step(self, batch: Mapping[str, Any], split: str) -> torch.Tensor:
        scores = self(batch["input_ids"], batch.get("attention_mask"))
        labels = batch["labels"]
        if labels.dim() != 1:
            raise ValueError(f"VerbalizerClassificationModule: labels must be class ids [batch], got shape "
                             f"{tuple(labels.shape)} (multi-label data is not supported)")
        loss = F.cross_entropy(scores, labels)
        bs = labels.shape[0]
        metric = self.train_acc if split == "train" else self.val_acc
        assert metric is not None
        metric(scores.detach().argmax(-1), labels)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=split == "val")
        self.log(f"{split}/acc", metric, on_step=False, on_epoch=True, prog_bar=split == "val", batch_size=bs)
        return loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def pattern_scores(self, pattern_input_ids: torch.Tensor,
                       pattern_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores ``[B, P, C]`` of each input under each of its ``P`` patterns (``pattern_input_ids``
        ``[B, P, T]``, as ``ClassificationDataModule(patterns=...)`` collates them); one forward over ``B * P`` rows."""
        if pattern_input_ids.dim() != 3:
            raise ValueError(f"VerbalizerClassificationModule: pattern_input_ids must be [batch, patterns, tokens], "
                             f"got shape {tuple(pattern_input_ids.shape)}")
        B, P, T = pattern_input_ids.shape
        mask = None if pattern_attention_mask is None else pattern_attention_mask.reshape(B * P, T)
        return self(pattern_input_ids.reshape(B * P, T), mask).view(B, P, -1)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Predicted class ids ``[B]``. When the batch holds ``pattern_input_ids`` (several patterns per input), the
        prediction is the argmax of the class scores averaged over the patterns (PET's ensemble,
        :func:`ensemble_scores`); else of the single pattern's scores."""
        if "pattern_input_ids" in batch:
            scores = ensemble_scores(self.pattern_scores(batch["pattern_input_ids"],
                                                         batch.get("pattern_attention_mask")))
            return scores.argmax(-1)
        return self(batch["input_ids"], batch.get("attention_mask")).argmax(-1)

    # -- calibration ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
        """Compute and install the calibration vector ``[C, W]`` from ``batches`` (eval mode, no gradients, the
        current prompt if one is installed)."""
        was = self.training
        self.eval()
        try:
            logits = [self.word_logits(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
                      for b in batches]
        finally:
            self.train(was)
        if not logits:
            raise ValueError("VerbalizerClassificationModule.calibrate: no batches")
        self.calibration = calibration_vector(torch.cat(logits), self.word_mask, self.hparams.calibration_average)
        return self.calibration

    def support_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """``n`` training samples (seeded pick) from a lit_ft DataModule, collated in eval-size batches."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "_examples") or not hasattr(dm, "collate"):
            raise ValueError("VerbalizerClassificationModule: calibration_samples > 0 needs a lit_ft DataModule "
                             "(ClassificationDataModule); or call calibrate(batches) yourself")
        ex = dm._examples("train")
        g = torch.Generator().manual_seed(int(self.hparams.seed))
        pick = torch.randperm(len(ex), generator=g)[: min(n, len(ex))].tolist()
        bs = int(getattr(dm, "eval_batch_size", 32))
        return [dm.collate([ex[i] for i in pick[j: j + bs]]) for j in range(0, len(pick), bs)]

    def on_train_start(self) -> None:
        log_data_stats(self)
        n = self.hparams.calibration_samples
        if n and self.calibration is None:
            self.calibrate(self.support_batches(n))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.calibration is not None:
            checkpoint[CALIBRATION_KEY] = self.calibration.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cal = checkpoint.get(CALIBRATION_KEY)
        self.calibration = None if cal is None else cal.to(self.device)

    # -- optimisation -----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = adamw_param_groups(self, self.hparams.learning_rate, self.hparams.weight_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
