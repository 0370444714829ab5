"""Pictures of the three technique families (lit_ft/core/picture_*.py, drawn by the family bases every
``picture_every_n_steps`` optimizer steps): token heat-map (HTML), parameter map (PNG) and the prompt's nearest
vocabulary tokens (HTML). Content is checked, not pixels."""

from __future__ import annotations

import html
import inspect
import re
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import PrefixTuning, PromptTuning, TrainOnly
from lit_ft.callbacks._param_plan import ParamPlanCallback
from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.loss import TokenDecision
from lit_ft.core.params import ParamPlan, plan_summary
from lit_ft.core.picture_params import param_map_figure, param_map_table
from lit_ft.core.picture_tokens import token_text
from lit_ft.core.pictures import html_path, log_html
from lit_ft.core.prompts import init_token_ids
from lit_ft.modules import CausalLMModule
from tests.helpers import VOCAB, ListDataModule, PlainHFModule, quiet_trainer, random_batch, tiny_config

SPAN = re.compile(r'<span class="tok (kept|dropped|unscored)" data-id="(-?\d+)"(?: data-weight="([^"]+)")?[^>]*>([^<]*)</span>')
ROW = re.compile(r'<div class="row">(.*?)</div>')


class EvenKeeper(TokenScorerCallback):
    """Keeps the even target positions with weight 2, drops the odd ones: a decision known in advance."""

    scorer_name = "even_keeper"

    def score_tokens(self, scores):
        t = torch.arange(scores.targets.shape[1], device=scores.targets.device)
        keep = (t % 2 == 0).expand_as(scores.valid)
        return TokenDecision(keep=keep, weights=torch.full(scores.valid.shape, 2.0, device=scores.valid.device))


class TokenizedData(ListDataModule):
    def __init__(self, tokenizer_path: str, **kw) -> None:
        super().__init__(**kw)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)


def _files(root: str) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix in (".png", ".html"))


# ---------------------------------------------------------------------------------------------------------------
# token family
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("integration, accumulate", [("auto", 1), ("batch", 2), ("hook", 1)])
def test_token_picture_marks_kept_and_dropped_tokens(tmp_path, tiny_tokenizer_path, integration, accumulate):
    plain = integration == "hook"
    module = PlainHFModule() if plain else CausalLMModule(model_config=tiny_config())
    cb = EvenKeeper(integration=integration, picture_every_n_steps=1)
    dm = TokenizedData(tiny_tokenizer_path, n_batches=4)
    quiet_trainer([cb], max_steps=2, default_root_dir=str(tmp_path), accumulate_grad_batches=accumulate).fit(module, dm)
    # one page per optimizer step, from the step's first micro-batch (batches 0 and `accumulate`)
    assert [p.name for p in _files(str(tmp_path))] == ["tokens_step1.html", "tokens_step2.html"]
    tok = dm.tokenizer
    for step, batch_index in ((1, 0), (2, accumulate)):
        page = (tmp_path / "even_keeper" / f"tokens_step{step}.html").read_text()
        assert 'class="legend"' in page and "kept" in page and "dropped" in page
        rows = ROW.findall(page)
        assert len(rows) == EvenKeeper.picture_rows
        batch = random_batch(4, 16, seed=batch_index)
        for r, row in enumerate(rows):
            spans = SPAN.findall(row)
            assert [int(s[1]) for s in spans] == batch["input_ids"][r].tolist()
            for j, (cls, tid, weight, text) in enumerate(spans):
                valid = j >= 1 and batch["labels"][r, j] != -100
                want = "unscored" if not valid else ("kept" if (j - 1) % 2 == 0 else "dropped")
                assert cls == want, (step, r, j)
                assert (weight == "2") == (want == "kept")
                assert html.unescape(text) == token_text(tok, int(tid))
                if tok.decode([int(tid)]).isalnum():  # a plain word piece is shown as decoded
                    assert html.unescape(text) == tok.decode([int(tid)])


def test_token_picture_without_tokenizer_shows_ids(tmp_path):
    cb = EvenKeeper(picture_every_n_steps=2)
    quiet_trainer([cb], max_steps=2, default_root_dir=str(tmp_path)).fit(CausalLMModule(model_config=tiny_config()),
                                                                         ListDataModule(n_batches=2))
    assert [p.name for p in _files(str(tmp_path))] == ["tokens_step2.html"]
    spans = SPAN.findall(ROW.findall((tmp_path / "even_keeper" / "tokens_step2.html").read_text())[0])
    assert [text for _, _, _, text in spans] == [str(i) for i in random_batch(4, 16, seed=1)["input_ids"][0].tolist()]
    assert "score_tokens" not in cb.__dict__  # the capturing wrapper is gone once the picture is drawn


