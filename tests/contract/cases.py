"""The contract suite's cases table: per registered technique, the arguments and factories its checks need.

Every technique registered with ``@technique`` must have an entry in :data:`CASES` (the suite fails, naming the
technique, when one is missing). A :class:`Case` says

- ``kwargs``: small, fast settings for the training checks (resume, drop-in); ``alt_kwargs``: a second instance's
  settings (its ``state_key`` must differ). Either may be a callable ``(Ctx) -> dict`` when it needs files
  (a tokenizer, a saved source prompt);
- ``invalid``: ``(argument, bad value)`` pairs: each must raise an error whose message names the argument;
- ``module`` / ``datamodule``: what the resume check trains (default: ``CausalLMModule`` on random batches);
  ``plain_module``: the drop-in check's user module, whose ``training_step`` is ``return self.model(**batch).loss``;
- ``single_instance``: why a second instance on the same model is refused instead (prompt techniques: one prompt
  per model), in which case the coexistence check expects that refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_ft.modules import CausalLMModule, ClassificationModule
from tests.helpers import ListDataModule, PlainHFModule, random_batch, tiny_config, tiny_hf_model


@dataclass
class Ctx:
    """Files a case may need, made on demand in the test's ``tmp_path``."""

    tmp_path: Path
    tokenizer: str
    _panda_source: str | None = None

    @property
    def panda_source(self) -> str:
        """A saved 4-token source prompt for the tiny model (PANDA's teacher)."""
        if self._panda_source is None:
            from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding
            from lit_ft.core.prompts import model_geometry, save_prompt

            source = PromptEmbedding(model_geometry(tiny_hf_model()), 4)
            torch.manual_seed(1)
            with torch.no_grad():
                source.embedding.weight.normal_(0, 0.5)
            self._panda_source = str(save_prompt(source, self.tmp_path / "panda_source"))
        return self._panda_source


Kwargs = Union[dict, Callable[[Ctx], dict]]


def _trd_teacher(ctx: Ctx) -> str:
    """A tiny BERT teacher with its own WordPiece tokenizer (TokenRelationDistillation)."""
    from tests.callbacks.trd_teacher import make_tiny_teacher

    return make_tiny_teacher(ctx.tmp_path / "trd_teacher")


def causal_module() -> pl.LightningModule:
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1, warmup_steps=3)


def two_batches() -> pl.LightningDataModule:
    # 2 batches per epoch: the resume check's step-2 checkpoint falls on an epoch boundary (same data order)
    return ListDataModule(n_batches=2)


def _forgetting_kwargs(ctx: Ctx, conjugate: str = "none") -> dict:
    """ForgettingMonitor on two tiny held-out tasks (one generation, one classification) instead of the real assets."""
    from lit_ft.testing import write_tiny_classification_jsonl, write_tiny_sft_jsonl

    return {"tasks": [write_tiny_sft_jsonl(ctx.tmp_path / "fm_gen.jsonl", n=4),
                      write_tiny_classification_jsonl(ctx.tmp_path / "fm_cls.jsonl", n=4)],
            "max_samples": 2, "tokenizer": ctx.tokenizer, "conjugate": conjugate}


@dataclass
class Case:
    invalid: tuple[tuple[str, Any], ...]
    kwargs: Kwargs = field(default_factory=dict)
    alt_kwargs: Kwargs = field(default_factory=dict)
    module: Callable[[], pl.LightningModule] = causal_module
    plain_module: Callable[[], pl.LightningModule] = PlainHFModule
    datamodule: Callable[[], pl.LightningDataModule] = two_batches
    single_instance: str | None = None

    def build(self, which: Kwargs, ctx: Ctx) -> dict:
        return dict(which(ctx) if callable(which) else which)


