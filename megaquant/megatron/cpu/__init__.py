"""The CPU runtime: the few pieces that let Megatron-Core run on CPU with gloo.

Megatron-Core assumes CUDA in a handful of places. On a machine without a GPU
(``torch.cuda.is_available()`` is false) megaquant swaps in the pieces below, so that the same
GPTModel, the same tensor-parallel linears and the same recipes run on CPU processes that talk
over gloo. On a GPU nothing here is used: ``init_model_parallel`` seeds Megatron's CUDA tracker
and the spec keeps the backend's own core attention.

One concept per module; each docstring says what it replaces and why:

* :mod:`.spec`      ``CPUSpecProvider``: Megatron's ``BackendSpecProvider`` extension point;
                    wraps any provider, answers core attention, norm and MoE pieces (below).
* :mod:`.attention` ``SDPAttention`` in place of ``DotProductAttention`` (a spec choice).
* :mod:`.norm`      ``TorchNorm`` in place of ``WrappedTorchNorm`` (a spec choice).
* :mod:`.moe`       ``CPUTopKRouter``, ``CPUMoELayer`` + ``CPUAlltoAllTokenDispatcher`` (spec
                    choices; Megatron names swapped only while a constructor/method runs).
* :mod:`.rng`       ``CPURNGStatesTracker``, ``cpu_model_parallel_manual_seed`` (installed as
                    Megatron's tracker object; no function patched).
* :mod:`.device`    the only patches of ``torch.cuda``: ``current_device`` (while the runtime
                    is on, or inside ``with cpu_runtime():``) and ``synchronize`` (while a
                    checkpoint is saved or loaded).
"""