# ---------------------------------------------------------------------------------------------------------------
# parameter family
# ---------------------------------------------------------------------------------------------------------------
def test_param_map_table_and_png_follow_the_plan(tmp_path):
    module = CausalLMModule(model_config=tiny_config())
    cb = TrainOnly(preset="patterns", patterns=["*q_proj*", "*lm_head*"])
    cb.picture_every_n_steps = 1
    quiet_trainer([cb], max_steps=2, default_root_dir=str(tmp_path)).fit(module, ListDataModule(n_batches=2))
    assert [p.name for p in _files(str(tmp_path))] == ["param_map_step1.png", "param_map_step2.png"]
    table = cb.last_param_map
    assert table.trainable == set(cb.selected_names) and len(cb.selected_names) == 3
    assert table.rows == ["embeddings", "layer 0", "layer 1", "head"]
    assert table.kinds[:7] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for (row, kind), cell in table.cells.items():
        assert cell.share == (1.0 if kind in ("q_proj", "lm_head") else 0.0), (row, kind)
    assert table.share("head", "lm_head") == 1.0 and table.share("embeddings", "embed_tokens") == 0.0
    assert table.share("embeddings", "q_proj") is None  # no such tensor: a blank cell
    from PIL import Image

    fig = param_map_figure(table)
    w, h = fig.get_size_inches() * fig.dpi
    with Image.open(tmp_path / "train_only" / "param_map_step2.png") as img:
        assert img.size == (round(w), round(h))


