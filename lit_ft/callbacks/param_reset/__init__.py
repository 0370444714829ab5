"""Parameter reset techniques: phases that reset parameters to earlier values (LT-SFT, HFT...)."""

from lit_ft.callbacks.param_reset.half_fine_tuning import HalfFineTuning
from lit_ft.callbacks.param_reset.lottery_ticket import LotteryTicketSparseFT
from lit_ft.callbacks.param_reset.reinit_top_layers import ReinitTopLayers
from lit_ft.core.sparse_diff import compose_sparse_diffs, export_sparse_diff, load_sparse_diff

__all__ = ["HalfFineTuning", "LotteryTicketSparseFT", "ReinitTopLayers", "compose_sparse_diffs", "export_sparse_diff", "load_sparse_diff"]
