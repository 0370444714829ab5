"""The contract suite: every technique registered with ``@technique`` passes the same checks (DESIGN.md §4), like
PEFT's common tester. A newly registered technique is collected automatically; without an entry in
``tests/contract/cases.py`` its checks fail and say what to add.

The second half registers deliberately broken techniques in a test-only registry and shows that the checks catch
them (a contract check that cannot fail protects nothing).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest

import lit_ft
from lit_ft.core.registry import TechniqueRecord, TechniqueRegistry, technique
from tests.contract import checks
from tests.contract.cases import CASES, Case, Ctx

RECORDS = lit_ft.techniques()
IDS = [r.name for r in RECORDS]


def case_for(record: TechniqueRecord) -> Case:
    if record.name not in CASES:
        pytest.fail(f"technique {record.name!r} ({record.class_path}) has no entry in tests/contract/cases.py: add "
                    f"CASES[{record.name!r}] = Case(invalid=((<argument>, <bad value>), ...), kwargs=..., "
                    f"alt_kwargs=...) with the factories it needs")
    return CASES[record.name]


@pytest.fixture
def ctx(tmp_path, tiny_tokenizer_path) -> Ctx:
    return Ctx(tmp_path, tiny_tokenizer_path)


def test_every_registered_technique_has_a_case_and_every_case_a_technique():
    missing = [r.name for r in RECORDS if r.name not in CASES]
    assert not missing, f"add entries to tests/contract/cases.py CASES for: {missing}"
    stale = sorted(set(CASES) - set(IDS))
    assert not stale, f"tests/contract/cases.py has cases for unregistered techniques: {stale}"


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_constructible_with_no_arguments(record):
    checks.constructible_with_no_arguments(record)


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_invalid_arguments_raise_naming_the_argument(record):
    checks.rejects_invalid_arguments(record, case_for(record))


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_two_instances_coexist(record, ctx):
    checks.instances_coexist(record, case_for(record), ctx)


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_checkpoint_resume_equals_uninterrupted(record, ctx):
    checks.resume_equals_uninterrupted(record, case_for(record), ctx)


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_drop_in_plain_module_changes_training_and_logs(record, ctx):
    checks.drop_in_changes_training_and_logs(record, case_for(record), ctx)


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_config_runs_through_lit_ft_fit(record, ctx):
    checks.config_runs(record, ctx)


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_doc_page_names_the_paper(record):
    checks.doc_names_the_paper(record)


# -- the checks catch broken techniques ----------------------------------------------------------------------------
BROKEN = TechniqueRegistry()  # never lit_ft's registry: these must not reach lit_ft.techniques()
PAPER = "A Paper That Does Not Exist"


class _Scaler(pl.Callback):
    """Scales every gradient by ``scale`` and logs it: enough behaviour for the checks to see."""

    name = "broken"

    def __init__(self, scale: float = 0.5) -> None:
        if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ValueError(f"{type(self).__name__}: `scale` must be a number in (0, 1], got {scale!r}")
        self.scale = float(scale)
        self.steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scale=self.scale)

    def factor(self) -> float:
        return self.scale

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.mul_(self.factor())
        self.steps += 1
        pl_module.log(f"lit_ft/{self.name}/steps", float(self.steps), batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]


@technique(name="ignores_its_check", family="tensor_selection", paper=PAPER, arxiv=None, registry=BROKEN)
class IgnoresItsArgumentCheck(_Scaler):
    name = "ignores_its_check"

    def __init__(self, scale: float = 0.5) -> None:  # no check
        self.scale, self.steps = scale, 0


@technique(name="reuses_a_state_key", family="tensor_selection", paper=PAPER, arxiv=None, registry=BROKEN)
class ReusesAStateKey(_Scaler):
    name = "reuses_a_state_key"

    @property
    def state_key(self) -> str:
        return "ReusesAStateKey"


@technique(name="forgets_its_state", family="tensor_selection", paper=PAPER, arxiv=None, registry=BROKEN)
class ForgetsItsState(_Scaler):
    """Decays its factor with the step count but does not restore the count on resume."""

    name = "forgets_its_state"

    def factor(self) -> float:
        return self.scale / (1 + self.steps)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


@technique(name="logs_elsewhere", family="tensor_selection", paper=PAPER, arxiv=None, registry=BROKEN,
           doc="docs/techniques/does_not_exist.md")
class LogsElsewhere(_Scaler):
    name = "somewhere_else"


CASE = Case(kwargs={"scale": 0.5}, alt_kwargs={"scale": 0.25}, invalid=(("scale", 0.0),))


def test_broken_techniques_stay_out_of_the_package_registry():
    assert len(BROKEN) == 4
    assert not {r.name for r in BROKEN.records()} & set(IDS)


def test_the_checks_pass_on_the_sound_reference(ctx):
    """The broken variants differ from this one in one defect each; it passes every check they fail."""
    record = TechniqueRecord("broken", type("Sound", (_Scaler,), {}), "tensor_selection", PAPER, None,
                             "configs/none.yaml", "docs/techniques/none.md")
    checks.rejects_invalid_arguments(record, CASE)
    checks.instances_coexist(record, CASE, ctx)
    checks.resume_equals_uninterrupted(record, CASE, ctx)
    checks.drop_in_changes_training_and_logs(record, CASE, ctx)


def test_a_technique_that_ignores_its_argument_check_fails():
    with pytest.raises(AssertionError, match=r"IgnoresItsArgumentCheck\(scale=0.0\) was accepted"):
        checks.rejects_invalid_arguments(BROKEN.get("ignores_its_check"), CASE)


def test_a_technique_that_reuses_a_state_key_fails(ctx):
    with pytest.raises(AssertionError, match="share state_key 'ReusesAStateKey'"):
        checks.instances_coexist(BROKEN.get("reuses_a_state_key"), CASE, ctx)


def test_a_technique_that_does_not_restore_its_state_fails(ctx):
    with pytest.raises(AssertionError, match="ForgetsItsState: the resumed run's weights differ"):
        checks.resume_equals_uninterrupted(BROKEN.get("forgets_its_state"), CASE, ctx)


def test_a_technique_that_logs_elsewhere_and_has_no_doc_fails(ctx):
    record = BROKEN.get("logs_elsewhere")
    with pytest.raises(AssertionError, match=r"nothing logged under 'lit_ft/logs_elsewhere/'.*somewhere_else"):
        checks.drop_in_changes_training_and_logs(record, CASE, ctx)
    with pytest.raises(AssertionError, match="no doc page at docs/techniques/does_not_exist.md"):
        checks.doc_names_the_paper(record)


def test_a_technique_missing_from_the_cases_table_fails_saying_what_to_add():
    record = BROKEN.get("forgets_its_state")
    with pytest.raises(pytest.fail.Exception, match=r"'forgets_its_state' .* has no entry in "
                                                    r"tests/contract/cases.py: add CASES\['forgets_its_state'\]"):
        case_for(record)
