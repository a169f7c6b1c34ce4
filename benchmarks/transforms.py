"""Cost of the online block Hadamard: quantized SmolLM2 forward with and without it.

The same NVFP4 W4A4 model (RTN, max calibration) is timed with no online transform, then with
``block_hadamard`` on down_proj's input (block 16, the NVFP4 block) and on down_proj + o_proj.
The transform is exact in float (its inverse is folded into the weights), so only time
changes. Median of alternating forwards over one batch; prints a table and appends it to
benchmarks/RESULTS.md.

    python benchmarks/transforms.py --seq 512 --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from megaquant.calib.passes import run_algorithm
from megaquant.data import default_calib_text, token_batches
from megaquant.evaluate import run_forward
from megaquant.megatron.dist import init_distributed, init_model_parallel
from megaquant.models.gpt import GPTConfig, build_gpt_model
from megaquant.models.mapping import hf_to_megatron
from megaquant.models.smollm2 import load_smollm2
from megaquant.ptq import quantize
from megaquant.recipe_calib import CalibConfig
from megaquant.spec import get_spec_provider

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
VARIANTS = {"none": None, "down_proj": ["*linear_fc2"], "down_proj + o_proj": ["*linear_fc2",
                                                                               "*linear_proj"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    init_distributed()
    groups = init_model_parallel(1)
    arch_d, hf_state, tok = load_smollm2()
    arch = GPTConfig.from_dict({**arch_d, "seq_length": args.seq, "name": "SmolLM2-135M"})
    batch = [t[None, :-1] for t in token_batches(default_calib_text(), tok, 1, args.seq)]
    models = {}
    for name, mods in VARIANTS.items():
        model = build_gpt_model(arch, get_spec_provider("local"), tp_size=1)
        model.load_state_dict(hf_to_megatron(hf_state, arch, 0, 1), strict=False)
        quantize(model.eval(), "nvfp4", lambda m: run_forward(m, batch, "calib", groups.dp_group),
                 dp_group=groups.dp_group)
        if mods:
            run_algorithm(model, CalibConfig("block_hadamard", {"modules": mods}), None, None)
        run_forward(model, batch, "warm-up", groups.dp_group)
        models[name] = model
    times = {name: [] for name in models}
    for _ in range(args.reps):  # alternate, so load changes hit every variant alike
        for name, model in models.items():
            t = time.perf_counter()
            run_forward(model, batch, "forward", groups.dp_group)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["none"])
    load = os.getloadavg()
    lines = [f"## benchmarks/transforms.py: online block Hadamard cost, SmolLM2-135M NVFP4 W4A4, "
             f"1 x {args.seq} tokens, torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}, "
             f"load {load[0]:.1f}, "
             f"{subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}",
             "", "| online transform | forward s (median of "
             f"{args.reps}) | x none |", "|---|---|---|",
             *[f"| {n} | {statistics.median(t):.3f} | {statistics.median(t) / base:.3f} |"
               for n, t in times.items()], ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
