"""Export a quantized Megatron GPT model to Hugging Face-style directories with real low-bit
weights.

Pipeline (one process, the model at TP=1 and EP=1; :func:`export_checkpoint` loads a PTQ
checkpoint saved at any TP x EP layout into such a model, Megatron's dist-ckpt gathering the TP
and expert-TP shards along their axes and every EP rank's experts under their global index):

1. every linear is mapped to its HF module names (:mod:`megaquant.export.names`); the fused QKV and
   SwiGLU fc1 weights (and per-channel amax) are split by rows *before* quantizing;
2. each HF weight is quantized with the layer's own weight quantizer,
   ``fmt.quantize(weight, amax)``: the codes and scales whose ``dequantize`` is bit-identical
   to the fake-quantized weight the model ran with; activation scales come from the input
   quantizers' calibrated amax;
3. unquantized tensors (embeddings, norms, MoE routers, excluded layers such as ``lm_head``) keep
   the source precision; tied embeddings stay tied (no ``lm_head.weight``,
   ``tie_word_embeddings: true``); the model is written as the Hugging Face family it was
   imported from (:mod:`megaquant.export.families`; LLaMA, or Qwen2-MoE with experts, when it has
   none), every expert under its global index (:mod:`megaquant.export.moe`);
4. each requested layout (:mod:`megaquant.export.layouts`) is written to ``<out>/<layout>/``
   with ``config.json``, safetensors shards, ``tokenizer.json`` when there is a tokenizer, and for
   ModelOpt ``hf_quant_config.json``; ``<out>/export_report.json`` says what was written, bits per
   parameter, and which layouts were not written and why. The whole ``<out>`` appears atomically.

Before the rename every claimed module is checked to hold the tensors and dtypes its layout
declares (uint8 nibbles, float8, int32 words): a layout is never claimed for tensors it did not get.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

import megaquant
from megaquant.export import kv as KV
from megaquant.export import layouts as L
from megaquant.export.dtypes import cast_unquantized, dtype_name, resolve_dtype
from megaquant.export.families import hf_config
from megaquant.export.moe import check_experts_complete, check_moe_model
from megaquant.export.names import hf_targets, router_names, split_rows
from megaquant.export.schemes import classify
from megaquant.export.transforms import online_transforms, refuse_layouts, transform_config
from megaquant.export.writer import atomic_directory, write_json, write_safetensors
from megaquant.formats.lsq import quantize_learned
from megaquant.manifest import write_manifest

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ExportReport:
    """What an export wrote (also saved as ``export_report.json``)."""

    scheme: str
    quantized_modules: list[str]
    excluded_modules: list[str]
    params: int  # logical parameters of the HF model (tied embedding counted once)
    quantized_params: int
    layouts: dict = field(default_factory=dict)  # layout -> files, bytes, bits per parameter
    skipped_layouts: dict = field(default_factory=dict)  # layout -> reason
    tokenizer: bool = False
    dtype: str = "float32"  # of the unquantized tensors (and config.json's dtype)
    family: str = ""  # the Hugging Face architecture written (megaquant.export.families)
    lm_head: str = ""  # tied, or untied and what the recipe did with it
    engine_files: list = field(default_factory=list)  # copied from the source checkpoint
    kv_cache: str | None = None  # the KV-cache format whose per-layer scales were written
    untied: bool = False  # a tied embedding was untied by a rotation: lm_head written
    online_transforms: dict = field(default_factory=dict)  # HF module -> Hadamard block
    megaquant_version: str = megaquant.__version__

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{k}: {v['bits_per_param']:.3f} bits/param overall, "
                 + (f"{v['quantized_bits_per_param']:.3f} in quantized linears"
                    if v["quantized_bits_per_param"] is not None else "no quantized linear")
                 for k, v in self.layouts.items()]
        if self.kv_cache:
            parts.append(f"{self.kv_cache} KV cache (per-layer k_scale / v_scale)")
        notes = ([f"online block Hadamard on {len(self.online_transforms)} modules"]
                 if self.online_transforms else [])
        return (f"{self.family} scheme {self.scheme}, unquantized tensors in {self.dtype}; "
                f"lm_head {self.lm_head}; " + "; ".join(parts + notes))


def _lm_head_note(arch, quantized, scheme: str, dtype: str, untied: bool = False) -> str:
    """What the export did with the output layer: a decision the report states, never a default
    that goes unsaid (an untied lm_head silently left in 16 bits surprised ModelOpt users)."""
    if arch.tie_embeddings:
        return "tied to model.embed_tokens (no lm_head tensor; tie_word_embeddings: true)"
    how = ("untied by the residual rotation (the tied embedding was untied; lm_head written)"
           if untied else "untied")
    if any(q.name == "lm_head" for q in quantized):
        return f"{how}, quantized with the recipe ({scheme})"
    return f"{how}, kept in {dtype} (the recipe excludes the output layer)"


def _linear_modules(model: torch.nn.Module):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    for name, m in model.named_modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            yield name, m


def _check_tp1(name: str, layer) -> None:
    group = getattr(layer, "tp_group", None)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        raise ValueError(f"{name} is tensor-parallel (TP={dist.get_world_size(group)}): export a "
                         "model built at TP=1; export_checkpoint loads any saved TP layout at TP=1")


def _activation_scale(iq) -> Tensor | None:
    """The decode scale the input quantizer uses (FP8: amax/448; INT8: amax/127; NVFP4: the
    global scale g); None for formats whose activation scales come from each block (MX)."""
    if not iq.is_enabled or not iq.fmt.needs_amax:
        return None
    probe = iq.fmt.quantize(torch.zeros(1, 16), iq.amax)
    return probe.global_scale if probe.global_scale is not None else probe.scale


def _layer_scheme(name, layer):
    return classify(name, getattr(layer, "weight_quantizer", None),
                    getattr(layer, "input_quantizer", None),
                    getattr(layer, "output_quantizer", None))


def _quantize_layer(name: str, layer, arch, scheme: str) -> list[L.QuantLinear]:
    """The HF linears of one quantized Megatron layer, each quantized on its own rows."""
    hf_names, split = hf_targets(name, arch)
    if layer.weight is None:
        raise ValueError(f"{name} has no weight of its own (tied embeddings): a tied output layer "
                         "cannot be quantized apart from the embedding; exclude it (recipe "
                         "exclude '*output_layer*') or untie the embeddings")
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    weights = split_rows(layer.weight.detach(), split, arch)
    amaxes = split_rows(wq.amax, split, arch) if wq.fmt.needs_amax else (None,) * len(weights)
    in_scale = _activation_scale(iq)
    block = getattr(wq.fmt, "block_size", None)
    in_fmt = iq.fmt if iq.is_enabled else None
    # Learned per-block weight amax (QAT with learnable scales) are written as they were learned.
    blocks = getattr(wq, "block_amax", None)
    blocks = (None,) * len(weights) if blocks is None else split_rows(blocks.detach(), split, arch)
    out = [L.QuantLinear(n, quantize_learned(wq.fmt, w, a, b), in_scale, block, in_fmt, scheme)
           for n, w, a, b in zip(hf_names, weights, amaxes, blocks)]
    for q in out:
        _check_no_nan_marker(q)
    # The claim we write: these codes decode to what the model multiplied with. A quantizer
    # whose state fmt.quantize does not capture (say, a future per-block clipping) is refused.
    ran = split_rows(wq(layer.weight.detach()), split, arch)
    for q, r in zip(out, ran):
        d = wq.fmt.dequantize(q.weight)
        if not bool(((d == r) | (d.isnan() & r.isnan())).all()):
            raise RuntimeError(f"{q.name}: the exported codes do not decode to the weight the "
                               f"model computes with ({wq}); refusing to write them")
    return out


def _check_no_nan_marker(q: L.QuantLinear) -> None:
    """Integer codes mark NaN/inf inputs with the unused code -(qmax + 1); no layout can carry it
    (ModelOpt's two's-complement INT4 would read -8, INT8 readers -128 as numbers)."""
    if q.weight.codes.dtype != torch.int8:
        return
    qmax = 127 if q.weight.format_name == "int8" else 7
    bad = (q.weight.codes == -(qmax + 1)).nonzero()
    if len(bad):
        raise ValueError(f"{q.name}.weight has {len(bad)} non-finite value(s) (first at index "
                         f"{bad[0].tolist()}): fix the checkpoint's weights before exporting")


def collect(model: torch.nn.Module, arch, *, kv_only: bool = False
            ) -> tuple[str, list[L.QuantLinear], list[str]]:
    """(the model's scheme, its quantized HF linears, HF names of unquantized linears).

    A mixed-precision model (layers in different schemes) has the scheme ``"a+b"`` (sorted);
    each :class:`~megaquant.export.layouts.QuantLinear` carries its own ``scheme``. With
    ``kv_only`` (the model has KV-cache quantizers) a model without quantized linears has the
    scheme :data:`~megaquant.export.layouts.NO_LINEARS` and no quantized linear.
    """
    layers, excluded, schemes = [], list(router_names(arch)), {}
    for name, layer in _linear_modules(model):
        _check_tp1(name, layer)
        wq = getattr(layer, "weight_quantizer", None)
        if wq is None or not wq.is_enabled:
            excluded += list(hf_targets(name, arch)[0])
            continue
        schemes.setdefault(_layer_scheme(name, layer), []).append(name)
        layers.append((name, layer))
    if not layers and kv_only:
        return L.NO_LINEARS, [], sorted(set(excluded))
    if not layers:
        raise ValueError("the model has no quantized linear and no KV-cache quantizer: quantize "
                         "it first (megaquant.quantize or ptq.load_quantized) before exporting")
    scheme_of_layer = {n: s for s, names in schemes.items() for n in names}
    for s, names in sorted(schemes.items()):
        _check_whole_blocks(s, [(n, lay) for n, lay in layers if n in names])
    quantized = [q for name, layer in layers
                 for q in _quantize_layer(name, layer, arch, scheme_of_layer[name])]
    return "+".join(sorted(schemes)), quantized, sorted(set(excluded))


def _check_whole_blocks(scheme: str, layers) -> None:
    """Refuse, before quantizing anything, block formats whose blocks do not tile every input dim.

    A ragged last block is fine for fake quantization, but serving kernels (vLLM's Marlin/Machete,
    TensorRT-LLM) and compressed-tensors' reader need whole blocks along the input dimension.
    """
    blocks = {getattr(layer.weight_quantizer.fmt, "block_size", None) for _, layer in layers}
    if len(blocks) > 1:
        raise ValueError(f"{scheme} with mixed block sizes {sorted(blocks)} cannot be exported: a "
                         "quantization_config states one block (group) size per model; quantize "
                         "every layer with the same block_size")
    block = blocks.pop()
    dims = {}
    for name, layer in layers:
        dims.setdefault(layer.weight.shape[-1], []).append(name)
    ragged = {k: v for k, v in sorted(dims.items()) if block and k % block}
    if not ragged:
        return
    fits = [b for b in (128, 64, 32, 16) if b < block and all(k % b == 0 for k in dims)]
    sizes = " or ".join(map(str, fits))
    remedy = (f"re-quantize with a block size that divides every input dimension ({sizes} for "
              f"this model), e.g. scripts/ptq.py +recipe={scheme} "
              f"recipe.rules.0.weight.block_size={fits[0]}" if fits else
              "use a format without blocks, or a model whose input dimensions are multiples of 16")
    where = "; ".join(f"{k} ({v[0]}{f' and {len(v) - 1} more' if len(v) > 1 else ''})"
                      for k, v in ragged.items())
    raise ValueError(f"{scheme} with blocks of {block} cannot be exported: input dimension(s) "
                     f"{where} are not a multiple of the block size {block}, and serving engines "
                     f"need whole "
                     f"blocks along the input dimension (a ragged tail block is not written). "
                     f"To export, {remedy}. Nothing was written.")


def _layout_tensors(hf_state: dict, quantized: list[L.QuantLinear], layout: str, scheme: str):
    tensors = dict(hf_state)
    for q in quantized:
        del tensors[f"{q.name}.weight"]
        for k, t in L.module_tensors(layout, q.scheme, q).items():
            tensors[f"{q.name}.{k}"] = t
    return tensors


def check_claims(tensors: dict, quantized: list[L.QuantLinear], excluded: list[str], layout: str,
                 scheme: str, out_dtype: torch.dtype) -> None:
    """Every claimed module holds the layout's tensors and dtypes; excluded ones stay float."""
    for q in quantized:
        for k, dtype in L.required_dtypes(layout, q.scheme).items():
            t = tensors.get(f"{q.name}.{k}")
            if t is None or t.dtype != dtype:
                raise RuntimeError(f"refusing to write {layout}/{q.scheme}: {q.name}.{k} is "
                                   f"{None if t is None else t.dtype}, the layout needs {dtype}")
    for name in excluded:
        t = tensors.get(f"{name}.weight")
        if t is not None and t.dtype != out_dtype:
            raise RuntimeError(f"excluded {name}.weight is {t.dtype}, "
                               f"not the export dtype {out_dtype}")


def _bits(tensors: dict, quantized: list[L.QuantLinear], params: int) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    names = {q.name for q in quantized}
    qbytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                 if k.rsplit(".", 1)[0] in names)
    qparams = sum(q.weight.codes.numel() for q in quantized)
    return {"bytes": nbytes, "bits_per_param": 8 * nbytes / params,
            "quantized_bits_per_param": 8 * qbytes / qparams if qparams else None}


