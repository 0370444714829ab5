"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for HF causal LMs under Lightning's ``ModelParallelStrategy``.

Lightning's ``FSDPStrategy`` wraps the model itself (and refuses CPU); ``ModelParallelStrategy`` leaves the
sharding to the module's ``configure_model`` hook, where :func:`shard_causal_lm` applies ``fully_shard`` to every
decoder layer (one all-gather / reduce-scatter unit each) and then to the whole HF model (the root unit: embeddings,
final norm, lm_head, tied or not).

One consequence matters to lit-ft's loss path: FSDP2 unshards a unit's parameters in a pre-forward hook on that
unit's ``forward``. The root unit's parameters (embeddings, lm_head) are therefore only usable inside a call of the
HF model's own ``forward`` — calling the trunk directly (what the fused loss does to avoid the ``[N, V]`` logits)
would meet sharded embeddings. :func:`is_fsdp_root` tells the loss path to go through the root forward instead
(with ``logits_to_keep=1`` and a trunk hook that captures the hidden states). The root is not resharded after its
forward, so the lm_head weight stays unsharded for the fused op; its gradient is reduce-scattered by FSDP's
end-of-backward callback like every other parameter's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_ft.core.introspect import find_decoder_layers

__all__ = ["fsdp_available", "is_fsdp_root", "is_fsdp_managed", "model_parallel_mesh", "shard_causal_lm"]


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:  # torch < 2.6 has it under torch.distributed._composable.fsdp
        return False
    return True


def is_fsdp_managed(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (``fully_shard`` was applied to it)."""
    if not fsdp_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_fsdp_root(hf_model: nn.Module) -> bool:
    """Whether ``hf_model`` itself was sharded by :func:`shard_causal_lm` (its root parameters are then only
    unsharded during its own ``forward``)."""
    return is_fsdp_managed(hf_model)


def model_parallel_mesh(trainer: Any) -> Any | None:
    """The data-parallel device mesh when ``trainer`` runs Lightning's ``ModelParallelStrategy``, else ``None``."""
    if trainer is None:
        return None
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:
        return None
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
        raise NotImplementedError(
            "lit_ft: ModelParallelStrategy with tensor_parallel_size > 1 is not supported (only FSDP2 data "
            f"parallelism is: data_parallel_size={mesh['data_parallel'].size()}, "
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}); use tensor_parallel_size=1"
        )
    return mesh["data_parallel"]


def shard_causal_lm(hf_model: nn.Module, mesh: Any, *, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every decoder layer of ``hf_model``, then ``hf_model`` itself (the root unit); idempotent.

    Args:
        hf_model: a HF causal LM (PEFT-wrapped models: pass the wrapper's base model).
        mesh: the data-parallel ``DeviceMesh`` (:func:`model_parallel_mesh`).
        reshard_after_forward: passed to the decoder layers' ``fully_shard`` (the root is never resharded after
            forward, so the lm_head stays unsharded for the loss).
    """
    if not fsdp_available():
        raise RuntimeError("lit_ft: FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)")
    from torch.distributed.fsdp import fully_shard

    if is_fsdp_managed(hf_model):
        return hf_model
    for layer in find_decoder_layers(hf_model):
        if not is_fsdp_managed(layer):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(hf_model, mesh=mesh)
    return hf_model
