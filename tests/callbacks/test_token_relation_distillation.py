"""TokenRelationDistillation (VideoREPA's TRD for language models): word alignment across tokenizers, the term vs an
fp64 reference, training steps, resume, exactness under gradient accumulation and DDP, the drop-in on a plain
module, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lit_ft.callbacks import TokenRelationDistillation
from lit_ft.callbacks.objectives._word_alignment import WORD_RE, align_row, spans_to_words, student_spans
from lit_ft.callbacks.objectives.token_relation_distillation import HOST_ATTR, build_projector, default_layer
from lit_ft.modules import CausalLMModule
from tests.callbacks.trd_teacher import make_tiny_teacher
from tests.helpers import (ListDataModule, PlainHFModule, SGDModule, assert_state_dicts_equal, fit_and_resume,
                           random_batch, tiny_config)

NAME = "token_relation_distillation"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("trd_teacher"))


def make_cb(teacher, tok, **kw):
    return TokenRelationDistillation(teacher=teacher, tokenizer=tok, **{"projector_dim": 16, **kw})


def causal_module():
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.0)


def trainer(callbacks, steps=1, **kw):
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=callbacks, **kw)


# -- word alignment ---------------------------------------------------------------------------------------------------


def test_spans_to_words_by_hand():
    # words [0,3) [4,7) [8,9); tokens [0,2) [2,5) [3,5) [5,9) and an empty one
    tok, word = spans_to_words(np.array([0, 2, 3, 5, 9]), np.array([2, 5, 5, 9, 9]), np.array([0, 4, 8]),
                               np.array([3, 7, 9]))
    assert list(zip(tok.tolist(), word.tolist())) == [(0, 0), (1, 0), (1, 1), (2, 1), (3, 1), (3, 2)]


def test_alignment_across_tokenizers(tiny_tokenizer_path, teacher):
    from transformers import AutoTokenizer

    st, tt = AutoTokenizer.from_pretrained(tiny_tokenizer_path), AutoTokenizer.from_pretrained(teacher)
    text = "Hello, world: 12 apples weren't here."
    ids = st("<|im_start|>" + text)["input_ids"]
    decoded, starts, ends = student_spans(st, ids)
    assert decoded == text and starts[0] == ends[0] == 0  # the special token covers no character
    row = align_row(st, tt, ids, np.arange(len(ids)), np.ones(len(ids), bool), 64)
    words = [m.group() for m in WORD_RE.finditer(text)]
    assert row.num_words == len(words) == 11  # every word has tokens on both sides
    for side, pos, word, pieces in (("student", row.student_pos, row.student_word, None),
                                    ("teacher", row.teacher_pos, row.teacher_word, None)):
        assert sorted(set(word.tolist())) == list(range(11)), side
    # the student tokens of "apples" and "world" are what they cover
    by_word = {w: [st.decode([ids[p]]) for p, ww in zip(row.student_pos, row.student_word) if ww == w]
               for w in range(11)}
    assert "".join(by_word[words.index("apples")]).strip() == "apples"
    assert "".join(by_word[words.index("world")]).strip() == "world"
    # the teacher's special tokens take part in no word
    assert 0 not in row.teacher_pos and len(row.teacher_ids) - 1 not in row.teacher_pos


def test_offset_fast_path_equals_prefix_decoding(tiny_tokenizer_path, teacher, monkeypatch):
    """The tokenizer's own offsets (a row that is its encoding of the text) and the prefix-decoding fallback (any
    row, e.g. random ids) give the same word alignment."""
    from transformers import AutoTokenizer

    from lit_ft.callbacks.objectives import _word_alignment as wa

    st, tt = AutoTokenizer.from_pretrained(tiny_tokenizer_path), AutoTokenizer.from_pretrained(teacher)
    def both(ids):
        args = (st, tt, ids, np.arange(len(ids)), np.ones(len(ids), bool), 64)
        fast = align_row(*args)
        monkeypatch.setattr(wa, "student_spans", wa.prefix_spans)
        slow = align_row(*args)
        monkeypatch.undo()
        assert fast.text == slow.text and fast.num_words == slow.num_words > 0
        return fast, slow

    canonical = st("<|im_start|>The 3 apples, 12 pears; and cafe.<|im_end|>")["input_ids"]
    random_ids = random_batch(1, 24, seed=3)["input_ids"][0].tolist()
    for ids in (canonical, random_ids):
        fast, slow = both(ids)
        assert np.array_equal(fast.student_pos, slow.student_pos)
        assert np.array_equal(fast.student_word, slow.student_word)
    # a character split over two byte tokens: the offsets give it to both, the prefixes only to the last one
    fast, slow = both(st("and café.")["input_ids"])
    pairs = lambda r: set(zip(r.student_pos.tolist(), r.student_word.tolist()))  # noqa: E731
    assert pairs(slow) < pairs(fast)


def test_response_tokens_select_only_the_supervised_words(tiny_tokenizer_path, teacher):
    from transformers import AutoTokenizer

    st, tt = AutoTokenizer.from_pretrained(tiny_tokenizer_path), AutoTokenizer.from_pretrained(teacher)
    prompt, completion = "Is this sarcastic?", " yes it is"
    ids_p, ids_c = st(prompt)["input_ids"], st(completion)["input_ids"]
    ids = ids_p + ids_c
    selected = np.array([False] * len(ids_p) + [True] * len(ids_c))
    row = align_row(st, tt, ids, np.arange(len(ids)), selected, 64)
    assert row.num_words == 3 and set(row.student_pos.tolist()) <= set(range(len(ids_p), len(ids)))


def test_default_layer_follows_the_papers_relative_depth():
    assert default_layer(42) == 17  # after block 18 of 42 (0-based index 17)
    assert default_layer(30) == 12  # SmolLM2-135M
    assert default_layer(2) == 0 and default_layer(1) == 0


# -- the term vs an fp64 reference -----------------------------------------------------------------------------------


class _Snapshot(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class _Values(pl.Callback):
    """The logged term per step, and the level the objective ran at."""

    def __init__(self, cb=None):
        self.cb, self.values, self.level = cb, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics[f"lit_ft/{NAME}/loss"]))
        self.level = None if self.cb is None else self.cb.level


def reference_term(cb, state, batch, teacher_path, margin, weight):
    """The term from scratch in fp64: the tiny model's layer output, the projector's weights, the teacher's last
    hidden state, per-word means and dense Gram matrices over each row's words."""
    from transformers import AutoModel

    from tests.helpers import tiny_hf_model

    hf = tiny_hf_model().double()
    hf.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    proj = build_projector(cb.projector[0].in_features, cb.projector_dim, cb.projector[-1].out_features).double()
    prefix = f"{HOST_ATTR}.{NAME}."
    proj.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    teacher = AutoModel.from_pretrained(teacher_path).double().eval()
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = out.hidden_states[cb.layer_index + 1]
        total, pairs = torch.zeros((), dtype=torch.float64), 0
        for b, row in enumerate(cb._rows(batch)):
            W = row.num_words
            if W == 0:
                continue
            th = teacher(input_ids=torch.tensor([row.teacher_ids])).last_hidden_state[0]
            s = torch.stack([proj(hidden[b, row.student_pos[row.student_word == w]]).mean(0) for w in range(W)])
            t = torch.stack([th[row.teacher_pos[row.teacher_word == w]].mean(0) for w in range(W)])
            s, t = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
            total += torch.relu((s @ s.T - t @ t.T).abs() - margin).sum()
            pairs += W * W
    return float(weight * total / pairs)