def _resolve_layouts(layouts, scheme: str, dtype: torch.dtype) -> tuple[list[str], dict]:
    """('auto' or a list) -> (layouts to write, {layout: why not}); refuses an unwritable request.

    ``scheme`` may be mixed (``"fp8+nvfp4"``): a layout writes it when it writes every part.
    """
    parts = scheme.split("+")
    asked = list(L.LAYOUTS) if layouts in ("auto", None) else list(layouts)
    for lay in asked:
        L.supports(lay, parts[0])  # ValueError for an unknown layout name

    def ok(lay):
        return all(L.supports(lay, s, dtype) for s in parts)

    def why(lay):
        return "; ".join(L.why_not(lay, s, dtype) for s in parts if not L.supports(lay, s, dtype))

    chosen = [lay for lay in asked if ok(lay)]
    skipped = {lay: why(lay) if not ok(lay) else f"not requested (layouts={asked})"
               for lay in L.LAYOUTS if lay not in chosen}
    if not chosen or (layouts not in ("auto", None) and len(chosen) < len(asked)):
        cannot = [lay for lay in asked if not ok(lay)]
        can = [lay for lay in L.LAYOUTS if ok(lay)]
        raise ValueError(f"scheme {scheme} with dtype={dtype_name(dtype)} cannot be written as "
                         f"{cannot}: {[skipped.get(lay, lay) for lay in cannot]}; layouts that can "
                         f"write it: {can or 'none'}"
                         + (f" (set layouts={can} or layouts=auto)" if can else ""))
    return chosen, skipped


