"""Bits per parameter of every exportable scheme, per layout and dtype, at SmolLM2-135M's shapes.

Bits per parameter depend only on the tensor shapes, the scheme and the dtype of the unquantized
tensors, not on the weights or the calibration algorithm (nvfp4_mse / _gptq / _sq write the same
tensors as nvfp4), so a randomly initialised model with SmolLM2-135M's architecture (tied
embeddings, 576 hidden, 30 layers) is quantized with one base recipe per scheme and exported with
``dtype`` float32 and bfloat16. INT4 uses blocks of 64 (SmolLM2's 576 is not a multiple of 128).
Prints a table and appends it to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/export_bits.py [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import tempfile
from pathlib import Path

import torch

BASE = {"nvfp4": "nvfp4", "nvfp4_w4a16": "nvfp4_w4a16", "fp8": "fp8",
        "fp8_per_channel": "fp8_per_channel", "int8": "int8", "mxfp8": "mxfp8", "mxfp4": "mxfp4",
        "int4_w4a16": {"name": "int4_w4a16_b64", "exclude": ["*output_layer*"],
                       "rules": [{"modules": "*", "weight": {"format": "int4", "block_size": 64}}]}}


def _model(groups):
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.smollm2 import SMOLLM2_135M

    arch = GPTConfig.from_dict({**SMOLLM2_135M, "seq_length": 64, "name": "SmolLM2-135M shapes"})
    torch.manual_seed(0)
    return build_gpt_model(arch, tp_size=1), arch


def measure() -> list[tuple]:
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.export import export_model
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed()
    groups = init_model_parallel(1, 1, 1)
    rows = []
    calib = [torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))]
    for scheme, recipe in BASE.items():
        model, arch = _model(groups)
        megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
        for dtype in ("float32", "bfloat16"):
            out = Path(tempfile.mkdtemp()) / "x"
            try:
                report = export_model(model, arch, out, dtype=dtype)
            finally:
                shutil.rmtree(out.parent, ignore_errors=True)
            for layout, info in report.layouts.items():
                rows.append((scheme, layout, dtype, info["bits_per_param"],
                             info["quantized_bits_per_param"], info["bytes"]))
            for layout, why in report.skipped_layouts.items():
                rows.append((scheme, layout, dtype, None, None, why.split(":")[0]))
        del model
    return rows


def table(rows) -> str:
    lines = ["| scheme | layout | dtype | bits/param overall | bits/param quantized linears | MB |",
             "|---|---|---|---|---|---|"]
    for scheme, layout, dtype, bits, qbits, size in rows:
        if bits is None:
            lines.append(f"| {scheme} | {layout} | {dtype} | - | - | not written ({size}) |")
        else:
            lines.append(f"| {scheme} | {layout} | {dtype} | {bits:.2f} | {qbits:.3f} | "
                         f"{size / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    text = table(measure())
    print(text)
    if not args.no_append:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(f"\n## export_bits.py ({datetime.date.today()}): bits per parameter at "
                    "SmolLM2-135M shapes (tied embeddings, lm_head not written)\n\n"
                    f"{text}\n")


if __name__ == "__main__":
    main()
