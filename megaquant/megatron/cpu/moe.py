"""The CPU runtime: the few pieces that let Megatron-Core run on CPU with gloo.

Megatron-Core 0.16 assumes CUDA in a handful of places. On a machine without a GPU
(``torch.cuda.is_available()`` is false) megaquant swaps in the pieces below, so that the same
GPTModel, the same tensor-parallel linears and the same recipes run on CPU processes that talk
over gloo. On a GPU nothing here is used: ``init_model_parallel`` seeds Megatron's CUDA tracker
and ``gpt_layer_spec`` keeps the backend's own core attention.

What each piece replaces, and why:

``SDPAttention`` (a spec choice, no patch)
    replaces ``DotProductAttention``, which takes its score buffer from
    ``GlobalMemoryBuffer`` on ``torch.cuda.current_device()``, builds its causal mask with
    ``get_default_causal_mask(device="cuda")`` and forks the CUDA RNG tracker for dropout.
    Ours calls ``torch.nn.functional.scaled_dot_product_attention`` on whatever device the
    inputs live.

``TorchNorm`` (a spec choice, no patch)
    replaces ``WrappedTorchNorm``, Megatron's fallback norm when neither apex nor TE is
    installed (always the case on CPU), which refuses sequence parallelism. Same
    ``torch.nn.RMSNorm`` / ``LayerNorm`` math; it marks its weights ``sequence_parallel`` so
    Megatron's ``finalize_model_grads`` all-reduces their gradients over the TP group.

``CPURNGStatesTracker`` (installed as Megatron's tracker object, no function patched)
    replaces ``CudaRNGStatesTracker``, which stores ``torch.cuda`` generator states. Megatron
    forks "the model-parallel RNG" for dropout inside TP regions (attention dropout, the
    embedding dropout under sequence parallelism); ours keeps CPU generator states so those
    forks work. ``cpu_model_parallel_manual_seed`` replaces ``model_parallel_cuda_manual_seed``
    with the same seed offsets.

``enable_cpu_runtime()`` (the one explicit patch, idempotent, undone by ``disable_cpu_runtime``)
    ``torch.cuda.current_device`` -> returns ``torch.device("cpu")``. Only installed when CUDA
    is unavailable, where the original raises "Torch not compiled with CUDA enabled" anyway.
    Megatron allocates with ``device=torch.cuda.current_device()`` in places a spec cannot
    reach: ``RotaryEmbedding.get_emb`` moves ``inv_freq`` there on first use;
    ``tensor_parallel/mappings.py`` allocates all-gather / reduce-scatter outputs there
    (sequence parallelism); ``dist_checkpointing`` all-reduces a failure flag there. A single
    stand-in covers all of them and any new such call in later releases; patching each
    Megatron function instead would mean copying their bodies.

``cpu_checkpoint_stand_ins()`` (a context manager, restored on every exit path)
    ``torch.cuda.synchronize`` -> no-op, for ``dist_checkpointing``'s
    ``filesystem_async.preload_tensors``; only while a save/load runs, only without CUDA.

Mixture of experts (spec choices made by ``megaquant.models.gpt.mlp_spec`` without CUDA):

``CPUTopKRouter``
    replaces ``TopKRouter.gating``, which moves the router weight to
    ``torch.cuda.current_device()`` and, without TE, fails on ``te_general_gemm``: a plain
    ``F.linear`` in the router dtype. Routing itself is Megatron's.
``CPUMoELayer`` + ``CPUAlltoAllTokenDispatcher``
    the alltoall dispatcher creates a ``torch.cuda.Stream()`` when built, keeps split sizes as
    tensors that gloo's ``all_to_all_single`` refuses, and over expert-TP moves an uneven
    number of tokens per rank: an uneven all-gather in ``dispatch_postprocess`` and, in the
    backward of ``combine_preprocess``'s uneven reduce-scatter, another one. gloo has no
    uneven all_gather; both are one ``all_to_all_single`` (``_UnevenAllGather``,
    ``_UnevenReduceScatter``). The only patches are Megatron names swapped inside context
    managers while a constructor, ``dispatch_postprocess`` or ``combine_preprocess`` runs.
    The allgather dispatcher needs nothing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings as mcore_mappings
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe import moe_layer as mcore_moe_layer
from megatron.core.transformer.moe import token_dispatcher as mcore_dispatch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.module import MegatronModule

# --------------------------------------------------------------------------------------------
# Core attention
# --------------------------------------------------------------------------------------------


class SDPAttention(MegatronModule):
    """Core attention on ``F.scaled_dot_product_attention``; replaces ``DotProductAttention``.

    Same constructor keywords as Megatron's ``DotProductAttention`` so a spec can name either.
    ``forward`` takes q/k/v as ``[s, b, heads, head_dim]`` (heads of this TP rank; K/V may have
    fewer heads, the GQA query groups) and returns ``[s, b, heads * head_dim]``.

    Masks follow Megatron's convention: ``attention_mask`` is boolean with True = *masked out*
    (SDPA's boolean mask means the opposite, so we invert it). A causal mask type adds the
    causal mask; when there are more keys than queries (decoding with a KV cache) it is aligned
    to the bottom-right, so the last query sees every key.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused_kwargs,
    ):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("SDPAttention does not implement context parallelism; set "
                             "parallel.cp=1 or run on GPU with TE attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        # Megatron's query-key layer scaling divides the scores by layer_number and multiplies
        # them back inside the softmax: a no-op in exact arithmetic, so we ignore it.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences (THD); "
                             "use unpacked [s, b] batches")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, nq, d = query.shape
        nkv = key.shape[2]
        if nq % nkv != 0:
            raise ValueError(f"query heads {nq} are not a multiple of key/value heads {nkv}")
        # GQA: query heads of one group are contiguous in Megatron's QKV layout.
        key = key.repeat_interleave(nq // nkv, dim=2)
        value = value.repeat_interleave(nq // nkv, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        mask = self._sdpa_mask(attention_mask, mask_type, sq, k.shape[2], q.device)
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        dropout_p = self.dropout_p if self.training else 0.0
        # Dropout inside a TP region draws from the model-parallel RNG (different per TP rank).
        rng = mcore_random.get_cuda_rng_tracker().fork if dropout_p > 0 else contextlib.nullcontext
        with rng():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * d)

    @staticmethod
    def _sdpa_mask(attention_mask, mask_type, sq: int, skv: int, device) -> Optional[torch.Tensor]:
        """Combine the causal mask and Megatron's mask into SDPA's "True = attend" form."""
        keep = None
        if mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            keep = torch.ones(sq, skv, dtype=torch.bool, device=device).tril(skv - sq)
        if attention_mask is not None:
            passed = ~attention_mask.to(torch.bool)
            keep = passed if keep is None else keep & passed
        return keep


# --------------------------------------------------------------------------------------------
# Norm
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Named RNG streams on the CPU generator; replaces Megatron's ``CudaRNGStatesTracker``.

    ``fork(name)`` swaps the process's CPU generator state for the named stream, runs the
    block, saves the advanced stream and restores the caller's state, so dropout under TP
    differs between TP ranks without disturbing the default (replicated) stream.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already used by another RNG stream")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was never added; call "
                           "cpu_model_parallel_manual_seed() (init_model_parallel does)")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker() -> CPURNGStatesTracker:
    """Make ``tensor_parallel.get_cuda_rng_tracker()`` return a CPU tracker (idempotent)."""
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CPURNGStatesTracker):
        tracker = CPURNGStatesTracker()
        # Megatron keeps its tracker in these two module globals; get_cuda_rng_tracker()
        # returns the object as long as the "initialized" flag is set.
        mcore_random._CUDA_RNG_STATE_TRACKER = tracker
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def cpu_model_parallel_manual_seed(seed: int, *, tp_rank: int, ep_rank: int = 0,
                                   etp_rank: int = 0) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed`` (same stream names and seed offsets).

    The default generator gets ``seed`` on every rank: CPU-initialised weights are drawn whole
    and then split, so all TP ranks must draw the same numbers.
    """
    torch.manual_seed(seed)
    tracker = install_cpu_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ep_rank + etp_rank)


# --------------------------------------------------------------------------------------------
# The explicit patches
# --------------------------------------------------------------------------------------------

_ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device`` on a machine without CUDA."""
    return torch.device("cpu")