@pytest.mark.parametrize("make", ["causal", "plain"])
def test_term_matches_fp64_reference(tiny_tokenizer_path, teacher, make):
    batch = random_batch(4, 16, seed=5)  # ragged right padding on half the rows
    cb = make_cb(teacher, tiny_tokenizer_path, margin=0.05, weight=0.7)
    snap, vals = _Snapshot(), _Values(cb)
    torch.manual_seed(0)
    module = causal_module() if make == "causal" else PlainHFModule()
    trainer([cb, snap, vals]).fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert vals.level == ("mixin" if make == "causal" else "hook")
    ref = reference_term(cb, snap.state, batch, teacher, 0.05, 0.7)
    assert ref > 0
    assert vals.values[0] == pytest.approx(ref, rel=1e-5)


# -- training -------------------------------------------------------------------------------------------------------


def test_relation_loss_falls_in_a_few_steps(tiny_tokenizer_path, teacher):
    batch = random_batch(4, 16, seed=1)
    cb = make_cb(teacher, tiny_tokenizer_path, weight=1.0, margin=0.0, projector_lr=3e-2)
    vals = _Values()
    torch.manual_seed(0)
    trainer([cb, vals], steps=12).fit(causal_module(), train_dataloaders=DataLoader([batch] * 12, batch_size=None))
    assert len(vals.values) == 12
    assert vals.values[-1] < 0.7 * vals.values[0], vals.values


