"""A torch norm that accepts sequence parallelism: the CPU runtime's ``layer_norm()``.

Replaces ``WrappedTorchNorm``, Megatron's fallback norm when neither apex nor TE is installed
(always the case on CPU), which refuses sequence parallelism. Same ``torch.nn.RMSNorm`` /
``LayerNorm`` math; it marks its weights ``sequence_parallel`` so Megatron's
``finalize_model_grads`` all-reduces their gradients over the TP group.
"""

from __future__ import annotations

from typing import Optional

import torch


class TorchNorm:
    """``torch.nn.RMSNorm`` or ``LayerNorm`` (per ``config.normalization``), usable under
    sequence parallelism; replaces ``WrappedTorchNorm``. Constructor as Megatron's norms.

    Under SP each TP rank normalises its own slice of the sequence with the same (replicated)
    weights, so each rank's weight gradient is a partial sum: Megatron all-reduces the
    gradients of parameters that carry ``sequence_parallel=True`` over TP, which we set.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: Optional[str] = None):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("TorchNorm does not implement zero-centred gamma; "
                             "set layernorm_zero_centered_gamma=False")
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"TorchNorm supports {sorted(norms)}, got {config.normalization!r}")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        norm = norms[config.normalization](hidden_size, eps=eps, device=device,
                                           dtype=config.params_dtype)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
