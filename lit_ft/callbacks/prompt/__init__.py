"""Prompt techniques: soft prompts, prefixes and their descendants (``docs/architecture.md``, "Prompts")."""

from lit_ft.callbacks.prompt.cpt import CPT
from lit_ft.callbacks.prompt.dept import DePT
from lit_ft.callbacks.prompt.ept import EPT
from lit_ft.callbacks.prompt.panda import PANDA
from lit_ft.callbacks.prompt.iapt import IAPT
from lit_ft.callbacks.prompt.prefix_tuning import PrefixTuning
from lit_ft.callbacks.prompt.promot import ProMoT
from lit_ft.callbacks.prompt.prompt_tuning import PromptTuning
from lit_ft.callbacks.prompt.ptec import PTEC

__all__ = ["CPT", "DePT", "EPT", "IAPT", "PANDA", "PrefixTuning", "ProMoT", "PromptTuning", "PTEC"]
