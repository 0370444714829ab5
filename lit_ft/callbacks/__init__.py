"""lit_ft callbacks, addressable from LightningCLI YAML as ``class_path: lit_ft.callbacks.<Name>``.

The imports stay explicit (IDEs and jsonargparse resolve the short names from them); ``__all__`` is every class
registered with ``@technique`` (``lit_ft.core.registry``), so a technique is listed once, where it is defined.
"""

from lit_ft.callbacks.adapters import ApproximatedPrompt
from lit_ft.callbacks.adapters import BottleneckAdapters
from lit_ft.callbacks.adapters import DSEE
from lit_ft.callbacks.adapters import LinearAdapters
from lit_ft.callbacks.adapters import MAM, ParallelAdapters
from lit_ft.callbacks.analysis import ForgettingMonitor
from lit_ft.callbacks.analysis import TokenDistributionShift
from lit_ft.callbacks.analysis import TuningContribution
from lit_ft.callbacks.data_selection import OTDataSelection
from lit_ft.callbacks.data_selection import FeedbackLoop
from lit_ft.callbacks.data_selection import SelfTraining
from lit_ft.callbacks.objectives import CriticalTokenScoring
from lit_ft.callbacks.objectives import MultiTokenHeads
from lit_ft.callbacks.objectives import OneTokenRollout
from lit_ft.callbacks.objectives import TokenDPO
from lit_ft.callbacks.objectives import TokenRelationDistillation
from lit_ft.callbacks.param_reset import HalfFineTuning
from lit_ft.callbacks.param_reset import LotteryTicketSparseFT
from lit_ft.callbacks.param_reset import ReinitTopLayers
from lit_ft.callbacks.prompt import BlackBoxPromptLearning
from lit_ft.callbacks.prompt import CPT
from lit_ft.callbacks.prompt import DePT
from lit_ft.callbacks.prompt import EPT
from lit_ft.callbacks.prompt import PANDA
from lit_ft.callbacks.prompt import IAPT
from lit_ft.callbacks.prompt import PrefixTuning
from lit_ft.callbacks.prompt import ProMoT
from lit_ft.callbacks.prompt import PromptTuning
from lit_ft.callbacks.prompt import PTEC
from lit_ft.callbacks.token_selection import ExcessLossSelection
from lit_ft.callbacks.token_selection import KeyTokenWeighting
from lit_ft.callbacks.token_selection import MaskedThought
from lit_ft.callbacks.token_selection import QTuning
from lit_ft.callbacks.token_selection import SSToken
from lit_ft.callbacks.token_selection import TokenElimination
from lit_ft.callbacks.tensor_selection import FreezeLayers
from lit_ft.callbacks.tensor_selection import GreenTrainer
from lit_ft.callbacks.tensor_selection import LayerwiseLRDecay
from lit_ft.callbacks.tensor_selection import LocalizedTuning
from lit_ft.callbacks.tensor_selection import TrainOnly
# a utility (memory / time, not a paper technique): importable as lit_ft.callbacks.FusedLoss, not registered, so
# not in __all__ (which lists the registered techniques)
from lit_ft.callbacks.fused_loss import FusedLoss  # noqa: F401
from lit_ft.callbacks.learning_rate import ConfiguredLearningRate  # noqa: F401  (resume with this run's lr)

from lit_ft.core.registry import REGISTRY as _REGISTRY

# class names in case-insensitive order (the order `lit-ft fit --help` lists them)
__all__ = sorted((record.cls.__name__ for record in _REGISTRY.records()), key=str.lower)
# callbacks that are not paper techniques (the CLI's help lists them after the techniques)
UTILITIES = ("FusedLoss", "ConfiguredLearningRate")


def techniques() -> list:
    """Every registered technique (:class:`lit_ft.core.registry.TechniqueRecord`), sorted by family then name; also
    ``lit_ft.techniques()``."""
    return _REGISTRY.records()