def test_param_map_counts_element_masks():
    module = CausalLMModule(model_config=tiny_config())
    name = next(n for n, _ in module.named_parameters() if n.endswith("layers.1.mlp.up_proj.weight"))
    p = dict(module.named_parameters())[name]
    mask = torch.zeros(p.shape, dtype=torch.bool)
    mask[: p.shape[0] // 4] = True
    plan = ParamPlan({n: ("frozen" if n != name else mask) for n, _ in module.named_parameters()}, owner="test")
    table = param_map_table(module, plan_summary(module, plan))
    cell = table.cells[("layer 1", "up_proj")]
    assert cell.masked == p.numel() and cell.share == pytest.approx(0.25) and table.trainable == {name}
    assert table.share("layer 0", "up_proj") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# prompt family
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_picture_lists_the_init_tokens_first(tmp_path):
    cb = PromptTuning(num_virtual_tokens=4, init="vocab", seed=3, learning_rate=1e-6, picture_every_n_steps=1)
    quiet_trainer([cb], max_steps=1, default_root_dir=str(tmp_path)).fit(CausalLMModule(model_config=tiny_config()),
                                                                         ListDataModule(n_batches=1))
    expected = init_token_ids("vocab", 4, VOCAB, generator=torch.Generator().manual_seed(3)).tolist()
    assert [ids[0] for ids in cb.last_nearest_ids] == expected
    page = (tmp_path / "prompt_tuning" / "prompt_tokens_step1.html").read_text()
    rows = re.findall(r"<tr><th>v\d+</th>(.*?)</tr>", page)
    firsts = [int(re.search(r'data-id="(\d+)"', r).group(1)) for r in rows]
    assert firsts == expected and all(len(re.findall('class="near"', r)) == PromptTuning.picture_top_k for r in rows)
    assert [p.name for p in _files(str(tmp_path))] == ["prompt_tokens_step1.html"]


def test_prefix_prompt_has_no_picture(tmp_path):
    cb = PrefixTuning(num_virtual_tokens=2)
    cb.picture_every_n_steps = 1
    quiet_trainer([cb], max_steps=1, default_root_dir=str(tmp_path)).fit(CausalLMModule(model_config=tiny_config()),
                                                                         ListDataModule(n_batches=1))
    assert _files(str(tmp_path)) == [] and cb.last_picture is None


# ---------------------------------------------------------------------------------------------------------------
# off by default; arguments; W&B
# ---------------------------------------------------------------------------------------------------------------
def test_no_picture_by_default(tmp_path):
    cbs = [EvenKeeper(), TrainOnly(preset="patterns", patterns=["*q_proj*"])]
    quiet_trainer(cbs, max_steps=2, default_root_dir=str(tmp_path / "a")).fit(
        CausalLMModule(model_config=tiny_config()), ListDataModule(n_batches=2))
    quiet_trainer([PromptTuning(num_virtual_tokens=2)], max_steps=1, default_root_dir=str(tmp_path / "b")).fit(
        CausalLMModule(model_config=tiny_config()), ListDataModule(n_batches=1))
    assert _files(str(tmp_path)) == []
    assert all(cb.picture_every_n_steps == 0 for cb in cbs)


def _assign(cb, value):
    cb.picture_every_n_steps = value


@pytest.mark.parametrize("make", [lambda v: EvenKeeper(picture_every_n_steps=v),
                                  lambda v: ParamPlanCallback(picture_every_n_steps=v),
                                  lambda v: PromptCallback(picture_every_n_steps=v),
                                  lambda v: _assign(PromptTuning(), v), lambda v: _assign(TrainOnly(), v),
                                  lambda v: PromptTuning(picture_every_n_steps=v),
                                  lambda v: TrainOnly(picture_every_n_steps=v)])
@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_picture_every_n_steps_is_checked(make, value):
    with pytest.raises(ValueError, match="picture_every_n_steps"):
        make(value)


def _family_techniques() -> list:
    """The registered techniques whose class subclasses a picture-drawing family base (prompts are parameter
    plans too)."""
    from lit_ft.callbacks import techniques

    return [r.cls for r in techniques() if issubclass(r.cls, (TokenScorerCallback, ParamPlanCallback))]


def test_every_family_technique_takes_picture_every_n_steps():
    """A LightningCLI config can only set what the technique's own signature lists (jsonargparse reads it), so each
    technique of the three families must take the argument, last (positional calls keep working), and forward it."""
    classes = _family_techniques()
    names = {c.__name__ for c in classes}
    # the families' known members: a registry or base change that drops one of them fails here
    assert {"ExcessLossSelection", "QTuning", "TrainOnly", "LotteryTicketSparseFT", "PromptTuning", "PANDA"} <= names
    for cls in classes:
        params = list(inspect.signature(cls.__init__).parameters.values())
        assert params[-1].name == "picture_every_n_steps", cls.__name__
        assert params[-1].default == 0 and params[-1].annotation in (int, "int"), cls.__name__
        assert cls(picture_every_n_steps=3).picture_every_n_steps == 3, cls.__name__
        assert cls().picture_every_n_steps == 0, cls.__name__
        assert "picture_every_n_steps:" in (cls.__doc__ or ""), f"{cls.__name__}: not in its docstring's Args"


def test_log_html_writes_the_page_and_logs_wandb_html(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = mock.MagicMock(spec=WandbLogger)
    wandb_logger.save_dir = str(tmp_path)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    with mock.patch.object(pl.Trainer, "loggers", new_callable=mock.PropertyMock, return_value=[wandb_logger]):
        path = log_html(trainer, "<p>hi</p>", "demo", "page", step=4)
    assert path == html_path(str(tmp_path), "demo", "page", 4) and Path(path).read_text() == "<p>hi</p>"
    (metrics,), kwargs = wandb_logger.log_metrics.call_args
    import wandb

    assert kwargs == {"step": 4} and list(metrics) == ["lit_ft/demo/page"]
    assert isinstance(metrics["lit_ft/demo/page"], wandb.Html)


@pytest.mark.slow
def test_ddp_two_ranks_draw_once_without_deadlock(tmp_path):
    """2 CPU ranks (gloo): every rank takes part in the broadcast of the log dir at each picture, only rank 0
    writes; the run ends (a rank skipping the collective would hang it)."""
    batches = [random_batch(4, 16, seed=s) for s in range(4)]
    cbs = [EvenKeeper(picture_every_n_steps=1),
           TrainOnly(preset="patterns", patterns=["*q_proj*"], picture_every_n_steps=2)]
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=cbs, default_root_dir=str(tmp_path), use_distributed_sampler=True)
    trainer.fit(CausalLMModule(model_config=tiny_config()),
                train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert [p.relative_to(tmp_path).as_posix() for p in _files(str(tmp_path))] == [
        "even_keeper/tokens_step1.html", "even_keeper/tokens_step2.html", "train_only/param_map_step2.png"]
