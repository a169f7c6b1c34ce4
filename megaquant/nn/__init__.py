"""Quantized layers: local Megatron linears (:mod:`.local`) and TE linears (:mod:`.te_layers`).

Registration for in-place conversion happens in :func:`megaquant.convert.register_builtins`.
"""
