"""KV-cache quantization on the embedded SmolLM2-135M: perplexity, KV bytes per token, cost.

For each recipe (KV alone: ``rules: []`` plus a ``kv_cache:`` section; weight recipes with and
without a KV cache format): calibrate by max (``kv_fp8_mse``: MSE-searched FP8 K/V scales,
:mod:`megaquant.calib.kv_mse`) on other plays, then perplexity on Hamlet in
``--seq``-token windows and in one ``--long``-token window (the cache is exercised at long
context, not at 512 tokens). KV bytes per token are what an engine stores for K and V over all
layers (scales included). The attention cost is the core attention of one layer on one window,
K/V quantizers on vs off (median of ``--repeats``; target <= 1.2x). Prints a table and appends
it to benchmarks/RESULTS.md.

    python benchmarks/kv.py                            # 8 x 512 and 1 x 8192 tokens
    python benchmarks/kv.py --long 4096 --recipes fp32 kv_fp8
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from megaquant.data import default_calib_text, default_eval_text, token_batches
from megaquant.evaluate import evaluate_loss, run_forward
from megaquant.megatron.dist import init_distributed, init_model_parallel
from megaquant.models.gpt import GPTConfig, build_gpt_model
from megaquant.models.mapping import hf_to_megatron
from megaquant.models.smollm2 import load_smollm2
from megaquant.ptq import quantize
from megaquant.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# KV alone (no quantized linear): the kv_cache section, and the calibration if not max
KV_ONLY = {"kv_fp8": ({"format": "fp8"}, None),
           "kv_fp8_unit": ({"format": "fp8", "scale": "unit"}, None),
           "kv_fp8_mse": ({"format": "fp8"}, {"algorithm": "mse"}),  # calib/kv_mse.py
           "kv_nvfp4": ({"format": "nvfp4"}, None)}
DEFAULT = ["fp32", "kv_fp8", "kv_fp8_unit", "kv_fp8_mse", "kv_nvfp4", "fp8", "fp8_kv", "nvfp4",
           "nvfp4_fp8kv", "nvfp4_nvfp4kv"]
BYTES_PER_VALUE = {None: 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}  # bf16 cache; NVFP4 + E4M3/16


def _recipe(name: str):
    if name in KV_ONLY:
        kv, calib = KV_ONLY[name]
        return {"name": name, "rules": [], "kv_cache": kv, **({"calib": calib} if calib else {})}
    return name


def _model(arch: GPTConfig, hf_state):
    model = build_gpt_model(arch, None, tp_size=1)
    model.load_state_dict(hf_to_megatron(hf_state, arch, 0, 1), strict=False)
    return model.eval()


def _kv_bytes(arch: GPTConfig, kv_format) -> float:
    head_dim = arch.hidden_size // arch.num_attention_heads
    return 2 * arch.num_layers * arch.num_query_groups * head_dim * BYTES_PER_VALUE[kv_format]


def attention_cost(model, tokens, repeats: int) -> float:
    """Core attention of layer 0, K/V quantizers on / off (median seconds ratio)."""
    attn = model.decoder.layers[0].self_attention.core_attention
    seen = {}
    def keep(module, args):  # returns None: the call's arguments stay as they are
        seen.setdefault("qkv", args[:3])

    hook = attn.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(tokens, None, None)
    hook.remove()
    q, k, v = seen["qkv"]
    times = {}
    for mode in ("static", "off"):
        attn.k_quantizer.mode = attn.v_quantizer.mode = mode
        runs = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            with torch.no_grad():
                attn(q, k, v, None)
            runs.append(time.perf_counter() - t)
        times[mode] = statistics.median(runs[1:])
    attn.k_quantizer.mode = attn.v_quantizer.mode = "static"
    return times["static"] / times["off"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=DEFAULT)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--long", type=int, default=8192)  # SmolLM2's max_position_embeddings
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    init_distributed()
    groups = init_model_parallel(1)
    arch_d, hf_state, tok = load_smollm2()
    arch = GPTConfig.from_dict({**arch_d, "seq_length": max(args.seq, args.long),
                                "name": "SmolLM2-135M"})
    calib = [t[None, :-1] for t in token_batches(default_calib_text(), tok, args.calib_samples,
                                                 args.seq)]
    evals = list(token_batches(default_eval_text(), tok, args.eval_samples, args.seq).split(1))
    longs = (list(token_batches(default_eval_text(), tok, 1, args.long).split(1))
             if args.long else [])
    rows, cost = [], None
    for name in args.recipes:
        model = _model(arch, hf_state)
        kv = None
        if name != "fp32":
            recipe = load_recipe(_recipe(name))
            kv = recipe.kv_cache and recipe.kv_cache.format
            quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group))
        t = time.perf_counter()
        ppl = math.exp(evaluate_loss(model, evals, groups.dp_group))
        ppl_long = math.exp(evaluate_loss(model, longs, groups.dp_group)) if longs else float("nan")
        rows.append((name, kv, ppl, ppl_long, _kv_bytes(arch, kv), time.perf_counter() - t))
        print(f"{name}: ppl {ppl:.3f}, long {ppl_long:.3f}", flush=True)
        if name == "kv_fp8":
            cost = attention_cost(model, evals[0][:, :-1], args.repeats)
    report(args, rows, cost)


def report(args, rows, cost) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}")
    base = {r[0]: r for r in rows}
    fp = base.get("fp32")
    lines = [f"## benchmarks/kv.py: SmolLM2-135M KV-cache quantization, {machine}", "",
             f"Perplexity on {args.eval_samples} x {args.seq} and 1 x {args.long} tokens of "
             f"Hamlet; calibration {args.calib_samples} x {args.seq} tokens of other plays (max; "
             "kv_fp8_mse: MSE-searched FP8 K/V scales). "
             "x ref: against fp32 for KV alone, against the weight recipe without KV "
             "otherwise. "
             "KV bytes per token: K and V over all layers (bf16 cache = 2 bytes a value).",
             "",
             f"| recipe | KV | ppl ({args.seq}) | x ref | ppl ({args.long}) | x ref "
             "| KV bytes/token | eval s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, kv, ppl, long, nbytes, te in rows:
        ref = base.get(name.replace("_fp8kv", "").replace("_nvfp4kv", "").replace("_kv", ""), fp)
        ref = fp if name in KV_ONLY or ref is None else ref
        r1 = ppl / ref[2] if ref else float("nan")
        r2 = long / ref[3] if ref else float("nan")
        lines.append(f"| {name} | {kv or 'bf16'} | {ppl:.3f} | {r1:.4f} | {long:.3f} | {r2:.4f} "
                     f"| {nbytes:.0f} | {te:.1f} |")
    if cost is not None:
        lines += ["", f"Core attention of one layer, 1 x {args.seq} tokens, FP8 K/V quantizers on "
                  f"vs off: x{cost:.2f} (median of {args.repeats}; target <= 1.2)"]
    text = "\n".join(lines + [""])
    print(text)
    with open(RESULTS, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
