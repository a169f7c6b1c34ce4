"""The Megatron contract: every megatron-core symbol megaquant relies on, checked per release.

megaquant uses Megatron's public API (ModuleSpec, GPTModel, the parallel linears) and a few
internals: the ``_forward_impl`` hook of the parallel linears, spec-provider methods it
overrides, the RNG tracker's module globals, the alltoall dispatcher's methods, checkpoint
internals. Each is listed in :data:`CONTRACT` with the parameters megaquant passes or
overrides. The list is read from a Megatron source tree with ``ast`` (never imported), so one
machine can check every release:

* ``tests/fixtures/megatron_api.json`` holds what each megatron-core release from 0.13 on
  declares for these symbols (``scripts/megatron_api.py`` writes it from the wheels);
  ``tests/megatron/test_megatron_contract.py`` checks :data:`SUPPORTED` against it, and that
  every megatron name megaquant's code references is listed here;
* ``megaquant doctor`` checks the installed megatron-core the same way.

A :class:`Use` names a dotted path (module, then class/function/attribute names). ``params``:
parameter names megaquant passes, which must be among the function's parameters (``self``
excluded; for a class, its ``__init__``'s, or for a dataclass its fields including inherited
ones). ``exact``: the parameters must be exactly these (a method megaquant *overrides* with this
signature, which Megatron calls: a new parameter there would be dropped silently).
``required=False``: recorded for later work, not needed by megaquant today.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# The pyproject range: the releases in tests/fixtures/megatron_api.json that satisfy the contract
# (0.16.0 and 0.16.1; 0.15.x lacks MoESubmodules.router, 0.14 and older much more). The upper
# bound is the next minor release, unread until it exists: add it to the fixture, then widen.
SUPPORTED = ">=0.16.0,<0.17"


@dataclass(frozen=True)
class Use:
    path: str
    params: Optional[tuple[str, ...]] = None
    exact: bool = False
    required: bool = True


_TP = "megatron.core.tensor_parallel"
_RNG = f"{_TP}.random"
_PS = "megatron.core.parallel_state"
_MOE = "megatron.core.transformer.moe"
_DISPATCH = f"{_MOE}.token_dispatcher"
_TE = "megatron.core.extensions.transformer_engine"
_BACKEND = "megatron.core.models.backends.BackendSpecProvider"
_P2P = "megatron.core.pipeline_parallel.p2p_communication"

CONTRACT: tuple[Use, ...] = (
    # --- the model: specs, layers, config (models/gpt.py)
    Use("megatron.core.transformer.spec_utils.ModuleSpec"),
    Use("megatron.core.models.gpt.GPTModel", ("config", "transformer_layer_spec", "vocab_size",
        "max_sequence_length", "pre_process", "post_process",
        "share_embeddings_and_output_weights", "position_embedding_type", "rotary_base",
        "pg_collection")),
    Use("megatron.core.transformer.transformer_config.TransformerConfig", (
        "tensor_model_parallel_size", "sequence_parallel", "use_cpu_initialization",
        "params_dtype", "fp16", "bf16", "gradient_accumulation_fusion", "num_layers",
        "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
        "kv_channels", "hidden_dropout", "attention_dropout", "layernorm_epsilon",
        "add_bias_linear", "gated_linear_unit", "activation_func", "init_method_std",
        "apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion",
        "persist_layer_norm", "bias_dropout_fusion", "normalization",
        "layernorm_zero_centered_gamma", "num_moe_experts", "moe_shared_expert_intermediate_size",
        "moe_ffn_hidden_size", "moe_router_load_balancing_type", "moe_router_topk",
        "moe_grouped_gemm", "moe_aux_loss_coeff", "moe_token_dispatcher_type",
        "moe_router_dtype", "pipeline_model_parallel_size", "pipeline_dtype", "batch_p2p_comm",
        "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")),
    Use("megatron.core.transformer.transformer_layer.TransformerLayer"),
    Use("megatron.core.transformer.transformer_layer.TransformerLayerSubmodules", (
        "input_layernorm", "self_attention", "self_attn_bda", "pre_mlp_layernorm", "mlp",
        "mlp_bda", "sharded_state_dict_keys_map")),
    Use("megatron.core.transformer.transformer_block.TransformerBlockSubmodules",
        ("layer_specs", "layer_norm")),
    Use("megatron.core.transformer.attention.SelfAttention"),
    Use("megatron.core.transformer.attention.SelfAttentionSubmodules",
        ("linear_qkv", "core_attention", "linear_proj", "q_layernorm", "k_layernorm")),
    Use("megatron.core.transformer.mlp.MLP"),
    Use("megatron.core.transformer.mlp.MLPSubmodules", ("linear_fc1", "linear_fc2")),
    Use("megatron.core.transformer.mlp.apply_swiglu_sharded_factory",
        ("original_sh_ten", "sharded_offsets")),
    Use("megatron.core.transformer.identity_op.IdentityOp"),
    Use("megatron.core.transformer.enums.AttnMaskType"),
    Use("megatron.core.transformer.enums.AttnMaskType.causal"),
    Use("megatron.core.transformer.enums.AttnMaskType.padding_causal"),
    Use("megatron.core.transformer.module.MegatronModule"),
    Use("megatron.core.transformer.torch_norm.WrappedTorchNorm"),
    Use("megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__",
        ("config", "hidden_size", "eps", "persist_layer_norm", "zero_centered_gamma",
         "normalization")),
    Use("megatron.core.fusions.fused_bias_dropout.get_bias_dropout_add"),
    Use("megatron.core.utils.make_tp_sharded_tensor_for_checkpoint",
        ("tensor", "key", "tp_axis")),
    # per-layer amax keys of mixed-precision recipes (nn/base.py)
    Use("megatron.core.utils.make_sharded_tensor_for_checkpoint",
        ("tensor", "key", "prepend_offsets")),
    # --- the quantized linears override _forward_impl (nn/local.py)
    Use(f"{_TP}.layers.ColumnParallelLinear"),
    Use(f"{_TP}.layers.ColumnParallelLinear._forward_impl", ("input", "weight")),
    Use(f"{_TP}.layers.RowParallelLinear"),
    Use(f"{_TP}.layers.RowParallelLinear._forward_impl", ("input", "weight")),
    # --- spec providers: megaquant's providers subclass or wrap these (spec.py, nn/te_spec.py,
    # megatron/cpu/spec.py)
    Use(_BACKEND),
    Use(f"{_BACKEND}.column_parallel_linear", (), exact=True),
    Use(f"{_BACKEND}.row_parallel_linear", (), exact=True),
    Use(f"{_BACKEND}.fuse_layernorm_and_linear", (), exact=True),
    Use(f"{_BACKEND}.column_parallel_layer_norm_linear", (), exact=True),
    Use(f"{_BACKEND}.layer_norm", ("rms_norm", "for_qk"), exact=True),
    Use(f"{_BACKEND}.core_attention", (), exact=True),
    Use(f"{_BACKEND}.grouped_mlp_modules",
        ("moe_use_grouped_gemm", "moe_use_legacy_grouped_gemm"), exact=True),
    Use(f"{_BACKEND}.activation_func", (), exact=True),
    Use("megatron.core.models.backends.LocalSpecProvider"),
    Use("megatron.core.extensions.transformer_engine_spec_provider.TESpecProvider"),
    Use("megatron.core.extensions.transformer_engine_spec_provider.TESpecProvider."
        "grouped_mlp_modules", ("moe_use_grouped_gemm", "moe_use_legacy_grouped_gemm"),
        exact=True),
    # --- TE layers megaquant subclasses (nn/te_layers.py); TE's own functions: te_signatures.json
    Use(f"{_TE}.HAVE_TE"),
    Use(f"{_TE}.TELinear"),
    Use(f"{_TE}.TEColumnParallelLinear"),
    Use(f"{_TE}.TERowParallelLinear"),
    Use(f"{_TE}.TELayerNormColumnParallelLinear"),
    Use(f"{_TE}.TEColumnParallelGroupedLinear"),
    Use(f"{_TE}.TERowParallelGroupedLinear"),
    Use(f"{_TE}.TEDotProductAttention"),  # subclassed with K/V quantizers (nn/te_layers.py)
    Use(f"{_TE}.TEDotProductAttention.forward", ("query", "key", "value", "attention_mask",
        "attn_mask_type", "attention_bias", "packed_seq_params")),  # K/V found by name
    # --- the CPU runtime's spec choices mirror these (megatron/cpu/)
    Use("megatron.core.transformer.dot_product_attention.DotProductAttention",
        ("config", "layer_number", "attn_mask_type", "attention_type", "attention_dropout",
         "softmax_scale")),
    Use("megatron.core.transformer.dot_product_attention.DotProductAttention.forward",
        ("query", "key", "value", "attention_mask", "attn_mask_type", "attention_bias",
         "packed_seq_params")),
    Use(f"{_MOE}.router.TopKRouter"),
    Use(f"{_MOE}.router.TopKRouter.gating", ("input",), exact=True),
    Use(f"{_MOE}.moe_layer"),
    Use(f"{_MOE}.moe_layer.MoELayer"),
    Use(f"{_MOE}.moe_layer.MoELayer.__init__", ("config", "submodules")),
    Use(f"{_MOE}.moe_layer.MoEAlltoAllTokenDispatcher"),
    Use(f"{_MOE}.moe_layer.MoESubmodules", ("experts", "shared_experts", "router")),
    Use(f"{_MOE}.experts.SequentialMLP"),
    Use(f"{_MOE}.experts.TEGroupedMLP"),
    Use(f"{_MOE}.shared_experts.SharedExpertMLP"),
    Use(_DISPATCH),
    Use(f"{_DISPATCH}.MoEAlltoAllTokenDispatcher"),
    Use(f"{_DISPATCH}.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream"),
    Use(f"{_DISPATCH}.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
        ("point", "tokens_per_expert"), exact=True),
    Use(f"{_DISPATCH}.MoEAlltoAllTokenDispatcher.dispatch_postprocess",
        ("global_input_tokens", "global_probs"), exact=True),
    Use(f"{_DISPATCH}.MoEAlltoAllTokenDispatcher.combine_preprocess", ("hidden_states",),
        exact=True),
    Use(f"{_DISPATCH}.gather_from_sequence_parallel_region", ("input_",
        "tensor_parallel_output_grad", "group", "output_split_sizes", "use_global_buffer"),
        exact=True),
    Use(f"{_DISPATCH}.reduce_scatter_to_sequence_parallel_region",
        ("input_", "group", "input_split_sizes", "use_global_buffer"), exact=True),
    Use(f"{_TP}.mappings"),
    Use(f"{_TP}.mappings._reduce_scatter_along_first_dim", ("input_", "group",
        "input_split_sizes")),
    Use(f"{_TP}.mappings.gather_from_sequence_parallel_region"),
    Use(f"{_TP}.mappings.copy_to_tensor_model_parallel_region"),
    Use(f"{_TP}.mappings.reduce_from_tensor_model_parallel_region"),
    Use(f"{_TP}.vocab_parallel_cross_entropy"),
    # --- RNG: the CPU tracker replaces Megatron's tracker object (megatron/cpu/rng.py)
    Use(_RNG),
    Use(f"{_RNG}.CudaRNGStatesTracker"),
    Use(f"{_RNG}.CudaRNGStatesTracker.reset"),
    Use(f"{_RNG}.CudaRNGStatesTracker.add", ("name", "seed"), exact=True),
    Use(f"{_RNG}.CudaRNGStatesTracker.fork", ("name",), exact=True),
    Use(f"{_RNG}._CUDA_RNG_STATE_TRACKER"),
    Use(f"{_RNG}._CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    Use(f"{_RNG}._DATA_PARALLEL_RNG_TRACKER_NAME"),
    Use(f"{_RNG}._EXPERT_PARALLEL_RNG_TRACKER_NAME"),
    Use(f"{_RNG}._MODEL_PARALLEL_RNG_TRACKER_NAME"),
    Use(f"{_RNG}.get_cuda_rng_tracker"),
    Use(f"{_TP}.get_cuda_rng_tracker"),
    Use(f"{_TP}.model_parallel_cuda_manual_seed"),
    # --- parallel state (megatron/dist.py, the outermost layer only)
    Use(_PS),
    Use(f"{_PS}.initialize_model_parallel", ("tensor_model_parallel_size",
        "pipeline_model_parallel_size", "expert_model_parallel_size")),
    *(Use(f"{_PS}.{name}") for name in (
        "destroy_model_parallel", "model_parallel_is_initialized",
        "get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size",
        "get_expert_data_parallel_group", "get_expert_model_parallel_group",
        "get_expert_model_parallel_rank", "get_expert_model_parallel_world_size",
        "get_expert_tensor_parallel_group", "get_expert_tensor_parallel_rank",
        "get_pipeline_model_parallel_group", "get_pipeline_model_parallel_rank",
        "get_pipeline_model_parallel_world_size", "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size")),
    Use("megatron.core.process_groups_config.ProcessGroupCollection"),
    Use("megatron.core.process_groups_config.ProcessGroupCollection.use_mpu_process_groups"),
    # --- checkpoints (megatron/checkpoint.py, train/state.py)
    Use("megatron.core.dist_checkpointing"),
    Use("megatron.core.dist_checkpointing.save", ("sharded_state_dict", "checkpoint_dir")),
    Use("megatron.core.dist_checkpointing.load", ("sharded_state_dict", "checkpoint_dir")),
    Use("megatron.core.dist_checkpointing.mapping.ShardedObject"),
    Use("megatron.core.dist_checkpointing.strategies.filesystem_async"),
    Use("megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue"),
    # --- safe loading (megatron/safe_load.py): megaquant's reader replaces the one Megatron's
    # load strategy builds (a module function swapped only for the length of a load)
    Use("megatron.core.dist_checkpointing.strategies.torch"),
    Use("megatron.core.dist_checkpointing.strategies.torch.TorchDistLoadShardedStrategy"),
    Use("megatron.core.dist_checkpointing.strategies.torch._get_filesystem_reader"),
    Use("megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader."
        "CachedMetadataFileSystemReader"),
    Use("megatron.core.dist_checkpointing.strategies.common.TorchCommonLoadStrategy"),
    # --- pipeline parallelism (megatron/pipeline.py, megatron/cpu/pipeline.py, models/gpt.py,
    # train/pipeline_step.py): the schedule, its p2p helpers (P2PCommunicator methods from 0.15),
    # the layer split the stages must agree with, the tied embedding across stages
    Use("megatron.core.pipeline_parallel.get_forward_backward_func", ("pp_size",)),
    Use("megatron.core.pipeline_parallel.schedules"),
    Use("megatron.core.pipeline_parallel.schedules.torch"),  # swapped on CPU (cpu/pipeline.py)
    Use("megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving",
        ("forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length",
         "micro_batch_size", "forward_only", "p2p_communicator", "pg_collection")),
    Use(f"{_P2P}.P2PCommunicator", ("pp_group", "config")),
    *(Use(f"{_P2P}.P2PCommunicator.{name}") for name in (
        "recv_forward", "recv_backward", "send_forward", "send_backward",
        "send_forward_recv_backward", "send_backward_recv_forward")),
    Use("megatron.core.transformer.transformer_block.get_num_layers_to_build",
        ("config", "vp_stage", "pp_rank")),
    Use("megatron.core.models.common.language_module.language_module.LanguageModule"
        ".shared_embedding_or_output_weight"),
    Use("megatron.core.models.common.language_module.language_module.LanguageModule"
        ".setup_embeddings_and_output_layer"),
    # QAD under PP (train/pipeline_distill.py): the schedule calls set_input_tensor on the model
    # it is given; DistillPair overrides it with this signature and forwards to both GPTModels
    Use("megatron.core.models.gpt.GPTModel.set_input_tensor", ("input_tensor",), exact=True),
)


# ---------------------------------------------------------------------------- reading a tree
class _Tree:
    """A megatron source tree (the directory holding ``megatron/``) read lazily with ast."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[str, Optional[ast.Module]] = {}

    def module(self, dotted: str) -> Optional[ast.Module]:
        if dotted not in self._cache:
            base = self.root.joinpath(*dotted.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py")
                         if p.is_file()), None)
            self._cache[dotted] = ast.parse(path.read_text(), str(path)) if path else None
        return self._cache[dotted]

    def is_package(self, dotted: str) -> bool:
        return (self.root.joinpath(*dotted.split(".")) / "__init__.py").is_file()