def _drop_kv_refusals(chosen: list[str], skipped: dict, kv, *, explicit: bool) -> list[str]:
    """The chosen layouts that can hold the model's KV-cache scales; the others are skipped
    with the reason (an error when asked for by name, or when none is left)."""
    refused = {lay: KV.why_not(lay, kv) for lay in chosen if KV.why_not(lay, kv)}
    if refused and (explicit or len(refused) == len(chosen)):
        raise ValueError(f"cannot export: {'; '.join(refused.values())}")
    skipped.update(refused)
    return [lay for lay in chosen if lay not in refused]


def untied_arch(model: torch.nn.Module, arch):
    """(arch, untied): a model whose tied embedding was untied (the residual rotation folds the
    final norm into the output layer) is exported untied, with its own ``lm_head.weight``."""
    import dataclasses

    gpt = next((m for _, m in model.named_modules()
                if hasattr(m, "share_embeddings_and_output_weights")), None)
    if arch.tie_embeddings and gpt is not None and not gpt.share_embeddings_and_output_weights:
        return dataclasses.replace(arch, tie_embeddings=False), True
    return arch, False


def _save_tokenizer(tokenizer, directory: Path) -> None:
    backend = getattr(tokenizer, "backend", tokenizer)
    if not hasattr(backend, "save"):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} cannot be saved as tokenizer.json; "
                        "pass a megaquant.tokenizer.Tokenizer or a tokenizers.Tokenizer, or None")
    backend.save(str(directory / "tokenizer.json"))


