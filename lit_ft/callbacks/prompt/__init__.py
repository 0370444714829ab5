"""Prompt techniques: soft prompts, prefixes and their descendants (DESIGN.md §4 "Prompts")."""

from lit_ft.callbacks.prompt.prefix_tuning import PrefixTuning
from lit_ft.callbacks.prompt.prompt_tuning import PromptTuning

__all__ = ["PrefixTuning", "PromptTuning"]
