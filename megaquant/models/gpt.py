"""Decoder-only GPT models (Llama / SmolLM2 family) built with Megatron-Core.

Three pieces:

* ``GPTConfig`` -- the architecture as a small typed dataclass (what a HF ``config.json``
  says), checked on construction, with ``to_transformer_config(tp_size)`` producing Megatron's
  ``TransformerConfig``.
* ``gpt_layer_spec(backend)`` -- a ``TransformerLayer`` ``ModuleSpec`` whose linears, norms and
  core attention all come from a ``BackendSpecProvider``. Quantization plugs in here: a provider
  whose ``column_parallel_linear()`` returns a quantized ``ColumnParallelLinear`` subclass changes
  every projection of the model without touching this file.
* ``build_gpt_model(cfg, backend)`` -- the ``GPTModel`` (RoPE, untied or tied embeddings).

Mixture of experts: ``GPTConfig(num_moe_experts=E, ...)`` makes every layer's MLP a Megatron
``MoELayer`` (top-k router, ``SequentialMLP`` local experts built from the same backend linears,
optional shared experts, allgather or alltoall token dispatch); see ``mlp_spec`` and docs/moe.md.

On a machine without CUDA the backend is wrapped in ``megaquant.megatron.cpu.CPUSpecProvider``
(SDPA core attention, an SP-capable norm, CPU MoE pieces: Megatron's ``DotProductAttention`` is
CUDA-only) and weights are initialised on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megaquant.megatron.cpu.device import enable_cpu_runtime
from megaquant.megatron.cpu.norm import TorchNorm
from megaquant.megatron.cpu.pipeline import cpu_tied_embedding_stand_in
from megaquant.megatron.cpu.spec import CPUSpecProvider, for_this_machine

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NORMS = ("RMSNorm", "LayerNorm")
_DISPATCHERS = ("allgather", "alltoall")


@dataclass
class GPTConfig:
    """Architecture of a decoder-only transformer with RoPE.

    ``num_query_groups`` is the number of KV heads (GQA; equal to ``num_attention_heads`` for
    plain multi-head attention). ``gated_linear_unit=True`` means SwiGLU (silu-gated MLP, the
    fc1 weight holds gate and up projections). ``params_dtype`` is a name ("float32",
    "bfloat16", "float16"); ``name`` only labels error messages.

    MoE (all off when ``num_moe_experts`` is None): ``moe_router_topk`` experts per token,
    ``moe_ffn_hidden_size`` per expert (default ``ffn_hidden_size``), ``moe_token_dispatcher``
    "allgather" or "alltoall", ``moe_shared_expert_intermediate_size`` for an always-on shared
    expert. Routing has no auxiliary loss (PTQ never trains the router).
    ``moe_router_pre_softmax`` takes the softmax over all experts before the top-k without
    renormalising (Qwen3-MoE with ``norm_topk_prob: false``); the default is the softmax over
    the k chosen logits (Mixtral; ``norm_topk_prob: true``). ``moe_shared_expert_gate`` scales
    the shared expert by ``sigmoid(x @ gate_weight)`` (Qwen2-MoE's ``shared_expert_gate``).

    Hugging Face families (see :mod:`megaquant.models.hf_config`): ``kv_channels`` is the head
    dimension when it is not ``hidden_size / num_attention_heads`` (Qwen3); ``add_qkv_bias``
    gives q/k/v biases (Qwen2); ``qk_layernorm`` an RMSNorm over each query and key head
    (Qwen3); ``rope_scaling`` a dict of :class:`megaquant.models.rope.RopeScaling` fields
    (Llama-3.1); ``max_position_embeddings`` bounds ``seq_length``; ``hf_family`` is the HF
    ``model_type`` written back on export (None: llama, or qwen2_moe for MoE).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    seq_length: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    tie_embeddings: bool = False
    params_dtype: str = "float32"
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_token_dispatcher: str = "allgather"
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_pre_softmax: bool = False
    moe_shared_expert_gate: bool = False
    kv_channels: Optional[int] = None
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    rope_scaling: Optional[dict] = None
    max_position_embeddings: Optional[int] = None
    hf_family: Optional[str] = None
    name: str = "model"

    def __post_init__(self) -> None:
        if self.normalization not in _NORMS:
            raise ValueError(f"normalization must be one of {_NORMS}, got {self.normalization!r}")
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params_dtype must be one of {sorted(_DTYPES)}, "
                             f"got {self.params_dtype!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple "
                             f"of num_query_groups {self.num_query_groups}")
        if self.num_moe_experts is not None:
            self._check_moe()
        if (self.max_position_embeddings is not None
                and self.seq_length > self.max_position_embeddings):
            raise ValueError(f"{self.name}: model.seq_length={self.seq_length} exceeds the model's "
                             f"max_position_embeddings={self.max_position_embeddings} "
                             f"(config.json); positions beyond it were never trained. "
                             f"Set model.seq_length <= "
                             f"{self.max_position_embeddings}")
        if self.rope_scaling is not None:
            from megaquant.models.rope import RopeScaling

            RopeScaling.from_dict(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def _check_moe(self) -> None:
        if self.num_moe_experts < 1:
            raise ValueError(f"num_moe_experts must be >= 1 (or null for a dense model), "
                             f"got {self.num_moe_experts}")
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ValueError(f"moe_router_topk must be in 1..num_moe_experts "
                             f"({self.num_moe_experts}), got {self.moe_router_topk}")
        if self.moe_shared_expert_gate and not self.moe_shared_expert_intermediate_size:
            raise ValueError("moe_shared_expert_gate needs a shared expert "
                             "(moe_shared_expert_intermediate_size)")
        if self.moe_token_dispatcher not in _DISPATCHERS:
            raise ValueError(f"moe_token_dispatcher must be one of {_DISPATCHERS}, "
                             f"got {self.moe_token_dispatcher!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def check_expert_parallel(self, ep_size: int) -> None:
        """Expert parallelism splits the experts: it must divide their number."""
        if ep_size == 1:
            return
        if not self.is_moe:
            raise ValueError(f"{self.name} is dense: expert parallel must be 1, got {ep_size}")
        if self.num_moe_experts % ep_size:
            valid = [e for e in range(1, self.num_moe_experts + 1) if self.num_moe_experts % e == 0]
            raise ValueError(f"{self.name} has {self.num_moe_experts} experts: expert parallel "
                             f"must be one of {valid}, got {ep_size}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GPTConfig":
        """Build from a plain dict, refusing keys this config does not have."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; valid keys: {valid}")
        return cls(**values)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """TP splits attention heads, KV groups and the vocabulary: it must divide all three."""
        heads, groups = self.num_attention_heads, self.num_query_groups
        if heads % tp_size or groups % tp_size:
            valid = [t for t in range(1, math.gcd(heads, groups) + 1)
                     if heads % t == 0 and groups % t == 0]
            raise ValueError(
                f"{self.name} has {heads} heads and {groups} KV groups: tensor parallel must be "
                f"{' or '.join(map(str, valid))}, got {tp_size}")
        if self.vocab_size % tp_size:
            raise ValueError(f"{self.name} vocab_size {self.vocab_size} is not divisible by "
                             f"tensor parallel {tp_size}; pad the vocabulary to a multiple of it")

    def moe_transformer_kwargs(self, ep_size: int) -> dict[str, Any]:
        """The ``TransformerConfig`` fields of the MoE part (empty for a dense model)."""
        self.check_expert_parallel(ep_size)
        if not self.is_moe:
            return {}
        return dict(
            num_moe_experts=self.num_moe_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size or self.ffn_hidden_size,
            moe_token_dispatcher_type=self.moe_token_dispatcher,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_shared_expert_gate=self.moe_shared_expert_gate,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            expert_model_parallel_size=ep_size,
        )

    def to_transformer_config(self, tp_size: int, *, sequence_parallel: bool = False,
                              ep_size: int = 1, **overrides: Any) -> TransformerConfig:
        """Megatron ``TransformerConfig`` for this architecture at tensor parallel ``tp_size``.

        CUDA-only fusions are off on CPU; ``overrides`` are passed to ``TransformerConfig``
        last. An MoE model with ``tp_size > 1`` always runs with sequence parallelism (Megatron
        requires it for MoE under TP).
        """
        self.check_tensor_parallel(tp_size)
        on_gpu = torch.cuda.is_available()
        dtype = _DTYPES[self.params_dtype]
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=self.gated_linear_unit,
            activation_func=F.silu if self.gated_linear_unit else F.gelu,
            add_bias_linear=self.add_bias_linear,
            init_method_std=self.init_method_std,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            tensor_model_parallel_size=tp_size,
            sequence_parallel=(sequence_parallel or self.is_moe) and tp_size > 1,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=not on_gpu,
            # Fused kernels need CUDA (and apex/TE); the unfused paths give the same math.
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
        )
        kwargs.update(self.moe_transformer_kwargs(ep_size))
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


def tiny_gpt_config(**changes: Any) -> GPTConfig:
    """A 2-layer toy (hidden 64, 4 heads, 2 KV groups, SwiGLU ffn 128, vocab 256) for tests."""
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, seq_length=32, name="tiny-gpt")
    base.update(changes)
    return GPTConfig.from_dict(base)


def tiny_moe_config(**changes: Any) -> GPTConfig:
    """``tiny_gpt_config`` with 4 experts (top-2, expert ffn 64) in every layer, for tests."""
    base = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64, name="tiny-moe")
    base.update(changes)
    return tiny_gpt_config(**base)


def backend_norm(backend: BackendSpecProvider, normalization: str) -> type:
    """The backend's norm, except Megatron's torch fallback (no apex/TE, e.g. on CPU), which
    refuses sequence parallelism: ``TorchNorm`` is the same math and allows it (on GPU too)."""
    if normalization not in _NORMS:
        raise ValueError(f"normalization must be one of {_NORMS}, got {normalization!r}")
    norm = backend.layer_norm(rms_norm=normalization == "RMSNorm", for_qk=False)
    return TorchNorm if norm is WrappedTorchNorm else norm


def mlp_spec(backend: BackendSpecProvider, num_experts: Optional[int] = None, *,
             shared_experts: bool = False) -> ModuleSpec:
    """The MLP of a layer: a dense ``MLP``, or an ``MoELayer`` when ``num_experts`` is set.

    MoE: a top-k router, ``SequentialMLP`` local experts (each an ``MLP`` whose linears are the
    backend's column/row-parallel linears, built with ``is_expert=True`` on the expert-TP
    group) and, with ``shared_experts``, a ``SharedExpertMLP`` on the same linears (quantized
    like a dense MLP). Under the CPU runtime the router and the MoE layer are the CPU twins
    the ``CPUSpecProvider`` names (same math; see ``megaquant.megatron.cpu.moe``).
    """
    dense = MLPSubmodules(linear_fc1=backend.column_parallel_linear(),
                          linear_fc2=backend.row_parallel_linear())
    if num_experts is None:
        return ModuleSpec(module=MLP, submodules=dense)
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    layer, router = MoELayer, TopKRouter
    if isinstance(backend, CPUSpecProvider):  # Megatron's providers have no MoE questions
        layer, router = backend.moe_layer(), backend.moe_router()
    experts = ModuleSpec(module=SequentialMLP, submodules=dense)
    shared = ModuleSpec(module=SharedExpertMLP, submodules=dense) if shared_experts else None
    return ModuleSpec(module=layer, submodules=MoESubmodules(experts=experts,
                                                             shared_experts=shared, router=router))


def gpt_layer_spec(backend: BackendSpecProvider, core_attention: Optional[type] = None, *,
                   normalization: str = "RMSNorm", num_experts: Optional[int] = None,
                   shared_experts: bool = False, qk_layernorm: bool = False) -> ModuleSpec:
    """A pre-norm ``TransformerLayer`` spec whose every submodule comes from ``backend``.

    ``core_attention`` overrides the attention kernel (default: the backend's). Without CUDA the
    backend is wrapped in the CPU runtime's ``CPUSpecProvider`` (SDPA attention, an SP-capable
    norm). Norms are separate modules (no fused layernorm-linear), so each linear is a plain
    column/row-parallel module a quantized provider can replace. ``qk_layernorm`` adds a norm
    over each query and key head (Qwen3), the same norm class over ``kv_channels``.
    """
    backend = for_this_machine(backend)
    norm = backend_norm(backend, normalization)
    qk_norm = norm if qk_layernorm else IdentityOp
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=core_attention or backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_spec(backend, num_experts, shared_experts=shared_experts),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as TE's fused layernorm-linear names them, like Megatron's own
            # local spec: checkpoints then load into either backend.
            # (An MoE layer's pre-MLP norm is never fused, so it keeps its own name.)
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                **({} if num_experts else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}),
            },
        ),
    )


def gpt_block_spec(cfg: GPTConfig, backend: BackendSpecProvider,
                   core_attention: Optional[type] = None,
                   num_layers: Optional[int] = None) -> TransformerBlockSubmodules:
    """All decoder layers (or a pipeline stage's ``num_layers``) plus the final norm, which
    must come from the same backend."""
    backend = for_this_machine(backend)
    layer = gpt_layer_spec(backend, core_attention, normalization=cfg.normalization,
                           num_experts=cfg.num_moe_experts,
                           shared_experts=cfg.moe_shared_expert_intermediate_size is not None,
                           qk_layernorm=cfg.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * (num_layers or cfg.num_layers),
                                      layer_norm=backend_norm(backend, cfg.normalization))


def build_gpt_model(cfg: GPTConfig, backend: Optional[BackendSpecProvider] = None, *,
                    pre_process: bool = True, post_process: bool = True,
                    tp_size: Optional[int] = None, sequence_parallel: bool = False,
                    pg_collection=None, core_attention: Optional[type] = None,
                    ep_size: Optional[int] = None, stage=None) -> GPTModel:
    """Build the ``GPTModel`` for ``cfg`` with linears from ``backend`` (default: Megatron local).

    ``stage`` (a ``megaquant.megatron.stages.StageLayout``) builds one pipeline stage: its
    layers only, the embedding on the first stage, norm/output/loss on the last (it overrides
    ``pre_process``/``post_process``). Megatron reads the stage's rank from its global
    pipeline group, which ``init_model_parallel`` set up.

    ``tp_size`` defaults to the size of ``pg_collection.tp`` or, when no collection is given,
    of Megatron's global TP group (set by ``megaquant.megatron.dist.init_model_parallel``);
    ``ep_size`` (MoE only) likewise from ``pg_collection.ep`` or the global EP group.
    """
    backend = backend or LocalSpecProvider()
    # Without CUDA, rotary embeddings and TP mappings allocate on torch.cuda.current_device():
    # make sure the CPU stand-in is on even if init_model_parallel was bypassed (idempotent;
    # does nothing on a GPU machine).
    enable_cpu_runtime()
    if tp_size is None:
        if pg_collection is not None:
            tp_size = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if ep_size is None:
        ep_size = _group_size(pg_collection, "ep") if cfg.is_moe else 1
    overrides = {}
    if stage is not None and stage.pp > 1:
        pre_process, post_process = stage.pre_process, stage.post_process
        overrides = _pipeline_overrides(cfg, stage)
    config = cfg.to_transformer_config(tp_size, sequence_parallel=sequence_parallel,
                                       ep_size=ep_size, **overrides)
    tied_stage = cfg.tie_embeddings and bool(overrides)
    with cpu_tied_embedding_stand_in() if tied_stage else contextlib.nullcontext():
        model = _gpt_model(cfg, config, gpt_block_spec(cfg, backend, core_attention,
                                                       stage.num_layers if stage else None),
                           pre_process, post_process, pg_collection)
    if stage is not None and model.decoder.layers[0].layer_number != stage.first_layer + 1:
        raise RuntimeError(f"Megatron numbers pipeline stage {stage.pp_rank}'s first layer "
                           f"{model.decoder.layers[0].layer_number}, megaquant expected "
                           f"{stage.first_layer + 1}")
    return model


def _pipeline_overrides(cfg: GPTConfig, stage) -> dict[str, Any]:
    """TransformerConfig fields of a pipeline stage (an uneven split as Megatron spells it)."""
    if sum(stage.sizes) != cfg.num_layers:
        raise ValueError(f"pipeline stages of {list(stage.sizes)} layers do not add up to the "
                         f"{cfg.num_layers} layers of {cfg.name}")
    out: dict[str, Any] = dict(pipeline_model_parallel_size=stage.pp,
                               pipeline_dtype=_DTYPES[cfg.params_dtype],
                               batch_p2p_comm=False)  # gloo has no coalesced p2p
    if len(set(stage.sizes)) > 1:
        out.update(num_layers_in_first_pipeline_stage=stage.sizes[0],
                   num_layers_in_last_pipeline_stage=stage.sizes[-1])
    return out


def _gpt_model(cfg, config, block_spec, pre_process, post_process, pg_collection):
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        pg_collection=pg_collection,
    )
    if cfg.rope_scaling is not None:
        install_rope_scaling(model, cfg)
    return model


def install_rope_scaling(model: GPTModel, cfg: GPTConfig) -> None:
    """Replace the rotary embedding's ``inv_freq`` by the scaled one (:mod:`megaquant.models.rope`).

    Megatron's ``RotaryEmbedding`` computes angles as ``outer(positions, inv_freq)`` at each
    forward (cached per length after the first), so changing ``inv_freq`` before the first
    forward changes exactly the frequencies and nothing else.
    """
    from megaquant.models.rope import RopeScaling, rope_inv_freq

    rope = model.rotary_pos_emb
    rope.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rotary_base,
                                  RopeScaling.from_dict(cfg.rope_scaling),
                                  device=rope.inv_freq.device)
    rope.forward.cache_clear()


def _group_size(pg_collection, name: str) -> int:
    """Size of ``pg_collection.<name>`` or, without a collection, of Megatron's global group."""
    if pg_collection is not None:
        return getattr(pg_collection, name).size()
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size,
            "ep": parallel_state.get_expert_model_parallel_world_size}[name]()
