"""LeTI's feedback loop: sample programs with the current model, run them against the problems' tests in a sandbox,
and train on the results written as feedback-conditioned text (``<|good|>`` / ``<|bad|>`` + the error message).

The pieces are functions so that their exact output can be checked and reused: :func:`feedback_text` (the training
text of one sampled program), :func:`good_prompt` (the ``<|good|>``-conditioned prompt used for sampling and for
pass@1), :func:`program_for` (what the sandbox runs), :func:`sample_completions` (batched sampling with a KV cache,
seeded without touching the global RNG) and :func:`pass_at_1` (greedy, ``<|good|>``-conditioned).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_ft.callbacks.data_selection._initial_kl import InitialModelKL
from lit_ft.core.batch import require_keys
from lit_ft.core.introspect import find_hf_model
from lit_ft.core.loss import Attachment, attach, detach
from lit_ft.core.progress import progress
from lit_ft.core.registry import technique
from lit_ft.core.sandbox import Sandbox, SandboxResult
from lit_ft.core.validate import check_bool, check_int, check_number

__all__ = ["CORRECT_FEEDBACK", "FEEDBACK_BEGIN", "FEEDBACK_END", "FeedbackLoop", "INCORRECT_FEEDBACK_PREFIX",
           "RW_BAD", "RW_GOOD", "SPECIAL_TOKENS", "STOP_SEQUENCES", "add_feedback_tokens", "feedback_text",
           "good_prompt", "pass_at_1", "program_for", "sample_completions", "truncate_at_stops"]

RW_GOOD, RW_BAD = "<|good|>", "<|bad|>"
FEEDBACK_BEGIN, FEEDBACK_END = "<|lang_feedback|>", "<|/lang_feedback|>"
#: added to the tokenizer in this order (the authors' order), so their ids are len(tokenizer) + 0..3
SPECIAL_TOKENS = (RW_BAD, RW_GOOD, FEEDBACK_BEGIN, FEEDBACK_END)
#: the feedback of a program that passed: one of these, drawn per program (LeTI's CORRECT_LANG_FEEDBACK)
CORRECT_FEEDBACK = (
    "The code is working correctly.",
    "Great! This code works!",
    "The code is producing the right results.",
    "The code is running correctly!",
    "The code is executing correctly.",
    "This code is producing the desired results.",
    "Well done - your code is functioning as expected.",
    "Congratulations! You've correctly implemented the program.",
    "Superb! You've written a working program.",
    "You've successfully implemented the program.",
)
#: the feedback of a failing program: this, then its traceback (or "timeout" / "killed by ...")
INCORRECT_FEEDBACK_PREFIX = "The code is not working correctly. Here is some feedback: "
#: Codex's HumanEval stop sequences: a completion ends where the next top-level statement would begin
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def good_prompt(prompt: str) -> str:
    """The prompt that conditions generation on success: ``<|good|>`` then the problem (LeTI's inference)."""
    return RW_GOOD + prompt


def program_for(problem: dict[str, Any], completion: str) -> str:
    """What the sandbox runs: the problem's prompt + the completion, then its tests and ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def feedback_text(prompt: str, completion: str, result: SandboxResult | None, *, passed: bool | None = None,
                  rng: random.Random | None = None, coarse_only: bool = False) -> str:
    """One training text of LeTI: ``<|good|>`` or ``<|bad|>``, then ``<|lang_feedback|>`` feedback
    ``<|/lang_feedback|>`` (left out when ``coarse_only``), then the problem and the generated solution.

    The feedback of a passing program is one of :data:`CORRECT_FEEDBACK` (drawn with ``rng``); of a failing one
    :data:`INCORRECT_FEEDBACK_PREFIX` + the traceback over the program's own frames, or the sandbox's one-line
    reason when there is no traceback (``timeout``, ``killed by SIGXFSZ``). ``passed`` overrides ``result``.
    """
    ok = result.passed if passed is None else passed
    head = RW_GOOD if ok else RW_BAD
    if coarse_only:
        return f"{head}{prompt}{completion}"
    if ok:
        body = (rng or random).choice(CORRECT_FEEDBACK)
    else:
        detail = "" if result is None else (result.traceback.strip() or result.error)
        body = INCORRECT_FEEDBACK_PREFIX + detail
    return f"{head}{FEEDBACK_BEGIN}{body}{FEEDBACK_END}{prompt}{completion}"


def add_feedback_tokens(tokenizer: Any, model: torch.nn.Module) -> list[int]:
    """Add :data:`SPECIAL_TOKENS` to ``tokenizer`` (idempotent) and grow ``model``'s embeddings (and an untied
    head) to ``len(tokenizer)``; new rows start as the mean of the existing rows. Returns the four token ids."""
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)  # existing tokens are not added twice
    hf = find_hf_model(model, require_lm_head=True)
    emb = hf.get_input_embeddings()
    old = emb.weight.shape[0]
    if old < len(tokenizer):
        hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for layer in {id(m): m for m in (hf.get_input_embeddings(), hf.get_output_embeddings())}.values():
                w = layer.weight
                w[old:] = w[:old].mean(dim=0, keepdim=True)
                bias = getattr(layer, "bias", None)
                if bias is not None and bias.shape[0] > old:
                    bias[old:] = bias[:old].mean()
    return tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], num_samples: int = 1, *,
                       max_new_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                       batch_size: int = 16, seed: int = 0, stop_sequences: Sequence[str] = STOP_SEQUENCES,
                       max_prompt_tokens: int | None = None, desc: str = "generating programs") -> list[list[str]]:
    """``num_samples`` completions per prompt (``result[i][k]``): batched ``generate`` with the KV cache, left
    padding, sampling at ``temperature`` / ``top_p`` with top-k off (LeTI: 1.0 / 1.0 / 0), or greedy. The draws are
    seeded with ``seed`` inside a forked RNG, so the caller's RNG state is untouched and a re-run draws the same."""
    hf = find_hf_model(model, require_lm_head=True)
    device = next(hf.parameters()).device
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(num_samples)]
    out: list[list[str]] = [[] for _ in prompts]
    was_training, side = hf.training, tokenizer.padding_side
    hf.eval()
    tokenizer.padding_side = "left"
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            batches = [flat[s:s + batch_size] for s in range(0, len(flat), batch_size)]
            for chunk in progress(batches, desc, total=len(batches)):
                enc = tokenizer([p for _, p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                ids, mask = enc["input_ids"], enc["attention_mask"]
                if max_prompt_tokens is not None and ids.shape[1] > max_prompt_tokens:
                    ids, mask = ids[:, -max_prompt_tokens:], mask[:, -max_prompt_tokens:]
                kw: dict[str, Any] = {"do_sample": False} if greedy else {
                    "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                gen = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=max_new_tokens, use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id, **kw)
                texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
                for (i, _), text in zip(chunk, texts):
                    out[i].append(truncate_at_stops(text, stop_sequences))
    finally:
        tokenizer.padding_side = side
        hf.train(was_training)
    return out


def pass_at_1(model: torch.nn.Module, tokenizer: Any, problems: Sequence[dict], sandbox: Sandbox, *,
              max_new_tokens: int = 512, batch_size: int = 16, workers: int = 1,
              stop_sequences: Sequence[str] = STOP_SEQUENCES) -> tuple[float, list[SandboxResult]]:
    """Greedy, ``<|good|>``-conditioned pass@1 over ``problems`` (the fraction whose one completion passes its
    tests in ``sandbox``), and each problem's result."""
    if not problems:
        raise ValueError("pass_at_1: `problems` is empty")
    comps = sample_completions(model, tokenizer, [good_prompt(p["prompt"]) for p in problems], 1, greedy=True,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, stop_sequences=stop_sequences,
                               desc="pass@1 generation")
    results = sandbox.run_many([program_for(p, c[0]) for p, c in zip(problems, comps)], workers,
                               desc="pass@1 execution")
    return sum(r.passed for r in results) / len(results), results


@technique(name="feedback_loop", family="data_selection",
           paper="LeTI: Learning to Generate from Textual Interactions", arxiv="2305.10314")
class FeedbackLoop(Callback):
    """LeTI (Wang et al., arXiv 2305.10314): fine-tune a code model on its own programs, each conditioned on how it
    fared — the textual feedback of executing it.

    Every ``epochs_per_iteration`` epochs (one iteration), at the epoch's start:

    1. sample ``num_samples`` programs per training problem of the :class:`lit_ft.data.FeedbackLoopDataModule`
       (temperature 1, top-p 1, top-k off, ``<|good|>``-conditioned prompt);
    2. run each against its problem's tests in a :class:`lit_ft.core.sandbox.Sandbox` (a separate, limited process);
    3. write each as ``<|good|>`` / ``<|bad|>`` + ``<|lang_feedback|>`` feedback ``<|/lang_feedback|>`` + problem +
       program (:func:`feedback_text`), shuffle them with the iteration's seed and pair each with one plain row
       (1:1, LeTI's pre-training regulariser);
    4. the iteration's epochs train the plain LM loss on that set (+ ``kl_coefficient`` × the KL to the initial
       model on the feedback texts' problem + program tokens, when set). Inference conditions on ``<|good|>``
       (:func:`pass_at_1`).

    The four special tokens are added to the tokenizer and the model's embeddings at setup (new rows = the mean
    embedding), before the optimizer is built and before a checkpoint is restored, so a resumed run has the same
    shapes. The checkpointed state is the iteration counter and the iteration's texts and pairing; the sampling
    seed of iteration ``i`` is derived from ``seed`` and ``i``, so nothing else is needed to resume identically.
    The optional KL term (the authors' ``kl_divergence``, unset in all their training scripts, so off by default):
    at each position whose input token is a problem or program token of a feedback text (after the
    ``<|/lang_feedback|>``, or after ``<|good|>`` / ``<|bad|>`` with coarse feedback; plain rows have none),
    ``KL(p_initial ‖ p_current)`` over the whole vocabulary, averaged over those positions of the accumulation
    window (all ranks), times ``kl_coefficient``; logged as ``lit_ft/feedback_loop/kl`` (the unweighted mean). The
    initial model is a frozen copy of the weights at the first fit's setup (with the new embedding rows); a resumed
    run copies them again before the checkpoint is restored, and the checkpoint holds only their digest: a resumed
    run built from other weights is refused.

    Args:
        num_samples: programs sampled per problem and iteration (paper: 128 on MBPP; >= 1).
        epochs_per_iteration: training epochs on one iteration's data (paper: 3).
        max_new_tokens: most tokens generated per program (paper: 512).
        temperature: sampling temperature (paper: 1.0).
        top_p: nucleus sampling threshold (paper: 1.0 = off; top-k is always off).
        generation_batch_size: sequences per ``generate`` call.
        stop_sequences: a completion is cut at the first of these (default: Codex's HumanEval stops; the authors
            ran MBPP untruncated, an empty list does the same).
        coarse_feedback_only: only ``<|good|>`` / ``<|bad|>``, no feedback text (the paper's ablation).
        mix_plain_data: pair every feedback text with a plain row of the DataModule's ``data`` (paper: yes).
        timeout_seconds: the sandbox's wall-clock limit per program (the authors' executor: 5 s).
        cpu_seconds: the sandbox's CPU-time limit per program.
        memory_mb: the sandbox's address-space limit per program (MiB).
        execution_workers: programs run in parallel.
        evaluate_each_iteration: log greedy pass@1 on the DataModule's held-out problems at each iteration's start
            and after the last epoch (``lit_ft/feedback_loop/eval_pass_at_1``).
        seed: seed of the sampling, the feedback phrase choice, the shuffle and the plain rows of each iteration.
        kl_coefficient: weight of the KL to the initial model on the feedback texts' non-feedback tokens (>= 0;
            authors' default: off = 0). It needs a module on lit-ft's token-loss engine (lit_ft.modules.
            CausalLMModule, or one that returns ``model(**batch).loss``) and keeps a frozen copy of the model.
    """

    def __init__(self, num_samples: int = 128, epochs_per_iteration: int = 3, max_new_tokens: int = 512,
                 temperature: float = 1.0, top_p: float = 1.0, generation_batch_size: int = 16,
                 stop_sequences: list[str] | None = None, coarse_feedback_only: bool = False,
                 mix_plain_data: bool = True, timeout_seconds: float = 5.0, cpu_seconds: int = 5,
                 memory_mb: int = 1024, execution_workers: int = 2, evaluate_each_iteration: bool = False,
                 seed: int = 0, kl_coefficient: float = 0.0) -> None:
        owner = type(self).__name__
        self.num_samples = check_int(owner, "num_samples", num_samples, 1)
        self.epochs_per_iteration = check_int(owner, "epochs_per_iteration", epochs_per_iteration, 1)
        self.max_new_tokens = check_int(owner, "max_new_tokens", max_new_tokens, 1)
        self.temperature = check_number(owner, "temperature", temperature, 0.0, low_open=True)
        self.top_p = check_number(owner, "top_p", top_p, 0.0, 1.0, low_open=True)
        self.generation_batch_size = check_int(owner, "generation_batch_size", generation_batch_size, 1)
        if stop_sequences is None:
            stop_sequences = list(STOP_SEQUENCES)
        if isinstance(stop_sequences, str) or not isinstance(stop_sequences, (list, tuple)) \
                or not all(isinstance(s, str) and s for s in stop_sequences):
            raise ValueError(f"{owner}: `stop_sequences` must be a list of non-empty strings or null (= Codex's "
                             f"HumanEval stops), got {stop_sequences!r}")
        self.stop_sequences = list(stop_sequences)
        self.coarse_feedback_only = check_bool(owner, "coarse_feedback_only", coarse_feedback_only)
        self.mix_plain_data = check_bool(owner, "mix_plain_data", mix_plain_data)
        self.timeout_seconds = check_number(owner, "timeout_seconds", timeout_seconds, 0.0, low_open=True)
        self.cpu_seconds = check_int(owner, "cpu_seconds", cpu_seconds, 1)
        self.memory_mb = check_int(owner, "memory_mb", memory_mb, 64)
        self.execution_workers = check_int(owner, "execution_workers", execution_workers, 1)
        self.evaluate_each_iteration = check_bool(owner, "evaluate_each_iteration", evaluate_each_iteration)
        self.seed = check_int(owner, "seed", seed, 0)
        self.kl_coefficient = check_number(owner, "kl_coefficient", kl_coefficient, 0.0)
        #: the KL term (None when off: then the loss is exactly the plain LM loss)
        self._kl = InitialModelKL(self.kl_coefficient, owner) if self.kl_coefficient > 0 else None
        self._attachment: Attachment | None = None
        self._checked_batch = False
        self.sandbox: Sandbox | None = None
        self.token_ids: list[int] = []
        # checkpointed: the iteration whose data is current (-1 = none yet), its texts, pairing and outcomes
        self.iteration = -1
        self.texts: list[str] = []
        self.plain_indices: list[int] | None = None
        self.passed: list[bool] = []
        self.statuses: dict[str, int] = {}
        #: greedy held-out pass@1 before each iteration ([iteration, score]) and at the end (["end", score])
        self.eval_history: list[list] = []
        self._pushed = -1
        self._eval_score: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_samples=self.num_samples, epochs_per_iteration=self.epochs_per_iteration,
                                        seed=self.seed, coarse=self.coarse_feedback_only)

    # -- setup: tokens, embeddings, the fixed training-set size ----------------------------------------------------
    def _datamodule(self, trainer: pl.Trainer) -> Any:
        from lit_ft.data.feedback_loop import FeedbackLoopDataModule

        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, FeedbackLoopDataModule):
            raise TypeError(f"FeedbackLoop needs lit_ft.data.FeedbackLoopDataModule as the Trainer's datamodule (the "
                            f"problems and their tests, and the plain data it mixes in); got "
                            f"{type(dm).__name__ if dm is not None else 'no datamodule'}")
        return dm

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = self._datamodule(trainer)
        if dm.tokenizer is None:
            dm.setup(stage)
        # before the optimizer and any checkpoint restore: a resumed run builds the same shapes
        self.token_ids = add_feedback_tokens(dm.tokenizer, pl_module)
        if self.mix_plain_data and not dm.plain_examples:
            raise ValueError("FeedbackLoop: `mix_plain_data` is on but the DataModule's `data` gave no training row; "
                             "give it plain data or set mix_plain_data: false")
        owner = getattr(dm, "_feedback_loop", None)
        if owner is not None and owner is not self:
            raise ValueError("FeedbackLoop: a second FeedbackLoop on the same DataModule; one loop builds its data "
                             "(use one FeedbackLoop per run)")
        dm._feedback_loop = self
        dm.reserve(self.num_samples * len(dm.train_problems) * (2 if self.mix_plain_data else 1))
        if self.sandbox is None:
            self.sandbox = Sandbox(cpu_seconds=self.cpu_seconds, wall_seconds=self.timeout_seconds,
                                   memory_mb=self.memory_mb)
        if self._kl is not None:
            # the fit-start weights (new rows included), copied before a checkpoint is restored
            self._kl.build(find_hf_model(pl_module, require_lm_head=True), self.token_ids)
            if self._attachment is None:
                self._attachment = attach(trainer, pl_module, self._kl, "auto", who=type(self).__name__,
                                          allowed=("auto",))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach(self._attachment, self._kl)
        self._attachment = None

    # -- the outer loop ----------------------------------------------------------------------------------------------
    def iteration_seed(self, iteration: int) -> int:
        """The seed of iteration ``iteration``'s sampling, feedback phrases, shuffle and plain rows."""
        return (self.seed * 1_000_003 + iteration * 7_919 + 17) % (2**31 - 1)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch (or at an epoch's end) skips on_train_epoch_start: serve the restored iteration
        self._sync(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module)

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the current epoch's iteration unless it is the one held (restored from a checkpoint or built at an
        earlier epoch), then hand its rows to the DataModule."""
        dm = self._datamodule(trainer)
        target = trainer.current_epoch // self.epochs_per_iteration
        if self.iteration != target:  # a resumed run already has its iteration's data (restored state)
            if self.evaluate_each_iteration:
                self._evaluate(trainer, pl_module, dm, target)
            self._build_iteration(trainer, pl_module, dm, target)
        if self._pushed != self.iteration:
            dm.set_iteration_rows(self.texts, self.plain_indices)
            self._pushed = self.iteration

    def _build_iteration(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dm: Any, iteration: int) -> None:
        seed = self.iteration_seed(iteration)
        problems = dm.train_problems
        comps = sample_completions(
            pl_module, dm.tokenizer, [good_prompt(p["prompt"]) for p in problems], self.num_samples,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            batch_size=self.generation_batch_size, seed=seed, stop_sequences=self.stop_sequences,
            desc=f"feedback loop {iteration}: generating")
        pairs = [(p, c) for p, cs in zip(problems, comps) for c in cs]
        assert self.sandbox is not None
        results = self.sandbox.run_many([program_for(p, c) for p, c in pairs], self.execution_workers,
                                        desc=f"feedback loop {iteration}: executing")
        rng = random.Random(seed)
        texts = [feedback_text(p["prompt"], c, r, rng=rng, coarse_only=self.coarse_feedback_only)
                 for (p, c), r in zip(pairs, results)]
        order = list(range(len(texts)))
        rng.shuffle(order)
        self.texts = [texts[i] for i in order]
        self.passed = [results[i].passed for i in order]
        self.statuses = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "error", "timeout",
                                                                           "killed")}
        self.plain_indices = ([rng.randrange(len(dm.plain_examples)) for _ in texts] if self.mix_plain_data
                              else None)
        self.iteration = iteration

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dm: Any, when: int | str) -> None:
        if not dm.eval_problems:
            raise ValueError("FeedbackLoop: `evaluate_each_iteration` needs held-out problems: set the DataModule's "
                             "num_eval_problems >= 1")
        assert self.sandbox is not None
        self._eval_score, _ = pass_at_1(pl_module, dm.tokenizer, dm.eval_problems, self.sandbox,
                                        max_new_tokens=self.max_new_tokens, batch_size=self.generation_batch_size,
                                        workers=self.execution_workers, stop_sequences=self.stop_sequences)
        self.eval_history.append([when, self._eval_score])

    # -- the KL term on the loss engine ---------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._attachment is None:
            return
        if not self._checked_batch:
            require_keys(batch, ("input_ids", "attention_mask"), who="FeedbackLoop(kl_coefficient > 0)")
            self._checked_batch = True
        self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._attachment is not None:
            self._attachment.bind(batch)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._attachment is not None:
            self._attachment.end_window()

    @property
    def initial_model(self) -> torch.nn.Module | None:
        """The frozen initial model of the KL term (``None`` when ``kl_coefficient`` is 0 or before setup)."""
        return None if self._kl is None else self._kl.frozen.model

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._kl is not None and self._kl.last_kl is not None:
            pl_module.log("lit_ft/feedback_loop/kl", self._kl.last_kl, on_step=True, on_epoch=False, batch_size=1)
        rate = sum(self.passed) / len(self.passed) if self.passed else 0.0
        pl_module.log("lit_ft/feedback_loop/iteration", float(self.iteration), on_step=True, on_epoch=False,
                      batch_size=1)
        pl_module.log("lit_ft/feedback_loop/train_pass_rate", rate, on_step=True, on_epoch=False, batch_size=1)
        if self._eval_score is not None:
            pl_module.log("lit_ft/feedback_loop/eval_pass_at_1", self._eval_score, on_step=True, on_epoch=False,
                          batch_size=1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_each_iteration:
            self._evaluate(trainer, pl_module, self._datamodule(trainer), "end")

    # -- checkpoint ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "texts": list(self.texts),
                "plain_indices": None if self.plain_indices is None else list(self.plain_indices),
                "passed": list(self.passed), "statuses": dict(self.statuses), "seed": self.seed,
                "num_samples": self.num_samples, "eval_history": [list(e) for e in self.eval_history],
                **(self._kl.state_dict() if self._kl is not None else {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("seed", "num_samples"):
            if state_dict.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"FeedbackLoop: the checkpoint was made with {key}={state_dict[key]!r}, this run has "
                                 f"{key}={getattr(self, key)!r}; resume with the same value (the iteration's data "
                                 "depends on it)")
        self.iteration = int(state_dict["iteration"])
        self.texts = list(state_dict["texts"])
        pi = state_dict["plain_indices"]
        self.plain_indices = None if pi is None else list(pi)
        self.passed = list(state_dict["passed"])
        self.statuses = dict(state_dict.get("statuses", {}))
        self.eval_history = [list(e) for e in state_dict.get("eval_history", [])]
        self._eval_score = self.eval_history[-1][1] if self.eval_history else None
        self._pushed = -1
        if self._kl is not None:
            self._kl.load_state_dict(state_dict)