# -- token selection: key tokens need a batch key --------------------------------------------------------------
def keyed_batch(seed: int) -> dict:
    """random_batch + a bool ``key_token_mask`` on some labelled tokens (what SFTDataModule(key_spans=...) adds)."""
    b = random_batch(seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    b["key_token_mask"] = (torch.rand(b["labels"].shape, generator=g) < 0.3) & (b["labels"] != -100)
    # TL-Training's parameter boundaries (the default preset needs them): other labelled tokens
    b["key_boundary_mask"] = ((torch.rand(b["labels"].shape, generator=g) < 0.1) & (b["labels"] != -100)
                              & ~b["key_token_mask"])
    return b


class KeyedData(ListDataModule):
    def __init__(self, n_batches: int = 2) -> None:
        super().__init__(n_batches)
        self.batches = [keyed_batch(i) for i in range(n_batches)]


# -- PTEC: a sequence classifier ----------------------------------------------------------------------------------
NUM_LABELS, PAD = 3, 2  # LlamaConfig's eos, which ClassificationModule makes the pad token


def cls_batch(seed: int, batch_size: int = 4, seq_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch_size):
        n = seq_len - (b % 3)
        ids[b, n:], mask[b, n:] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=g),
            "sample_idx": torch.arange(batch_size) + seed * batch_size}


class ClassificationData(pl.LightningDataModule):
    label_names = ["apples", "books", "pens"]
    num_labels = NUM_LABELS

    def __init__(self, n_batches: int = 2) -> None:
        super().__init__()
        self.batches = [cls_batch(i) for i in range(n_batches)]
        self.tokenizer = None

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def classification_module() -> pl.LightningModule:
    return ClassificationModule(model_config=tiny_config(), num_labels=NUM_LABELS, learning_rate=1e-2,
                                weight_decay=0.1)


class PlainClassifier(pl.LightningModule):
    """The plain user module of a classifier: a Llama sequence classifier computing its own loss."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        cfg = dict(tiny_config())
        cfg.pop("model_type")
        self.model = AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model("llama", num_labels=NUM_LABELS, pad_token_id=PAD, **cfg))

    def training_step(self, batch, batch_idx):
        return self.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


# -- adapters -----------------------------------------------------------------------------------------------------
ONE_ADAPTER_SET = "one set of each adapter technique per model: a second instance is refused at setup"
ADAPTER_INVALID = (("learning_rate", -1.0), ("weight_decay", -0.1), ("freeze_backbone", "yes"),
                   ("train_task_head", "yes"), ("targets", []))

# -- prompts ------------------------------------------------------------------------------------------------------
ONE_PROMPT = "one prompt per model: a second prompt technique on the same model is refused at setup"
CPT_EXAMPLES = [{"input": "3 plus 4", "output": "7"}, {"input": "2 plus 2", "output": "4"}]


def cpt_kwargs(ctx: Ctx) -> dict:
    return {"examples": CPT_EXAMPLES, "tokenizer": ctx.tokenizer, "input_template": "Q: {} ?",
            "output_template": "A: {}.", "learning_rate": 0.05}


PROMPT_INVALID = (("num_virtual_tokens", 0), ("learning_rate", -1.0), ("weight_decay", -0.1),
                  ("freeze_backbone", "yes"))

def _got_d_kwargs(ctx: Ctx, k: int) -> dict:
    """OTDataSelection on a tiny random BERT encoder and a tiny arithmetic target; caches in the test's tmp_path."""
    from tests.callbacks.got_d_helpers import selection_kwargs

    return selection_kwargs(ctx.tmp_path / "got_d", k=k)


def _got_d_pool() -> pl.LightningDataModule:
    """The candidate pool: an SFTDataModule over 8 arithmetic + 8 weather rows (OTDataSelection selects its rows)."""
    from tests.callbacks.got_d_helpers import pool_datamodule

    return pool_datamodule()


