"""Prompt techniques: soft prompts, prefixes and their descendants (``docs/architecture.md``, "Prompts")."""

# a LightningModule (it trains no weight: its parameters are the discrete prompt distributions), exported here
# with the prompt family
from lit_ft.modules.black_box_prompt import BlackBoxPromptLearning
from lit_ft.callbacks.prompt.cpt import CPT
from lit_ft.callbacks.prompt.dept import DePT
from lit_ft.callbacks.prompt.ept import EPT
from lit_ft.callbacks.prompt.panda import PANDA
from lit_ft.callbacks.prompt.iapt import IAPT
from lit_ft.callbacks.prompt.prefix_tuning import PrefixTuning
from lit_ft.callbacks.prompt.promot import ProMoT
from lit_ft.callbacks.prompt.prompt_tuning import PromptTuning
from lit_ft.callbacks.prompt.ptec import PTEC

__all__ = ["BlackBoxPromptLearning", "CPT", "DePT", "EPT", "IAPT", "PANDA", "PrefixTuning", "ProMoT", "PromptTuning", "PTEC"]
