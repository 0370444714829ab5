"""CPT: Context-aware Prompt Tuning (Blau et al., 2024) — a few-shot context refined by projected gradient descent."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.core.registry import technique
from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.loss import Attachment, attach, detach
from lit_ft.core.prompts import ModelGeometry, PromptError, PromptInputs, PromptSource
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number

#: token type of separators / end-of-example tokens (neither updated nor supervised)
SEPARATOR_TYPE = 0
WEIGHTED_LOSSES = ("none", "decay")
#: PEFT's reference width: epsilons are scaled by sqrt(hidden_size / 2048)
_REFERENCE_DIM = 2048
#: lr of ``delta``: the lr of PEFT's CPT example (examples/cpt_finetuning)
DEFAULT_LEARNING_RATE = 1e-4


def label_type_mask(types: torch.Tensor) -> torch.Tensor:
    """Label tokens: types ``4i + 4`` (``> 0`` and ``≡ 0 mod 4``)."""
    return (types > 0) & (types % 4 == 0)


def update_type_mask(types: torch.Tensor) -> torch.Tensor:
    """Tokens whose delta trains: input templates ``4i+1``, inputs ``4i+2``, output templates ``4i+3``."""
    return (types > 0) & (types % 4 != 0)


def scaled_epsilon(epsilon: float, hidden_size: int) -> torch.Tensor:
    """``epsilon * sqrt(hidden_size / 2048)`` as a float32 scalar tensor, computed as PEFT computes it."""
    return epsilon * torch.sqrt(torch.tensor([hidden_size / _REFERENCE_DIM], dtype=torch.float32))[0]


class CPTEmbedding(PromptSource):
    """The CPT context as a prompt: ``E0 + delta * u`` (``[n, D]``).

    Buffers (saved with the artifact, so a prompt loads without its DataModule): ``token_ids`` (the context's
    tokens), ``type_mask`` (their CPT types: 0 separator, ``4i+1`` input template, ``4i+2`` input, ``4i+3`` output
    template, ``4i+4`` label of example ``i = 0..K-1``) and ``base`` (``E0``, float32 copies of the embedding rows
    of ``token_ids``, frozen). Parameter: ``delta`` (``[n, D]``, zeros at the start). ``u`` is 1 on the updated
    types and 0 on labels and separators, so their ``delta`` rows get exactly zero gradient (PEFT masks the
    gradient with a hook; multiplying in the forward gives the same zero gradient and also keeps those rows out of
    the prompt whatever an optimizer does to them).

    ``keep_prompt_outputs`` is switched on by :class:`CPT` only around a batch whose labels it extended with the
    context's labels; everything else (``generate()``, user forwards, evaluation outside the loops) sees outputs
    aligned with the user's tokens, as with every other prompt.
    """

    kind = "embeddings"

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 1, projection_epsilon: float = 0.1,
                 format_epsilon: float = 0.1) -> None:
        super().__init__(geometry, num_virtual_tokens)
        for name, v in (("projection_epsilon", projection_epsilon), ("format_epsilon", format_epsilon)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise PromptError(f"CPTEmbedding: {name} must be a finite number > 0, got {v!r}")
        self.projection_epsilon = float(projection_epsilon)
        self.format_epsilon = float(format_epsilon)
        self.keep_prompt_outputs = False
        n, d = num_virtual_tokens, geometry.hidden_size
        self.register_buffer("token_ids", torch.zeros(n, dtype=torch.long))
        self.register_buffer("type_mask", torch.zeros(n, dtype=torch.long))
        self.register_buffer("base", torch.zeros(n, d))
        self.delta = nn.Parameter(torch.zeros(n, d))

    # -- construction --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_context(self, token_ids: Sequence[int], type_mask: Sequence[int], word_embeddings: nn.Module) -> None:
        """Fill the buffers from the context's tokens and types; ``E0`` = their rows of ``word_embeddings``."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        types = torch.as_tensor(list(type_mask), dtype=torch.long)
        if ids.shape != (self.num_virtual_tokens,) or types.shape != ids.shape:
            raise PromptError(f"CPTEmbedding: {len(ids)} token ids and {len(types)} types for "
                              f"{self.num_virtual_tokens} virtual tokens")
        w = word_embeddings.weight
        self.token_ids.copy_(ids)
        self.type_mask.copy_(types)
        self.base.copy_(w[ids.to(w.device)].detach().float())
        self.delta.zero_()

    # -- the prompt ------------------------------------------------------------------------------------------------
    def prompt_embeddings(self, inputs: PromptInputs) -> torch.Tensor:
        u = update_type_mask(self.type_mask).to(self.delta.dtype).unsqueeze(1)
        return self.base.to(self.delta.dtype) + self.delta * u

    @property
    def num_examples(self) -> int:
        return int(self.type_mask.max().item() + 3) // 4 if self.num_virtual_tokens else 0

    def epsilon(self) -> torch.Tensor:
        """Per-token projection radius ``[n]`` (float32): ``format_epsilon * sqrt(D/2048)`` on template tokens,
        ``projection_epsilon * sqrt(D/2048)`` on input tokens, 0 on labels and separators (never updated)."""
        t = self.type_mask
        eps = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        r = t % 4
        eps[(t > 0) & ((r == 1) | (r == 3))] = scaled_epsilon(self.format_epsilon, self.geometry.hidden_size).to(t.device)
        eps[(t > 0) & (r == 2)] = scaled_epsilon(self.projection_epsilon, self.geometry.hidden_size).to(t.device)
        return eps

    @torch.no_grad()
    def project_(self) -> torch.Tensor:
        """``delta_t <- delta_t * eps_t / max(||delta_t||_2, eps_t)`` per token (labels and separators -> 0).
        Returns the bool ``[n]`` mask of the tokens the projection shrank."""
        eps = self.epsilon().to(self.delta.device, self.delta.dtype)
        norm = self.delta.norm(p=2, dim=1)
        shrink = norm > eps
        # = eps / max(norm, eps): 1 exactly where norm <= eps; rows with eps = 0 go to 0
        scale = torch.where(shrink, eps / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
        scale = torch.where(eps > 0, scale, torch.zeros_like(scale))
        self.delta.mul_(scale.unsqueeze(1))
        return shrink & (eps > 0)

    # -- what the loss sees ------------------------------------------------------------------------------------------
    def context_labels(self) -> torch.Tensor:
        """``[n]``: the token id on label tokens, ``-100`` elsewhere (unshifted, HF convention)."""
        return torch.where(label_type_mask(self.type_mask), self.token_ids, torch.full_like(self.token_ids, IGNORE_INDEX))

    def context_weights(self, weighted_loss: str = "none", decay: float = 1.0) -> torch.Tensor:
        """``[n]`` float32 loss weights of the context's positions: with ``"decay"`` the labels of example ``i``
        (0-based, of ``K``) weigh ``decay ** (K - i)`` — the query (the most recent label) weighs 1, the last
        context example ``decay``, the first ``decay ** K`` (PEFT's ``opt_loss_decay_factor``); 1 elsewhere."""
        w = torch.ones(self.type_mask.shape, dtype=torch.float32, device=self.type_mask.device)
        if weighted_loss == "decay":
            k = self.num_examples
            example = (self.type_mask - 1).clamp_min(0) // 4
            lab = label_type_mask(self.type_mask)
            w[lab] = torch.tensor(float(decay), dtype=torch.float64).pow((k - example[lab]).double()).float()
        return w

    def artifact_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "projection_epsilon": self.projection_epsilon,
                "format_epsilon": self.format_epsilon}