def test_checkpoint_resume_is_identical(tmp_path, tiny_tokenizer_path, teacher):
    """The projector (its own lr group, under a warm-up scheduler) and its optimizer state resume exactly."""
    def module():
        return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, warmup_steps=3)

    run = fit_and_resume(module, lambda: [make_cb(teacher, tiny_tokenizer_path, projector_lr=0.05)], tmp_path,
                         make_datamodule=lambda: ListDataModule(n_batches=2))
    assert any(k.startswith(f"{HOST_ATTR}.{NAME}.") for k in run.full.state_dict())
    assert_state_dicts_equal(run.full.state_dict(), run.resumed.state_dict())
    before = run.callbacks_full[0]
    assert before.projector is getattr(run.full, HOST_ATTR)[NAME]


def test_resume_with_another_layer_is_refused(tmp_path, tiny_tokenizer_path, teacher):
    cb = make_cb(teacher, tiny_tokenizer_path, layer=1)
    cb.layer_index = 1
    with pytest.raises(ValueError, match="`layer`"):
        cb.load_state_dict({"layer": 0})


class _GradCapture(pl.Callback):
    def __init__(self, path) -> None:
        self.path = str(path)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None},
                       self.path)


def _window_data():
    data = random_batch(8, 16, prompt_len=3, seed=2)
    data["attention_mask"][:2, 6:] = 0  # very unequal word counts across micro-batches / ranks
    data["labels"][:2, 6:] = -100
    return data


def _grads(tmp_path, tok, teacher, make, batch_size, accumulate=1, strategy="auto", devices=1, tokens="all"):
    data = _window_data()
    batches = [{k: v[i: i + batch_size] for k, v in data.items()} for i in range(0, 8, batch_size)]
    torch.manual_seed(0)
    module = SGDModule(model_config=tiny_config()) if make == "causal" else PlainHFModule()
    path = tmp_path / f"{make}-{batch_size}-{accumulate}-{devices}-{tokens}.pt"
    cb = make_cb(teacher, tok, tokens=tokens, weight=5.0)
    t = pl.Trainer(accelerator="cpu", strategy=strategy, devices=devices, max_steps=1,
                   accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, _GradCapture(path)],
                   use_distributed_sampler=True)
    t.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return torch.load(path)


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and any(k.startswith(HOST_ATTR) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=k)
    assert all(torch.count_nonzero(v) > 0 for k, v in a.items() if k.startswith(HOST_ATTR))


@pytest.mark.parametrize("make, tokens", [("causal", "all"), ("plain", "all"), ("causal", "response")])
def test_exact_under_gradient_accumulation(tmp_path, tiny_tokenizer_path, teacher, make, tokens):
    """accumulate 4 x batch 2 == batch 8: the word pairs of the whole window are the divisor."""
    big = _grads(tmp_path, tiny_tokenizer_path, teacher, make, 8, tokens=tokens)
    acc = _grads(tmp_path, tiny_tokenizer_path, teacher, make, 2, accumulate=4, tokens=tokens)
    _assert_same_grads(acc, big)


@pytest.mark.slow
@pytest.mark.parametrize("make", ["causal", "plain"])
def test_exact_under_two_process_ddp(tmp_path, tiny_tokenizer_path, teacher, make):
    """2 gloo ranks x batch 4 == 1 process x batch 8 (rank 0 holds far fewer words than rank 1). The one-process
    reference runs in a spawned process too: in the full suite the test process's state (left by earlier tests)
    changed its float32 results at the 1e-3 relative level, which the fresh ranks never see."""
    single = _grads(tmp_path, tiny_tokenizer_path, teacher, make, 8, strategy="ddp_spawn", devices=1)
    ddp = _grads(tmp_path, tiny_tokenizer_path, teacher, make, 4, strategy="ddp_spawn", devices=2)
    _assert_same_grads(ddp, single)