CASES: dict[str, Case] = {
    # objectives
    "critical_token_scoring": Case(
        # preference-pair batches and a user's own pair step that reads the weights (critical_token_checks.py);
        # the contrastive models are trained for 1 step on the tiny model
        kwargs={"contrastive_max_steps": 1, "contrastive_batch_size": 4, "score_batch_size": 4},
        alt_kwargs={"contrastive_max_steps": 1, "contrastive_batch_size": 4, "beta": 2.0},
        module=lambda: __import__("tests.callbacks.critical_token_checks", fromlist=["_"]).WeightedPairModule(),
        plain_module=lambda: __import__("tests.callbacks.critical_token_checks", fromlist=["_"]).WeightedPairModule(),
        datamodule=lambda: __import__("tests.callbacks.critical_token_checks", fromlist=["_"]).PairData(),
        invalid=(("beta", -1.0), ("only_neg", "yes"), ("score_batch_size", 0), ("train_contrastive", False),
                 ("positive_model", ""), ("contrastive_rank", 0), ("contrastive_dropout", 1.0),
                 ("contrastive_learning_rate", 0.0), ("model_dtype", "int8"), ("cache_path", ""),
                 ("vocab_chunk", 0), ("seed", -1))),
    "multi_token_heads": Case(
        kwargs={"num_heads": 2, "heads_coefficient": 0.5},
        single_instance="one head set per model (lit_ft_heads.multi_token_heads): a second is refused at setup",
        invalid=(("num_heads", 0), ("head_arch", "mlp"), ("init_layer", 1.5), ("heads_coefficient", -1.0),
                 ("decay", 0.0), ("schedule", "cosine"), ("heads_only", "yes"), ("chunk_size", 0),
                 ("integration", "batch"))),
    "one_token_rollout": Case(
        kwargs={"num_samples": 4, "seed": 1}, single_instance="one OTR term per model: a second is refused at setup",
        invalid=(("num_samples", 0), ("temperature", 0.0), ("negative_reward", 0.5), ("ce_weight", -1.0),
                 ("weight", float("nan")), ("seed", -1), ("vocab_chunk_size", 0), ("baseline", "yes"),
                 ("integration", "batch"))),
    "token_dpo": Case(
        # TokenDPO replaces the whole step (two sequences per pair, a reference policy), which a
        # `self.model(**batch).loss` module cannot express: it is refused there naming PreferenceModule
        # (tests/callbacks/test_token_dpo.py), so the drop-in check runs PreferenceModule, which without TokenDPO
        # trains the chosen responses' cross-entropy
        kwargs={"beta": 0.5}, alt_kwargs={"beta": 0.2, "aggregation": "sequence"},
        module=lambda: __import__("tests.pairs", fromlist=["_"]).preference_module(),
        plain_module=lambda: __import__("tests.pairs", fromlist=["_"]).preference_module(),
        datamodule=lambda: __import__("tests.pairs", fromlist=["_"]).PairData(),
        invalid=(("beta", 0.0), ("aggregation", "token"), ("reference", ""), ("use_chosen_weights", "yes"))),
    "token_relation_distillation": Case(
        kwargs=lambda ctx: {"teacher": _trd_teacher(ctx), "tokenizer": ctx.tokenizer, "projector_dim": 16},
        single_instance="one relation term per model: the projector has one slot, a second is refused at setup",
        invalid=(("margin", -0.1), ("weight", float("nan")), ("tokens", "prompt"), ("projector_dim", 0),
                 ("layer", 1.5), ("teacher_layer", "last"), ("tile_size", 0), ("projector_lr", -1.0),
                 ("teacher", ""), ("integration", "batch"))),
    # data selection
    "feedback_loop": Case(  # a tiny FeedbackLoopDataModule: 6 problems (2 held out), n=1: 2 batches per epoch
        kwargs={"num_samples": 1, "epochs_per_iteration": 1, "max_new_tokens": 4, "timeout_seconds": 2.0},
        alt_kwargs={"num_samples": 1, "epochs_per_iteration": 1, "max_new_tokens": 4, "seed": 1,
                    "kl_coefficient": 0.1},
        datamodule=lambda: __import__("tests.data.feedback_problems", fromlist=["_"]).feedback_datamodule(),
        invalid=(("num_samples", 0), ("epochs_per_iteration", 0), ("max_new_tokens", 0), ("temperature", 0.0),
                 ("top_p", 1.5), ("stop_sequences", "\ndef"), ("timeout_seconds", 0), ("execution_workers", 0),
                 ("coarse_feedback_only", 1), ("seed", -1), ("kl_coefficient", -1.0))),
    # token selection
    "excess_loss": Case(
        # the self-reference mode (named, not Rho-1): the checks need no reference file; a loaded reference and the
        # offline cache are tested in tests/callbacks/test_excess_loss.py
        kwargs={"keep_ratio": 0.5, "reference": "initial"}, alt_kwargs={"keep_ratio": 0.7, "reference": "initial"},
        invalid=(("keep_ratio", 0.0), ("keep_ratio", 1.5), ("reference_dtype", "int8"), ("integration", "fused"),
                 ("reference", ""), ("reference_losses", 3))),
    "key_token_weighting": Case(
        kwargs={"w_max": 9.0}, alt_kwargs={"w_max": 3.0}, datamodule=KeyedData,
        invalid=(("w_max", 0.5), ("w_max", float("inf")), ("integration", "fused"), ("preset", "paper"),
                 ("normalize", "mean"))),
    "masked_thought": Case(
        kwargs={"max_rate": 0.4, "warmup_fraction": 0.0, "seed": 1},
        alt_kwargs={"max_rate": 0.2, "warmup_fraction": 0.0, "seed": 1},
        invalid=(("max_rate", 1.0), ("warmup_fraction", 2.0), ("mode", "bert"), ("rate_sampling", "beta"),
                 ("mask_token_id", -1), ("seed", -1))),
    "qtuning": Case(
        kwargs={"sample_ratio": 0.5, "plot_every_n_steps": 0}, alt_kwargs={"sample_ratio": 0.75, "plot_every_n_steps": 0},
        datamodule=lambda: ListDataModule(n_batches=2, batch_size=8),
        invalid=(("sample_ratio", 0.0), ("sample_ratio", "x"), ("sample_ratio", True), ("token_ratio", 1.5),
                 ("token_ratio", -0.5), ("smoothing", -0.5), ("smoothing", 1.01), ("quadrants", "all"),
                 ("top_up", "yes"), ("scoring", "fused"), ("plot_every_n_steps", -1), ("plot_every_n_steps", 1.5),
                 ("integration", "fused"))),
    "sstoken": Case(
        # the resume check crosses the warm-up (step 1) and draws exploration tokens (seeded by step)
        kwargs={"keep_ratio": 0.5, "history": "ema", "ema_decay": 0.5, "warmup_steps": 1, "min_keep_per_response": 2,
                "explore_ratio": 0.2},
        alt_kwargs={"keep_ratio": 0.7, "ema_decay": 0.5},
        invalid=(("keep_ratio", 0.0), ("keep_ratio", "x"), ("gamma", 2.0), ("attention_layer", 1.5), ("history", ""),
                 ("ema_decay", 1.5), ("history_device", "gpu"), ("history_dtype", "int8"), ("integration", "fused"),
                 ("warmup_steps", -1), ("min_keep_per_response", 1.5), ("always_keep_eos", "yes"),
                 ("explore_ratio", 1.0), ("seed", -1))),
    "token_elimination": Case(
        kwargs={"min_seq_len": 1, "segment_size": 8, "dense_layers": 1, "calibration_steps": 1,
                "check_every_n_steps": 1},
        alt_kwargs={"min_seq_len": 1, "segment_size": 8, "dense_layers": 1, "keep_ratio": 0.7},
        single_instance="one eliminator per model: two would nest their gathers but merge in registration order",
        invalid=(("keep_ratio", 0.0), ("keep_ratio", 1.5), ("layer_keep_ratios", []), ("dense_layers", -1),
                 ("segment_size", 0), ("min_seq_len", 0), ("score", "norm"), ("calibration_steps", -1),
                 ("predictor_hidden", 0), ("predictor_lr", 0.0), ("predictor", "yes"), ("seed", -1))),
    # analysis: measure at validation, never change training (the drop-in check asserts unchanged weights)
    "forgetting_monitor": Case(
        kwargs=lambda c: _forgetting_kwargs(c), alt_kwargs=lambda c: _forgetting_kwargs(c, "pig_latin"),
        invalid=(("max_samples", 0), ("conjugate", "french"), ("every_n_val", 0), ("choice_score", "max"))),
    "token_distribution_shift": Case(
        kwargs={"max_samples": 4, "max_new_tokens": 4, "first_k": 2},
        alt_kwargs={"max_samples": 2, "max_new_tokens": 3, "first_k": 1},
        invalid=(("max_samples", 0), ("max_new_tokens", 0), ("batch_size", 0), ("unshifted_max_rank", 0),
                 ("marginal_max_rank", 0), ("first_k", 99), ("base", ""), ("base_dtype", "int8"),
                 ("base_offload", "yes"), ("every_n_validations", 0), ("picture_answers", -1),
                 ("top_tokens", -1), ("pictures", 1))),
    "tuning_contribution": Case(
        kwargs={"max_batches": 1, "pictures": False},
        alt_kwargs={"max_batches": 1, "token": "mean", "pictures": False},
        invalid=(("max_batches", 0), ("token", "first"), ("norm", 0.5), ("branch", "lora"), ("bins", 0),
                 ("pre_trained_dtype", "int8"))),
    # tensor selection
    "freeze_layers": Case(
        kwargs={"num_layers": 1}, alt_kwargs={"num_layers": 2},
        invalid=(("num_layers", -1), ("num_layers", 1.5), ("num_layers", True), ("freeze_embeddings", "yes"),
                 ("unfreeze_at_epoch", 0))),
    "green_trainer": Case(
        kwargs={"rho": 0.5, "interval": 1, "measure_every_n_steps": 1}, alt_kwargs={"rho": 0.7, "interval": 1},
        invalid=(("rho", 0.0), ("rho", 1.5), ("rho", "x"), ("interval", 0), ("interval", 1.5), ("quantization", 5),
                 ("measure_every_n_steps", -1))),
    "layerwise_lr_decay": Case(
        kwargs={"decay": 0.7}, alt_kwargs={"decay": 0.5},
        invalid=(("decay", 0.0), ("decay", 1.5), ("decay", "0.9"), ("decay", float("nan")), ("tied_head", "both"))),
    "localized_tuning": Case(
        kwargs={}, alt_kwargs={"layer": 0},
        invalid=(("layer", 1.5), ("layer", "1"), ("layer", True), ("module_pattern", ""),
                 ("module_pattern", "re:(unclosed"), ("skip_below", -1.0), ("skip_below", float("nan")),
                 ("stop_below", -1.0), ("stop_below", "0.1"), ("required", "yes"))),
    "train_only": Case(
        kwargs={"preset": "last_layers", "last_k": 1}, alt_kwargs={"preset": "embeddings_and_head"},
        invalid=(("preset", "everything"), ("last_k", 0), ("last_k", True), ("patterns", [""]),
                 ("include_head", "yes"), ("required", "yes"), ("required", 1))),
    # parameter resets
    "half_fine_tuning": Case(
        kwargs={}, alt_kwargs={"ratio": 0.25},
        invalid=(("ratio", 0.0), ("ratio", 1.5), ("ratio", "half"), ("ratio", True), ("granularity", "row"),
                 ("reselect", "sometimes"), ("stage_steps", 0), ("theta0_device", "gpu"), ("theta0_device", "cuda"),
                 ("reset_frozen", "yes"), ("reset_moments_on_thaw", 1), ("train_non_layer", None), ("seed", -1))),
    "lottery_ticket": Case(
        kwargs={"proportion": 0.05, "phase1_steps": 1, "export": False},
        alt_kwargs={"proportion": 0.1, "phase1_steps": 1, "export": False},
        invalid=(("proportion", 0.0), ("proportion", 1.5), ("num_params", 0), ("phase1_steps", 0), ("phase1_epochs", 0),
                 ("phase1_fraction", 1.0), ("always_train", [""]), ("theta0_device", "gpu"),
                 ("theta0_dtype", "int8"), ("diff_dtype", "int8"), ("export_path", ""))),
    "reinit_top_layers": Case(
        kwargs={"seed": 5}, alt_kwargs={"num_layers": 2},
        invalid=(("num_layers", 0), ("num_layers", 1.0), ("std", -1.0), ("std", 0.0), ("seed", -1),
                 ("include_frozen", "yes"), ("include_frozen", 1))),
    # prompts
    # BlackBoxPromptLearning is the LightningModule itself (its own loop; checks.is_module_technique): the tiny random
    # Llama as the black box, tiny {text, label} data (tests/modules/black_box_data.py)
    "black_box_prompt": Case(
        kwargs=lambda ctx: dict(__import__("tests.modules.black_box_data", fromlist=["_"]).TINY_KWARGS),
        alt_kwargs=lambda ctx: {**__import__("tests.modules.black_box_data", fromlist=["_"]).TINY_KWARGS, "seed": 2},
        datamodule=lambda: __import__("tests.modules.black_box_data", fromlist=["_"]).two_batch_data(),
        invalid=(("num_samples", 1), ("prompt_length", 0), ("num_candidates", 1), ("candidates", ["a", "a"]),
                 ("learning_rate", 0.0), ("optimizer", "lbfgs"), ("clip_grad_norm", -1.0), ("reliable_per_class", 0),
                 ("demonstrations_per_class", 9), ("prompt_position", "end"), ("label_words", [["yes"]]),
                 ("prior_correction", "yes"), ("seed", -1))),
    "prompt_tuning": Case(kwargs={"num_virtual_tokens": 4, "learning_rate": 0.05}, single_instance=ONE_PROMPT,
                          invalid=(*PROMPT_INVALID, ("init", "zeros"))),
    "prefix_tuning": Case(kwargs={"num_virtual_tokens": 4, "learning_rate": 0.05}, single_instance=ONE_PROMPT,
                          invalid=(*PROMPT_INVALID, ("projection_hidden_size", -1), ("init_std", 0.0))),
    "dept": Case(kwargs={"num_virtual_tokens": 4, "rank": 2, "learning_rate": 0.05, "lowrank_learning_rate": 0.01},
                 single_instance=ONE_PROMPT,
                 invalid=(*PROMPT_INVALID, ("rank", 0), ("rank_scaling", "cube"), ("lowrank_learning_rate", -1.0),
                          ("lowrank_learning_rate", 0.0), ("max_length", 0), ("lora_alpha", 0), ("init", "words"))),
    "ept": Case(kwargs={"num_virtual_tokens": 4, "rank": 2, "fusion_dim": 4, "learning_rate": 0.05,
                        "lowrank_learning_rate": 0.01},
                single_instance=ONE_PROMPT,
                invalid=(*PROMPT_INVALID, ("num_subspaces", 0), ("fusion", "concat"), ("fusion_dim", 0),
                         ("projection_rank", 0), ("generator_learning_rate", -1.0))),
    "iapt": Case(kwargs={"num_virtual_tokens": 2, "bottleneck": 4, "learning_rate": 0.05}, single_instance=ONE_PROMPT,
                 invalid=(*PROMPT_INVALID, ("bottleneck", 0), ("bottleneck", 2.5), ("prefix_mode", "q"),
                          ("pooling", "max"), ("share_generator", "yes"), ("input_norm", 1), ("query_init_std", 0.0),
                          ("up_init_std", -0.1), ("rational_impl", "cuda"), ("seed", "a"))),
    "cpt": Case(kwargs=cpt_kwargs, single_instance=ONE_PROMPT,
                invalid=(("learning_rate", -1.0), ("weighted_loss", "linear"), ("decay", 0.0), ("decay", 1.5),
                         ("projection_epsilon", -0.1), ("projection_epsilon", 0), ("format_epsilon", float("inf")),
                         ("num_examples", 0), ("examples", []), ("input_template", "input:"),
                         ("output_template", "{} {}"), ("end_with_eos", "yes"))),
    "panda": Case(kwargs=lambda ctx: {"source_prompt": ctx.panda_source, "beta": 1.0, "learning_rate": 0.05},
                  single_instance=ONE_PROMPT,
                  invalid=(("beta", -1.0), ("beta", "high"), ("kd", "kl2"), ("temperature", 0.0),
                           ("auto_beta_batches", 0), ("learning_rate", -1.0), ("learning_rate", 0),
                           ("integration", "fused"), ("integration", "batch"), ("init", "zeros"),
                           ("num_virtual_tokens", 0), ("source_prompt", 3))),
    "promot": Case(kwargs=lambda ctx: {"num_virtual_tokens": 4, "learning_rate": 0.05, "prompt_steps": 2,
                                       "model_learning_rate": 3e-3, "save_dir": str(ctx.tmp_path / "promot")},
                   single_instance=ONE_PROMPT,
                   invalid=(("num_virtual_tokens", 0), ("prompt_steps", 0), ("prompt_epochs", 1.5),
                            ("eval_prompt", "maybe"), ("model_learning_rate", -1.0), ("model_weight_decay", -0.1),
                            ("train_prompt_in_stage2", "yes"))),
    "ptec": Case(kwargs={"num_virtual_tokens": 4, "learning_rate": 0.05, "head_learning_rate": 1e-3},
                 single_instance=ONE_PROMPT, module=classification_module, plain_module=PlainClassifier,
                 datamodule=ClassificationData,
                 invalid=(("num_virtual_tokens", 0), ("init", "zeros"), ("head_learning_rate", -1.0),
                          ("head_weight_decay", -1.0), ("head", ""), ("learning_rate", -1.0), ("learning_rate", 0.0))),
    # -- adapters ---------------------------------------------------------------------------------------------------
    "linear_adapters": Case(kwargs={"bottleneck": 4, "learning_rate": 5e-3}, single_instance=ONE_ADAPTER_SET,
                            invalid=(*ADAPTER_INVALID, ("bottleneck", 0), ("init", "zeros"), ("init_std", -0.1))),
    "parallel_adapters": Case(kwargs={"bottleneck": 4, "learning_rate": 5e-3}, single_instance=ONE_ADAPTER_SET,
                              invalid=(*ADAPTER_INVALID, ("bottleneck", 0), ("scale", 0.0), ("init", "zeros"),
                                       ("fused", "yes"))),
    "mam": Case(kwargs={"num_virtual_tokens": 2, "mid_dim": 8, "bottleneck": 4, "learning_rate": 5e-3},
                single_instance=ONE_ADAPTER_SET,
                invalid=(*ADAPTER_INVALID, ("num_virtual_tokens", 0), ("mid_dim", 0), ("prefix_init_std", 0.0),
                         ("bottleneck", 0), ("scale", -1.0), ("init", "zeros"), ("fused", 1))),
    "approximated_prompt": Case(kwargs={"num_prompts": 8, "learning_rate": 5e-3}, single_instance=ONE_ADAPTER_SET,
                                invalid=(*ADAPTER_INVALID, ("num_prompts", 0), ("rank", 0), ("init", "zeros"),
                                         ("prompt_init_std", 0.0), ("key_init_std", -1.0))),
    "bottleneck_adapters": Case(kwargs={"bottleneck": 4, "learning_rate": 5e-3}, single_instance=ONE_ADAPTER_SET,
                                invalid=(*ADAPTER_INVALID, ("config", "lora"), ("reduction_factor", 0),
                                         ("bottleneck", 0), ("non_linearity", "sigmoid"), ("init", "zeros"))),
    "dsee": Case(kwargs={"rank": 4, "num_sparse": 8, "outer_iters": 3, "learning_rate": 5e-3},
                 single_instance=ONE_ADAPTER_SET,
                 invalid=(*ADAPTER_INVALID, ("rank", 0), ("num_sparse", 0), ("alpha", 0.0), ("init", "lora"),
                          ("prune_ratio", 1.0), ("prune_score", "l2"), ("outer_iters", 0))),
    # -- data selection (GOT-D: a tiny random BERT encoder, a two-domain SFT pool, caches in the test's tmp_path) -----
    "ot_data_selection": Case(
        kwargs=lambda ctx: _got_d_kwargs(ctx, k=8), alt_kwargs=lambda ctx: _got_d_kwargs(ctx, k=6),
        datamodule=lambda: _got_d_pool(),
        invalid=(("k", 0), ("epsilon", 0.0), ("momentum", 2.0), ("threshold", 0.0), ("max_iterations", 0),
                 ("text_fields", []), ("target", []), ("tile_size", 0))),
    # LiST self-training drives its own loop: SelfTrainingModule on FewShotDataModule (tests/self_training_case.py)
    "self_training": Case(
        kwargs=lambda ctx: dict(__import__("tests.self_training_case", fromlist=["*"]).TINY_SCHEDULE),
        module=lambda: __import__("tests.self_training_case", fromlist=["*"]).few_shot_module(),
        plain_module=lambda: __import__("tests.self_training_case", fromlist=["*"]).few_shot_module(),
        datamodule=lambda: __import__("tests.self_training_case", fromlist=["*"]).few_shot_data(),
        single_instance="one self-training loop per model: a second SelfTraining is refused at setup",
        invalid=(("teacher_steps", -1), ("student_steps", 0), ("meta_warmup", 1.5), ("temperature", 0.0),
                 ("lr_schedule", "cosine"), ("soft_labels", "yes"), ("bottleneck", 0))),
}