def build_context(
    tokenizer: Any, examples: Sequence[Mapping[str, str]], input_template: str, output_template: str,
    separator: str, end_with_eos: bool, vocab_size: int, owner: str = "CPT",
) -> tuple[list[int], list[int]]:
    """Token ids and CPT types of the concatenated examples, piece by piece as PEFT's example builds them:
    ``[input template part 1 | input | part 2]`` (types ``4i+1, 4i+2, 4i+1``), ``separator`` (0),
    ``[output template part 1 | output | part 2]`` (``4i+3, 4i+4, 4i+3``), then eos (0) when ``end_with_eos``.
    Each piece is tokenised alone without special tokens."""
    in1, in2 = input_template.split("{}")
    out1, out2 = output_template.split("{}")
    unk = getattr(tokenizer, "unk_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if end_with_eos and eos is None:
        raise PromptError(f"{owner}: end_with_eos=true but the tokenizer has no eos token; set end_with_eos: false")
    ids: list[int] = []
    types: list[int] = []

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    for i, ex in enumerate(examples):
        for text, t in ((in1, 1), (ex["input"], 2), (in2, 1), (separator, SEPARATOR_TYPE), (out1, 3),
                        (ex["output"], 4), (out2, 3)):
            piece = tok(text)
            if t in (2, 4) and not piece:
                what = "input" if t == 2 else "output"
                raise PromptError(f"{owner}: example {i}'s {what} {ex[what]!r} tokenises to nothing")
            if unk is not None and unk in piece:
                raise PromptError(f"{owner}: example {i} has text unknown to the tokenizer ({text!r}); rephrase it")
            ids += piece
            types += [4 * i + t if t else SEPARATOR_TYPE] * len(piece)
        if end_with_eos:
            ids.append(int(eos))
            types.append(SEPARATOR_TYPE)
    bad = [j for j in ids if not 0 <= j < vocab_size]
    if bad:
        raise PromptError(f"{owner}: context token ids {bad[:4]} are outside the model's vocabulary ({vocab_size}); "
                          "the tokenizer does not belong to this model")
    return ids, types


def draw_examples(datamodule: Any, k: int, seed: int, owner: str = "CPT") -> list[dict[str, str]]:
    """``k`` distinct training rows of a lit_ft text DataModule (``data`` / ``val_data`` / ``val_split`` / ``seed``;
    the rows it trains on, before ``max_train_samples``), drawn with ``seed``, as ``{"input", "output"}``. Rows
    must be ``{"prompt", "completion"}`` or ``{"input", "output"}``."""
    from lit_ft.data._common import load_splits

    needed = ("data", "val_data", "val_split", "seed")
    if datamodule is None or not all(hasattr(datamodule, a) for a in needed):
        raise PromptError(
            f"{owner}: no `examples` given and the DataModule ({type(datamodule).__name__}) does not expose its "
            f"training rows (a lit_ft SFTDataModule does); pass `examples: [{{input: ..., output: ...}}, ...]`"
        )
    rows, _, _ = load_splits(datamodule.data, datamodule.val_data, datamodule.val_split, datamodule.seed)
    if len(rows) < k:
        raise PromptError(f"{owner}: num_examples={k} but the training data has only {len(rows)} rows")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for j in order[:k]:
        r = rows[j]
        if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str):
            out.append({"input": r["prompt"], "output": r["completion"]})
        elif isinstance(r.get("input"), str) and isinstance(r.get("output"), str):
            out.append({"input": r["input"], "output": r["output"]})
        else:
            raise PromptError(
                f"{owner}: training row {j} has keys {sorted(r)}; drawing context examples needs "
                "{prompt, completion} or {input, output} rows (chat `messages` rows: pass `examples` explicitly)"
            )
    return out