def test_drop_in_on_a_plain_module_trains_the_projector(tiny_tokenizer_path, teacher):
    cb = make_cb(teacher, tiny_tokenizer_path)
    vals = _Values(cb)
    torch.manual_seed(0)
    module = PlainHFModule()
    trainer([cb, vals], steps=2).fit(module, datamodule=ListDataModule(n_batches=2))
    assert vals.level == "hook" and all(v > 0 for v in vals.values)
    torch.manual_seed(0)
    fresh = type(cb.projector[0])(cb.projector[0].in_features, cb.projector[0].out_features)
    assert not torch.equal(cb.projector[0].weight.detach(), fresh.weight)
    assert cb.projector is getattr(module, HOST_ATTR)[NAME]


def test_projector_left_out_of_the_optimizer_is_added(tiny_tokenizer_path, teacher):
    class OnlyModel(PlainHFModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    cb = make_cb(teacher, tiny_tokenizer_path, projector_lr=0.5)
    torch.manual_seed(0)
    module = OnlyModel()
    t = trainer([cb], steps=1)
    t.fit(module, datamodule=ListDataModule(n_batches=1))
    held = {id(p): g["lr"] for g in t.optimizers[0].param_groups for p in g["params"]}
    assert all(held.get(id(p)) == 0.5 for p in cb.projector.parameters())


# -- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"margin": -0.1}, "margin"), ({"weight": float("nan")}, "weight"), ({"tokens": "prompt"}, "tokens"),
    ({"projector_dim": 0}, "projector_dim"), ({"layer": 1.5}, "layer"), ({"teacher_layer": "last"}, "teacher_layer"),
    ({"tile_size": 0}, "tile_size"), ({"projector_lr": -1.0}, "projector_lr"), ({"teacher": ""}, "teacher"),
    ({"integration": "batch"}, "integration"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        TokenRelationDistillation(**kwargs)


def test_layer_out_of_range_is_named(tiny_tokenizer_path, teacher):
    cb = make_cb(teacher, tiny_tokenizer_path, layer=5)
    with pytest.raises(ValueError, match=r"`layer` must be an int in \[-2, 1\]"):
        trainer([cb]).fit(causal_module(), datamodule=ListDataModule(n_batches=1))


def test_missing_tokenizer_names_the_argument(teacher):
    cb = TokenRelationDistillation(teacher=teacher, projector_dim=8)
    with pytest.raises(ValueError, match="pass `tokenizer`"):
        trainer([cb]).fit(causal_module(), datamodule=ListDataModule(n_batches=1))


def test_missing_labels_name_the_key(tiny_tokenizer_path, teacher):
    batch = random_batch(2, 8)
    batch.pop("labels")
    cb = make_cb(teacher, tiny_tokenizer_path)
    with pytest.raises(KeyError, match="labels"):
        trainer([cb]).fit(causal_module(), train_dataloaders=DataLoader([batch], batch_size=None))


def test_packed_batches_are_refused(tiny_tokenizer_path, teacher):
    batch = random_batch(2, 8)
    batch.pop("attention_mask")
    batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    batch["packed_sample_idx"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    cb = make_cb(teacher, tiny_tokenizer_path)
    with pytest.raises(ValueError, match="packed"):
        trainer([cb]).fit(causal_module(), train_dataloaders=DataLoader([batch], batch_size=None))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_tokenizer_path, teacher):
    """The layer output is captured in the forward; the recomputation in backward does not capture again."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, gradient_checkpointing=ckpt)
        path = tmp_path / f"ckpt{ckpt}.pt"
        t = trainer([make_cb(teacher, tiny_tokenizer_path, weight=5.0), _GradCapture(path)])
        t.fit(module, train_dataloaders=DataLoader([random_batch(4, 16, seed=7)], batch_size=None))
        grads.append(torch.load(path))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_a_tokenizer_that_did_not_make_the_batch_is_named(tiny_tokenizer_path, teacher):
    batch = random_batch(2, 8)
    batch["input_ids"][0, 3] = 5000  # beyond the tiny tokenizer's 384 tokens
    cb = make_cb(teacher, tiny_tokenizer_path)
    with pytest.raises(ValueError, match="token id 5000.*`tokenizer`"):
        trainer([cb]).fit(causal_module(), train_dataloaders=DataLoader([batch], batch_size=None))
