"""Parameter reset techniques: phases that reset parameters to earlier values (LT-SFT, HFT...)."""

from lit_ft.callbacks.param_reset.half_fine_tuning import HalfFineTuning

__all__ = ["HalfFineTuning"]