def cpu_runtime_enabled() -> bool:
    return torch.cuda.current_device is _cpu_current_device


def enable_cpu_runtime() -> bool:
    """Turn on the CPU runtime (idempotent); returns False, doing nothing, when CUDA exists.

    Patches (all listed here; see the module docstring for why):
      * ``torch.cuda.current_device`` -> ``torch.device("cpu")``.
    Installs ``CPURNGStatesTracker`` as Megatron's RNG tracker object.
    """
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = _cpu_current_device
    install_cpu_rng_tracker()
    return True


def disable_cpu_runtime() -> None:
    """Undo ``enable_cpu_runtime`` (for tests that must leave the process as they found it)."""
    torch.cuda.current_device = _ORIGINAL_CURRENT_DEVICE
    if isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = None
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


@contextlib.contextmanager
def cpu_checkpoint_stand_ins() -> Iterator[None]:
    """During a ``dist_checkpointing`` save/load on CPU: ``torch.cuda.synchronize`` is a no-op
    and ``torch.cuda.current_device`` is the CPU. Restored on every exit path; does nothing
    when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = _cpu_current_device
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


# --------------------------------------------------------------------------------------------
# Mixture of experts (see docs/moe.md)
# --------------------------------------------------------------------------------------------
#
# Measured on megatron-core 0.16.1 with gloo: the allgather token dispatcher runs on CPU as is;
# the router and the alltoall dispatcher need the classes below. They are spec choices
# (megaquant.models.gpt.mlp_spec picks them when CUDA is unavailable), not global patches.


class CPUTopKRouter(TopKRouter):
    """``TopKRouter`` whose gate is a plain ``F.linear``; same routing, same parameters.

    Megatron's ``gating`` moves the router weight to ``torch.cuda.current_device()`` and runs a
    custom autograd GEMM that, without TE, names ``te_general_gemm`` and fails. The router
    score is one small linear in ``moe_router_dtype`` (fp32/fp64 when set): we compute exactly
    that. Routers stay unquantized (recipes exclude ``*router*``).
    """

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


def _all_gather_uneven(input_: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``input_`` (rank r holds ``sizes[r]`` rows) along dim 0.

    gloo's ``all_gather`` wants equal shapes ("invalid tensor size"); ``all_to_all_single``
    takes per-rank split sizes. So each rank sends its whole input to every rank and receives
    ``sizes[r]`` rows from rank r: the all-gather, in one collective.
    """
    world = torch.distributed.get_world_size(group)
    n = input_.shape[0]
    out = input_.new_empty((sum(sizes), *input_.shape[1:]))
    send = torch.cat([input_.contiguous()] * world)
    torch.distributed.all_to_all_single(out, send, sizes, [n] * world, group=group)
    return out


