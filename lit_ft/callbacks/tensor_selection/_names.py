"""Compatibility shim: the name-mapping helpers live in :mod:`lit_ft.core.introspect` (``param_names_by_id``,
``module_param_names``) and the selection-plan builder in :mod:`lit_ft.callbacks._param_plan` (``selection_plan``).
Import them from there."""

from lit_ft.callbacks._param_plan import selection_plan
from lit_ft.core.introspect import module_param_names, param_names_by_id

__all__ = ["module_param_names", "param_names_by_id", "selection_plan"]
