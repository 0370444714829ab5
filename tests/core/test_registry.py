"""lit_ft.core.registry: what @technique records, and what it refuses at registration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import lit_ft
import lit_ft.callbacks
from lit_ft.core.registry import (
    FAMILIES,
    REGISTRY,
    TechniqueRecord,
    TechniqueRegistrationError,
    TechniqueRegistry,
    technique,
)
from lit_ft.callbacks import techniques

ROOT = Path(__file__).resolve().parents[2]

# the 22 classes lit_ft.callbacks exported by hand before the registry built __all__
EXPORTED_BEFORE = ["ApproximatedPrompt", "BlackBoxPromptLearning", "BottleneckAdapters", "CPT", "CriticalTokenScoring", "DePT", "DSEE", "EPT", "ExcessLossSelection", "FeedbackLoop", "ForgettingMonitor", "FreezeLayers", "GreenTrainer", "HalfFineTuning",
                   "IAPT", "KeyTokenWeighting", "LayerwiseLRDecay", "LinearAdapters", "LocalizedTuning", "LotteryTicketSparseFT",
                   "MAM", "MaskedThought", "MultiTokenHeads", "OneTokenRollout", "OTDataSelection", "PANDA", "ParallelAdapters", "PrefixTuning", "ProMoT", "PromptTuning", "PTEC", "QTuning",
                   "ReinitTopLayers", "SelfTraining", "SSToken", "TokenDistributionShift", "TokenDPO", "TokenElimination", "TokenRelationDistillation", "TrainOnly",
                   "TuningContribution"]


def test_callbacks_all_is_built_from_the_registry_and_unchanged():
    assert lit_ft.callbacks.__all__ == EXPORTED_BEFORE
    assert sorted(r.cls.__name__ for r in techniques()) == sorted(EXPORTED_BEFORE)
    for record in techniques():
        assert getattr(lit_ft.callbacks, record.cls.__name__) is record.cls


def test_lit_ft_techniques_is_lazy_and_sorted_by_family_then_name():
    records = lit_ft.techniques()
    assert records == techniques() == REGISTRY.records()
    assert [(FAMILIES.index(r.family), r.name) for r in records] == \
        sorted((FAMILIES.index(r.family), r.name) for r in records)
    present = [f for f in FAMILIES if any(r.family == f for r in records)]
    assert records[0].family == present[0] == "token_selection" and records[-1].family == present[-1]


def test_records_follow_the_conventions():
    for record in techniques():
        assert (ROOT / record.config).is_file(), record.config
        assert (ROOT / record.doc).is_file(), record.doc
        assert record.config == f"configs/{record.name}.yaml"
        assert record.doc == f"docs/techniques/{record.name}.md"
        assert record.class_path == f"lit_ft.callbacks.{record.cls.__name__}"
        assert f"class_path: {record.class_path}" in (ROOT / record.config).read_text()
        own = getattr(record.cls, "technique_name", None) or getattr(record.cls, "scorer_name", None)
        if own is not None:
            assert own == record.name
    assert REGISTRY.get("excess_loss").arxiv_url == "https://arxiv.org/abs/2404.07965"
    assert REGISTRY.get("promot").arxiv_url == "https://arxiv.org/abs/2211.00635"


def test_a_technique_without_a_confirmed_arxiv_id_has_no_url():
    local = TechniqueRegistry()

    @technique(name="unconfirmed", family="prompt", paper="A Paper", arxiv=None, registry=local)
    class Unconfirmed:
        pass

    assert local.get("unconfirmed").arxiv is None and local.get("unconfirmed").arxiv_url is None


def test_record_is_frozen():
    record = REGISTRY.get("excess_loss")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "other"  # type: ignore[misc]


def _declare(registry, cls, **overrides):
    kw = dict(name="demo", family="token_selection", paper="A  Paper\n Title", arxiv="2401.00001")
    kw.update(overrides)
    return technique(registry=registry, **kw)(cls)


def test_registration_fills_paths_and_normalises_the_title():
    scratch = TechniqueRegistry()

    class Demo:
        pass

    assert _declare(scratch, Demo) is Demo
    record = scratch.get("demo")
    assert isinstance(record, TechniqueRecord)
    assert (record.config, record.doc, record.paper) == ("configs/demo.yaml", "docs/techniques/demo.md", "A Paper Title")
    assert "demo" in scratch and len(scratch) == 1 and "demo" not in REGISTRY
    _declare(scratch, Demo)  # re-registering the same class (a module reload) replaces the record
    assert len(scratch) == 1


@pytest.mark.parametrize("overrides, match", [
    ({"family": "tokens"}, r"`family` must be one of \('token_selection'.*got 'tokens'"),
    ({"name": "Demo-1"}, r"`name` must be a snake_case identifier .*got 'Demo-1'"),
    ({"arxiv": "2401.00001v2"}, r"`arxiv` must be an arXiv id like '2404.07965' .*got '2401.00001v2'"),
    ({"arxiv": "arXiv:2401.00001"}, r"`arxiv` must be an arXiv id"),
    ({"paper": " "}, r"`paper` must be the paper's title"),
])
def test_invalid_declarations_raise_at_registration(overrides, match):
    class Demo:
        pass

    with pytest.raises(TechniqueRegistrationError, match=match):
        _declare(TechniqueRegistry(), Demo, **overrides)


def test_duplicate_name_and_double_registration_raise():
    scratch = TechniqueRegistry()

    class First:
        pass

    class Second:
        pass

    _declare(scratch, First)
    with pytest.raises(TechniqueRegistrationError, match=r"'demo' is already registered by .*First.*Second"):
        _declare(scratch, Second)
    with pytest.raises(TechniqueRegistrationError, match=r"First is already registered as 'demo'"):
        _declare(scratch, First, name="demo_two")
    assert [r.cls for r in scratch.records()] == [First]  # the refused declarations left nothing behind


def test_log_prefix_must_match_the_registered_name():
    class Logs:
        technique_name = "something_else"

    with pytest.raises(TechniqueRegistrationError, match=r"`name`='demo' but the class logs under "
                                                         r"technique_name='something_else'"):
        _declare(TechniqueRegistry(), Logs)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"no technique named 'nope'.*excess_loss"):
        REGISTRY.get("nope")