@technique(name="cpt", family="prompt",
           paper="Context-Aware Prompt Tuning: Advancing In-Context Learning with Adversarial Methods",
           arxiv="2410.17222")
class CPT(PromptCallback):
    """Context-aware Prompt Tuning: a few-shot context (in-context-learning demonstrations) is prepended to every
    input as embeddings and refined by projected gradient descent; the backbone stays frozen.

    Paper: Blau, Kimhi, Belinkov, Bronstein & Baskin, *Context-Aware Prompt Tuning: Advancing In-Context Learning
    with Adversarial Methods* (arXiv 2410.17222, 2024). Reference implementation: HF PEFT's ``CPTConfig`` /
    ``CPTEmbedding`` / ``PeftModel._cpt_forward`` (same types, epsilons and loss; tested against it).

    Algorithm:

    1. Context = the K examples, each ``input_template(input) separator output_template(output) [eos]``, token
       types ``4i+1`` (input template), ``4i+2`` (input), ``4i+3`` (output template), ``4i+4`` (label), 0
       (separator, eos). Prompt = ``E0 + delta``: ``E0`` the context's embedding rows (frozen), ``delta`` zeros.
    2. Label and separator tokens are never updated (their ``delta`` rows get zero gradient and stay 0).
    3. Loss = cross-entropy on the label tokens of *all* context examples plus the query's labels (the context's
       outputs are kept; its labels are prepended to ``batch["labels"]``), optionally weighted by ``decay``: the
       query 1, the last example ``decay``, ..., the first ``decay**K``. Normalised by the number of label tokens
       (as PEFT), so ``decay < 1`` lowers the loss value.
    4. After each optimizer step (true PGD; PEFT projects lazily at the next forward):
       ``delta_t <- delta_t * eps_t / max(||delta_t||, eps_t)``, ``eps = projection_epsilon * sqrt(D/2048)`` on input
       tokens, ``format_epsilon * sqrt(D/2048)`` on template tokens.

    Evaluation (validation / test loops) scores the query only (the context's labels are prepended as -100; the
    query's first token is still predicted from the last context position, as in training). ``generate()`` and any
    forward outside the training / evaluation loops return outputs aligned with the user's tokens.

    Loss paths: ``CausalLMModule`` / any ``TokenLossMixin`` module and the HF loss (``self.model(**batch).loss``)
    both see the prepended labels. The decay weights go to ``batch["token_weights"]``, which only lit_ft's loss
    paths read: a ``TokenLossMixin`` module, or — for a plain module — lit_ft's HF loss hook, which CPT installs
    on the model's ``loss_function`` when ``weighted_loss="decay"`` (its gradients are then normalised by the
    label-token count of the accumulation window, like every lit_ft token technique). If the training loss does
    not go through either, CPT raises at the first optimizer step instead of silently dropping the weights.

    Causal LMs only. Per-token batch keys other than ``labels`` / ``token_weights`` (e.g. ``key_token_mask``) are
    not extended, so token callbacks that read them do not compose with CPT.

    Args:
        examples: the context, ``[{"input": ..., "output": ...}, ...]`` (in order; the last is the most recent).
            ``None``: draw ``num_examples`` rows from the training data of the DataModule (lit_ft SFTDataModule:
            ``{prompt, completion}`` rows), with ``seed``. Drawn rows stay in the training set.
        num_examples: how many examples to draw when ``examples`` is ``None`` (>= 1; default 4). With ``examples``
            it must be ``None`` or ``len(examples)``.
        input_template: format of an input, one ``{}`` slot (PEFT's example: ``"input: {}"``).
        output_template: format of an output, one ``{}`` slot (``"output: {}"``). Make the templates, separator and
            eos match how your DataModule formats the query (e.g. ``"{}"`` / ``"{}"`` / ``" "`` / eos reproduce
            ``SFTDataModule(use_chat_template=false)``).
        separator: text between the formatted input and output (type 0; PEFT's example: a space).
        end_with_eos: end each example with the tokenizer's eos token (type 0; PEFT's example does).
        projection_epsilon: radius of the input tokens' ``delta`` (scaled by ``sqrt(D/2048)``; > 0; PEFT default
            0.1, its example 0.2).
        format_epsilon: radius of the template tokens' ``delta`` (> 0; PEFT default and example 0.1).
        weighted_loss: ``"none"`` or ``"decay"`` (PEFT's ``opt_weighted_loss_type``).
        decay: the decay factor, in (0, 1] (PEFT's ``opt_loss_decay_factor``; its example 0.95).
        seed: seed of the example draw.
        freeze_backbone: freeze every model tensor except ``delta`` (default true).
        learning_rate: lr of ``delta`` (own param group). Default 1e-4, the lr of PEFT's CPT example
            (``examples/cpt_finetuning``). ``None`` = the optimizer's.
        weight_decay: weight decay of ``delta``; ``None`` = the optimizer's.
        save_dir: write ``prompt.safetensors`` + ``prompt_config.json`` here when fit ends (holds ``delta``,
            ``E0``, the context's tokens and types).
        tokenizer: tokenizer (local folder or lit_ft asset name) when the DataModule has no ``tokenizer``.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "cpt"

    def __init__(self, examples: list[dict[str, str]] | None = None, num_examples: int | None = None,
                 input_template: str = "input: {}", output_template: str = "output: {}", separator: str = " ",
                 end_with_eos: bool = True, projection_epsilon: float = 0.1, format_epsilon: float = 0.1,
                 weighted_loss: str = "none", decay: float = 1.0, seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = DEFAULT_LEARNING_RATE, weight_decay: float | None = None, save_dir: str | None = None,
                 tokenizer: str | None = None, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        owner = "CPT"
        if examples is not None:
            if not isinstance(examples, (list, tuple)) or not examples:
                raise ValueError(f"{owner}: `examples` must be a non-empty list of {{input, output}} dicts or null, "
                                 f"got {examples!r}")
            for i, ex in enumerate(examples):
                if (not isinstance(ex, Mapping) or not isinstance(ex.get("input"), str)
                        or not isinstance(ex.get("output"), str) or not ex["input"] or not ex["output"]):
                    raise ValueError(f"{owner}: `examples[{i}]` must be {{'input': str, 'output': str}} with "
                                     f"non-empty strings, got {ex!r}")
            examples = [{"input": ex["input"], "output": ex["output"]} for ex in examples]
        check_int(owner, "num_examples", num_examples, minimum=1, allow_none=True)
        if examples is not None and num_examples is not None and num_examples != len(examples):
            raise ValueError(f"{owner}: `num_examples`={num_examples} but {len(examples)} `examples` are given; "
                             "leave num_examples null when you pass examples")
        for name, tpl in (("input_template", input_template), ("output_template", output_template)):
            if not isinstance(tpl, str) or tpl.count("{}") != 1:
                raise ValueError(f"{owner}: `{name}` must be a string with exactly one '{{}}' slot, got {tpl!r}")
        if not isinstance(separator, str):
            raise ValueError(f"{owner}: `separator` must be a string, got {separator!r}")
        self.end_with_eos = check_bool(owner, "end_with_eos", end_with_eos)
        self.projection_epsilon = check_number(owner, "projection_epsilon", projection_epsilon, low=0, low_open=True)
        self.format_epsilon = check_number(owner, "format_epsilon", format_epsilon, low=0, low_open=True)
        self.weighted_loss = check_choice(owner, "weighted_loss", weighted_loss, WEIGHTED_LOSSES)
        self.decay = check_number(owner, "decay", decay, low=0, high=1, low_open=True)
        self.seed = check_int(owner, "seed", seed)
        self.examples = examples
        self.num_examples = num_examples
        self.input_template = input_template
        self.output_template = output_template
        self.separator = separator
        self.context_examples: list[dict[str, str]] | None = None  # the examples in use (after the draw)
        self._attachment: Attachment | None = None
        self._forwards_seen = 0

    @property
    def weights_active(self) -> bool:
        return self.weighted_loss == "decay" and self.decay != 1.0

    # -- the source ------------------------------------------------------------------------------------------------
    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> CPTEmbedding:
        from lit_ft.core.introspect import find_input_embeddings

        owner = "CPT"
        if not hasattr(hf_model, "get_output_embeddings") or hf_model.get_output_embeddings() is None:
            raise PromptError(
                f"{owner} supports causal language models only (its loss covers the context's label tokens through "
                f"the lm_head); {type(hf_model).__name__} has no lm_head (get_output_embeddings())."
            )
        tok = self.tokenizer_for(trainer)
        if tok is None:
            raise PromptError(
                f"{owner}: tokenising the context needs a tokenizer: pass `tokenizer` (a local folder or lit_ft asset "
                "name) or use a DataModule with a `.tokenizer` attribute (lit_ft's SFT DataModule has one)."
            )
        examples = self.examples
        if examples is None:
            examples = draw_examples(getattr(trainer, "datamodule", None), self.num_examples or 4, self.seed, owner)
        ids, types = build_context(tok, examples, self.input_template, self.output_template, self.separator,
                                   self.end_with_eos, geometry.vocab_size, owner)
        limit = getattr(getattr(hf_model, "config", None), "max_position_embeddings", None)
        if limit is not None and len(ids) >= limit:
            raise PromptError(
                f"{owner}: the context of {len(examples)} examples is {len(ids)} tokens, which leaves no room in the "
                f"model's context (max_position_embeddings={limit}); use fewer or shorter `examples` / `num_examples`."
            )
        source = CPTEmbedding(geometry, len(ids), self.projection_epsilon, self.format_epsilon)
        source.set_context(ids, types, find_input_embeddings(hf_model))
        self.context_examples = [dict(ex) for ex in examples]
        return source

    # -- loss path for the decay weights ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.weights_active or self._attachment is not None:
            return
        # level 3 reads batch["token_weights"] itself; level 2 needs the engine's hook to read them. Either way
        # CPT is a holder on the engine, so the window normalisers count its context labels (batch_for_count).
        try:
            self._attachment = attach(trainer, pl_module, self, "auto", who="CPT", allowed=("auto",))
        except TypeError as e:
            raise PromptError(f"CPT: weighted_loss='decay' needs a loss that reads batch['token_weights'] ({e}); "
                              "use weighted_loss='none' or a lit_ft CausalLMModule") from None
        self._forwards_seen = self._attachment.pipeline.training_forwards if self._attachment.pipeline else 0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach(self._attachment, self)
        self._attachment = None
        if self.source is not None:
            self.source.keep_prompt_outputs = False
        super().teardown(trainer, pl_module, stage)

    def batch_for_count(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The training batch as the loss sees it after :meth:`extend_batch` (the context's labels prepended), so
        the engine's window count includes them."""
        src = self.source
        if not isinstance(src, CPTEmbedding) or not isinstance(batch, Mapping) or batch.get("labels") is None:
            return batch
        labels = batch["labels"]
        ctx = src.context_labels().to(labels.device, labels.dtype)
        return {**batch, "labels": torch.cat([ctx.expand(labels.shape[0], src.num_virtual_tokens), labels], dim=1)}

    # -- batches ---------------------------------------------------------------------------------------------------
    def extend_batch(self, batch: dict[str, Any], training: bool) -> None:
        """Prepend the context's labels (training) or ``-100`` (evaluation) to ``batch["labels"]`` and its loss
        weights to ``batch["token_weights"]`` (created when decay weights apply), and keep the context's outputs
        for the next forward."""
        src = self.source
        assert isinstance(src, CPTEmbedding)
        labels = batch["labels"]
        B, n = labels.shape[0], src.num_virtual_tokens
        ctx = src.context_labels().to(labels.device, labels.dtype)
        if not training:
            ctx = torch.full_like(ctx, IGNORE_INDEX)
        batch["labels"] = torch.cat([ctx.expand(B, n), labels], dim=1)
        w = batch.get("token_weights")
        if w is not None or (training and self.weights_active):
            if w is None:
                w = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
            cw = src.context_weights(self.weighted_loss if training else "none", self.decay).to(w.device, w.dtype)
            batch["token_weights"] = torch.cat([cw.expand(B, n), w], dim=1)
        src.keep_prompt_outputs = True

    def _release(self) -> None:
        if self.source is not None:
            self.source.keep_prompt_outputs = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        require_keys(batch, ("input_ids", "labels"), who="CPT")
        if self._attachment is not None:  # count the window on the raw batches (batch_for_count extends them)
            self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)
        self.extend_batch(batch, training=True)
        if self._attachment is not None:
            self._attachment.bind(batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        att = self._attachment
        if att is not None and att.pipeline is not None:
            if att.level == "hook" and att.pipeline.training_forwards == self._forwards_seen:
                raise RuntimeError(
                    "CPT: weighted_loss='decay' but the training loss did not go through the model's loss_function "
                    f"(the lit_ft hook CPT installed on {type(att.hooked_model).__name__}), so the decay weights "
                    "were not applied. Return `self.model(**batch).loss`, use a lit_ft CausalLMModule, or set "
                    "weighted_loss='none'."
                )
            self._forwards_seen = att.pipeline.training_forwards
            att.end_window()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._release()
        src = self.source
        if isinstance(src, CPTEmbedding):
            shrunk = src.project_()  # after the optimizer step: projected gradient descent
            n_upd = int(update_type_mask(src.type_mask).sum())
            pl_module.log("lit_ft/cpt/projected_fraction", shrunk.float().sum() / max(n_upd, 1), on_step=True,
                          on_epoch=False, batch_size=1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _eval_start(self, batch: Any) -> None:
        if isinstance(batch, Mapping) and batch.get("labels") is not None and self.source is not None:
            self.extend_batch(batch, training=False)  # type: ignore[arg-type]

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_start(batch)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._release()

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_start(batch)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._release()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
