"""PTQ of a Hugging Face model inside Megatron-Bridge with megaquant (GPU machine with Bridge).

    torchrun --nproc-per-node=2 examples/bridge_ptq.py --hf-model meta-llama/Llama-3.2-1B \
        --recipe nvfp4 --tp 2 --calib-text calib.txt --save /ckpt/llama32-1b-nvfp4

Bridge's own flow (its quantization example): the provider loads the HF weights through its
pre-wrap hook, megaquant's hook is registered after it, the model is built without DDP,
calibrated with a forward loop and saved with ``save_megatron_model``; the amax buffers travel
in the Megatron checkpoint and ``megaquant.json`` beside it names the recipe. Train it further
with ``examples/bridge_qat.py``; export it with megaquant's exporter (full) or, for fp8/mxfp8
weights, with ``--export-hf`` through ``AutoBridge.export_hf_weights_quant`` (Bridge >= 0.5).
"""

import argparse

import torch
from megatron.bridge import AutoBridge
from megatron.core import parallel_state

from megaquant.integrations.bridge_ptq import quantize_and_save


def calib_batches(tokenizer, path: str, n: int, seq: int) -> list[torch.Tensor]:
    """``n`` windows of ``seq`` tokens from a text file (use text unlike your evaluation text)."""
    ids = tokenizer(open(path).read(), return_tensors="pt").input_ids[0]
    if ids.numel() < n * seq:
        raise ValueError(f"{path}: {ids.numel()} tokens, need {n} x {seq}")
    return [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(n)]


def forward_loop(batches: list[torch.Tensor]):
    def loop(model):  # the unwrapped GPTModel chunk (no pipeline parallelism here)
        model.eval()
        with torch.no_grad():
            for tokens in batches:
                tokens = tokens.cuda()
                pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
                model(tokens, pos, None)
    return loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-model", required=True)
    p.add_argument("--recipe", default="nvfp4", help="megaquant recipe name or YAML path")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--calib-text", required=True)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--save", required=True)
    p.add_argument("--export-hf", help="also stream fp8/mxfp8 weights to this directory")
    args = p.parse_args()

    bridge = AutoBridge.from_hf_pretrained(args.hf_model)
    provider = bridge.to_megatron_provider(load_weights=True)  # its hook loads the HF weights
    provider.tensor_model_parallel_size = args.tp
    provider.expert_model_parallel_size = args.ep
    provider.pipeline_model_parallel_size = 1
    provider.finalize()
    provider.initialize_model_parallel(seed=0)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.hf_model)
    batches = calib_batches(tokenizer, args.calib_text, args.calib_samples, args.seq)
    dp, dp_rank = parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_rank()
    mine = batches[dp_rank::parallel_state.get_data_parallel_world_size()]
    model = quantize_and_save(provider, args.recipe, forward_loop(mine), args.save,
                              dp_group=dp, build_kwargs={"bf16": True})
    if args.export_hf:
        from megaquant.integrations.bridge_export import export_hf_weights_quant

        weights = dict(export_hf_weights_quant(bridge, model, cpu=True))
        if torch.distributed.get_rank() == 0:
            from safetensors.torch import save_file

            save_file(weights, f"{args.export_hf}/model.safetensors")


if __name__ == "__main__":
    main()
