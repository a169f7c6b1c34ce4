"""Shard a TP=1 Megatron state dict into a tensor-parallel model by hand (the test reference).

Independent of Megatron's own checkpoint resharding: contiguous chunks along the dimension that
differs in size, and SwiGLU's fc1 split as [gate_r; up_r] as Megatron lays it out.
"""

import torch


def shard_state_dict(model, full_state, tp_rank: int, tp: int) -> None:
    """Copy ``full_state`` (TP=1 names and shapes) into ``model``'s TP shards, in place."""
    own = model.state_dict()
    for name, shard in own.items():
        if not isinstance(shard, torch.Tensor) or name.endswith("_extra_state") or name not in full_state:
            continue
        full = full_state[name]
        if full.shape == shard.shape:
            shard.copy_(full)
            continue
        dim = next(d for d in range(full.dim()) if full.shape[d] == tp * shard.shape[d])
        if "linear_fc1" in name:
            gate, up = full.chunk(2, dim=dim)
            shard.copy_(torch.cat([gate.chunk(tp, dim)[tp_rank], up.chunk(tp, dim)[tp_rank]], dim))
        else:
            shard.copy_(full.chunk(tp, dim=dim)[tp_rank])