def _absolute(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _lookup(tree: _Tree, module: str, name: str, depth: int = 0):
    """The (module, ast node) defining ``name`` in ``module``, following re-exports."""
    mod = tree.module(module)
    if mod is None or depth > 8:
        return None
    if tree.module(f"{module}.{name}") is not None:  # a submodule
        return f"{module}.{name}", tree.module(f"{module}.{name}")
    found = None
    for node in mod.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                found = (module, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                found = found or (module, node)
        elif isinstance(node, ast.Import):  # `import torch`: a module global others may swap
            if any((a.asname or a.name) == name for a in node.names):
                found = found or (module, node)
        elif isinstance(node, (ast.Try, ast.If)):  # `try: from x import y` / `if HAVE_TE:`
            for sub in ast.walk(node):
                if isinstance(sub, ast.ClassDef) and sub.name == name:
                    found = found or (module, sub)
                elif isinstance(sub, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == name for t in sub.targets):
                    found = found or (module, sub)
    if found:
        return found
    for node in ast.walk(mod):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name or alias.name == "*":
                    src = _absolute(module, node, tree.is_package(module))
                    hit = _lookup(tree, src, alias.name if alias.name != "*" else name,
                                  depth + 1)
                    if hit:
                        return hit
    return None


def _member(tree: _Tree, module: str, cls: ast.ClassDef, name: str, depth: int = 0):
    """A class member (method, class attribute, enum value), searched through base classes."""
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and node.name == name:
            return module, node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return module, node
    for base_mod, base in _bases(tree, module, cls, depth):
        hit = _member(tree, base_mod, base, name, depth + 1)
        if hit:
            return hit
    return None


def _bases(tree: _Tree, module: str, cls: ast.ClassDef, depth: int):
    if depth > 8:
        return
    for b in cls.bases:
        if isinstance(b, ast.Name):
            hit = _lookup(tree, module, b.id)
            if hit and isinstance(hit[1], ast.ClassDef):
                yield hit


def _params(tree: _Tree, module: str, node) -> Optional[list[str]]:
    """Parameter names of a def (no self/cls), a class's __init__, or a dataclass's fields."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        return names[1:] if names[:1] in (["self"], ["cls"]) else names
    if isinstance(node, ast.ClassDef):
        init = _member(tree, module, node, "__init__")
        if init and isinstance(init[1], ast.FunctionDef):
            return _params(tree, *init)
        return _fields(tree, module, node, 0)
    return None


def _fields(tree: _Tree, module: str, cls: ast.ClassDef, depth: int) -> list[str]:
    out = []
    for base_mod, base in _bases(tree, module, cls, depth):
        out += [f for f in _fields(tree, base_mod, base, depth + 1) if f not in out]
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id not in out:
                out.append(node.target.id)
    return out


def read_symbol(tree: _Tree, path: str) -> Optional[list[str]]:
    """``None`` when ``path`` is absent, else its parameter names ([] when not callable)."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):  # longest module prefix first
        module = ".".join(parts[:split])
        if tree.module(module) is None:
            continue
        rest = parts[split:]
        if not rest:
            return []
        hit = _lookup(tree, module, rest[0])
        for name in rest[1:]:
            if hit is None or not isinstance(hit[1], ast.ClassDef):
                return None
            hit = _member(tree, hit[0], hit[1], name)
        return None if hit is None else (_params(tree, *hit) or [])
    return None


def read_release(root: str | Path) -> dict[str, Optional[list[str]]]:
    """Every contract path -> its parameters (None: absent) in the tree at ``root``."""
    tree = _Tree(Path(root))
    return {use.path: read_symbol(tree, use.path) for use in CONTRACT}


# ---------------------------------------------------------------------------- checking
def problems(release: dict[str, Optional[list[str]]], version: str) -> list[str]:
    """What a release lacks of the (required) contract, one message per symbol."""
    out = []
    for use in CONTRACT:
        if not use.required:
            continue
        have = release.get(use.path)
        if have is None:
            out.append(f"megatron-core {version}: {use.path} is missing")
        elif use.params is not None and use.exact and list(use.params) != have:
            out.append(f"megatron-core {version}: {use.path} takes {have}; megaquant overrides "
                       f"it as {list(use.params)}")
        elif use.params is not None and not use.exact:
            missing = [p for p in use.params if p not in have]
            if missing:
                out.append(f"megatron-core {version}: {use.path} has no parameter(s) {missing}")
    return out


def installed_tree() -> Optional[Path]:
    """The directory holding the installed ``megatron/`` package (found, not imported).

    ``megatron`` is a namespace package (a ``tests/megatron`` folder may join it), so the
    search asks for ``megatron.core`` and walks up from its ``__init__.py``.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("megatron.core")
    except ModuleNotFoundError:
        return None
    return Path(spec.origin).parents[2] if spec and spec.origin else None