class _UnevenAllGather(torch.autograd.Function):
    """All-gather along dim 0 with per-rank sizes, as one ``all_to_all_single`` (gloo has no
    uneven all_gather). Backward sends each rank the gradient of its own slice, summed."""

    @staticmethod
    def forward(ctx, input_, group, output_split_sizes):
        ctx.group, ctx.sizes, ctx.n = group, list(output_split_sizes), input_.shape[0]
        return _all_gather_uneven(input_, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        world = torch.distributed.get_world_size(ctx.group)
        got = grad.new_empty((ctx.n * world, *grad.shape[1:]))
        torch.distributed.all_to_all_single(got, grad.contiguous(), [ctx.n] * world, ctx.sizes,
                                            group=ctx.group)
        return got.view(world, ctx.n, *grad.shape[1:]).sum(0), None, None


def _gather_uneven_ok(original):
    """``gather_from_sequence_parallel_region`` that routes uneven gathers to ``_UnevenAllGather``."""

    def gather(input_, tensor_parallel_output_grad=True, group=None, output_split_sizes=None,
               use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return original(input_, tensor_parallel_output_grad, group, output_split_sizes,
                            use_global_buffer)
        return _UnevenAllGather.apply(input_, group, [int(s) for s in output_split_sizes])

    return gather


class _UnevenReduceScatter(torch.autograd.Function):
    """Reduce-scatter along dim 0 with per-rank sizes; its backward is the uneven all-gather.

    Forward: Megatron's own ``_reduce_scatter_along_first_dim`` (gloo's ``reduce_scatter``
    takes a list of unequal chunks, so the forward already works on CPU). Backward: rank r's
    output is the sum over ranks of rows ``sizes[r]`` of their inputs, so every rank's input
    gradient is the concatenation of all ranks' output gradients. Megatron computes that with
    an uneven ``all_gather``, which gloo refuses ("ProcessGroupGloo::allgather: invalid tensor
    size"); here it is ``_all_gather_uneven``, one ``all_to_all_single``.
    """

    @staticmethod
    def forward(ctx, input_, group, input_split_sizes):
        ctx.group, ctx.sizes = group, list(input_split_sizes)
        return mcore_mappings._reduce_scatter_along_first_dim(input_, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_uneven(grad, ctx.group, ctx.sizes), None, None


def _reduce_scatter_uneven_ok(original):
    """``reduce_scatter_to_sequence_parallel_region`` that routes uneven reduce-scatters to
    ``_UnevenReduceScatter``."""

    def reduce_scatter(input_, group=None, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        return _UnevenReduceScatter.apply(input_, group, [int(s) for s in input_split_sizes])

    return reduce_scatter


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


class CPUAlltoAllTokenDispatcher(mcore_dispatch.MoEAlltoAllTokenDispatcher):
    """The alltoall token dispatcher on CPU/gloo; same token order, same results.

    Three CUDA/NCCL assumptions of the parent, each handled here:

    * its constructor creates a class-wide ``torch.cuda.Stream()`` for device-to-host copies:
      we construct it with a placeholder in that class attribute (restored afterwards);
    * it keeps split sizes as tensors/NumPy arrays copied on that stream; gloo's
      ``all_to_all_single`` wants Python lists, so ``_maybe_dtoh_and_synchronize`` converts
      them (everything already lives on the CPU, no stream or event is needed);
    * with expert-TP > 1 it moves an uneven number of tokens per TP rank with collectives
      gloo cannot do unevenly: the all-gather of ``dispatch_postprocess`` goes through
      ``_UnevenAllGather``, and the reduce-scatter of ``combine_preprocess`` through
      ``_UnevenReduceScatter`` (same forward; its backward is an uneven all-gather). Each
      name is swapped only while that method runs.
    """

    def __init__(self, *args, **kwargs):
        base = mcore_dispatch.MoEAlltoAllTokenDispatcher
        with _patched(base, "cuda_dtoh_stream", base.cuda_dtoh_stream or object()):
            super().__init__(*args, **kwargs)

    @staticmethod
    def _as_list(value):
        return value.tolist() if hasattr(value, "tolist") else value

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            self.input_splits = self._as_list(self.input_splits)
            self.output_splits = self._as_list(self.output_splits)
            self.output_splits_tp = (None if self.output_splits_tp is None
                                     else torch.as_tensor(self.output_splits_tp))
            if torch.is_tensor(self.num_out_tokens):
                self.num_out_tokens = int(self.num_out_tokens)
        return tokens_per_expert

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        gather = _gather_uneven_ok(mcore_dispatch.gather_from_sequence_parallel_region)
        with _patched(mcore_dispatch, "gather_from_sequence_parallel_region", gather):
            return super().dispatch_postprocess(global_input_tokens, global_probs)

    def combine_preprocess(self, hidden_states):
        original = mcore_dispatch.reduce_scatter_to_sequence_parallel_region
        scatter = _reduce_scatter_uneven_ok(original)
        with _patched(mcore_dispatch, "reduce_scatter_to_sequence_parallel_region", scatter):
            return super().combine_preprocess(hidden_states)


class CPUMoELayer(mcore_moe_layer.MoELayer):
    """``MoELayer`` whose alltoall dispatcher is :class:`CPUAlltoAllTokenDispatcher`.

    ``MoELayer.__init__`` picks its dispatcher class by name from its own module; while it runs
    we point that name at the CPU dispatcher (restored on every exit path). The allgather
    dispatcher needs nothing and is left alone.
    """

    def __init__(self, *args, **kwargs):
        with _patched(mcore_moe_layer, "MoEAlltoAllTokenDispatcher", CPUAlltoAllTokenDispatcher):
            super().__init__(*args, **kwargs)