@torch.no_grad()
def export_model(model: torch.nn.Module, arch, out_dir: str | Path, *, layouts="auto",
                 tokenizer=None, overwrite: bool = False, dtype: str = "auto",
                 source_dtype: str | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, engine_files=()) -> ExportReport:
    """Export a quantized (calibrated) GPT ``model`` built at TP=1 with architecture ``arch``.

    ``layouts``: ``"auto"`` (every layout that has the model's scheme) or a list of
    ``"modelopt"``/``"compressed-tensors"`` (an error if one of them cannot hold the scheme).
    ``tokenizer``: a megaquant ``Tokenizer`` or ``tokenizers.Tokenizer`` (written as
    tokenizer.json), or None when the source model had none. ``dtype``: what unquantized tensors
    are written in and config.json says (:mod:`megaquant.export.dtypes`; ``auto`` =
    ``source_dtype`` if given, else ``arch.params_dtype``). ``engine_files``: files of the
    source checkpoint a serving engine reads (tokenizer_config.json, generation_config.json, chat
    template), copied into every layout. Writes ``out_dir/<layout>/`` and
    ``out_dir/export_report.json`` and ``out_dir/manifest.json`` (SHA-256 of every file)
    atomically.
    """
    from megaquant.finite import check_quantized_finite, check_tensors_finite
    from megaquant.models.mapping import megatron_to_hf

    if arch.num_moe_experts:
        check_moe_model(model, arch)
    arch, untied = untied_arch(model, arch)
    out_dtype = resolve_dtype(dtype, source_dtype or arch.params_dtype)
    check_quantized_finite(model, before="export")
    kv = KV.collect_kv(model)
    scheme, quantized, excluded = collect(model, arch, kv_only=kv is not None)
    chosen, skipped = _resolve_layouts(layouts, scheme, out_dtype)
    chosen = _drop_kv_refusals(chosen, skipped, kv, explicit=layouts not in ("auto", None))
    transforms = online_transforms(model, arch)
    chosen, skipped = refuse_layouts(transforms, chosen, skipped, layouts not in ("auto", None))
    state = {k: v.detach() for k, v in model.state_dict().items()
             if isinstance(v, Tensor) and not k.endswith("_extra_state")}
    hf_state = cast_unquantized(megatron_to_hf([state], arch),
                                {f"{q.name}.weight" for q in quantized}, out_dtype)
    qparams = sum(q.weight.codes.numel() for q in quantized)
    params = sum(t.numel() for t in hf_state.values())
    report = ExportReport(scheme, sorted(q.name for q in quantized), excluded, params, qparams,
                          skipped_layouts=skipped, tokenizer=tokenizer is not None,
                          dtype=dtype_name(out_dtype),
                          family=hf_config(arch,
                                           torch_dtype=dtype_name(out_dtype))["architectures"][0],
                          lm_head=_lm_head_note(arch, quantized, scheme, dtype_name(out_dtype),
                                                untied),
                          engine_files=sorted(Path(f).name for f in engine_files),
                          untied=untied, online_transforms=transforms,
                          kv_cache=kv and kv.format)
    by_scheme = L.by_scheme(quantized)
    input_rules = {getattr(q.input_format, "scale_rule", None) for q in quantized} - {None}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for layout in chosen:
            d = tmp / layout
            d.mkdir()
            tensors = _layout_tensors(hf_state, quantized, layout, scheme)
            if kv is not None:
                tensors.update(KV.tensors(layout, kv))
            check_claims(tensors, quantized, excluded, layout, scheme, out_dtype)
            check_tensors_finite(tensors, before=f"writing the {layout} export")
            if arch.num_moe_experts:
                check_experts_complete(tensors.keys(), arch)
            files = write_safetensors(d, tensors, max_shard_bytes)
            config = hf_config(arch, torch_dtype=dtype_name(out_dtype), tokenizer=tokenizer)
            config["dtype"] = config["torch_dtype"]  # transformers 5 reads dtype, 4.x torch_dtype
            config["quantization_config"] = L.quantization_config(layout, by_scheme, excluded)
            config["quantization_config"].update(KV.config_fields(layout, kv))
            if transforms and layout == "compressed-tensors":
                config["quantization_config"]["transform_config"] = transform_config(transforms)
            write_json(d / "config.json", config)
            if layout == "modelopt":
                hf_quant = L.hf_quant_config(by_scheme, excluded)
                hf_quant["quantization"].update(KV.config_fields(layout, kv))
                write_json(d / "hf_quant_config.json", hf_quant)
            if tokenizer is not None:
                _save_tokenizer(tokenizer, d)
            for f in engine_files:
                shutil.copyfile(f, d / Path(f).name)
            report.layouts[layout] = {"files": files, **_bits(tensors, quantized, params),
                                      "notes": [n for s in by_scheme for n in
                                                L.activation_notes(layout, s, input_rules)]}
        write_json(tmp / "export_report.json", report.to_dict())
        write_manifest(tmp)  # SHA-256 of every file; check with `megaquant verify DIR`
    return report


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, **kwargs) -> ExportReport:
    """Export a megaquant PTQ checkpoint (``<ptq out>/checkpoint``) saved at any TP/EP layout.

    Loads it into a model built at TP=1 (and EP=1 for MoE) in this process (Megatron's parallel
    state must be set up for one rank: ``init_distributed(); init_model_parallel(1)``), then
    :func:`export_model`.
    The architecture and recipe come from the checkpoint's ``megaquant.json``.
    """
    from megaquant.megatron.checkpoint import read_metadata
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.ptq import load_quantized

    meta = read_metadata(checkpoint_dir)["metadata"]
    if "arch" not in meta:
        raise ValueError(f"{checkpoint_dir}/megaquant.json has no 'arch': re-save it with "
                         "scripts/ptq.py (which records the architecture)")
    arch = GPTConfig.from_dict(meta["arch"])
    # TP=1, EP=1: dist-ckpt gathers TP and expert-TP shards along their axes, and every EP
    # rank's experts (stored under their global index) into this one process
    model = build_gpt_model(arch, tp_size=1, ep_size=1)
    load_quantized(model, checkpoint_dir)
    kwargs.setdefault("source_dtype", meta.get("source_dtype"))
    return export_model(model, arch, out_dir, **kwargs)


def read_report(out_dir: str | Path) -> dict:
    """The ``export_report.json`` of an export directory."""
    return json.loads((Path(out_dir) / "export_report.json").read_text())
