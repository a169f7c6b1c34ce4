"""MSE search of FP8 KV-cache scales (``calib: mse`` with an fp8 ``kv_cache:``).

Reference: the keys and values the unquantized core attention receives (forward pre-hook), their
max m, and for each candidate amax m * 2^(i/n) the squared error of the format's fake
quantization summed in float64; the stored amax must be the argmin (rtol 1e-6). TP=2, SP and
DP=2 equal one process in tests/kv/test_kv_tp.py.
"""

import pytest
import torch

from megaquant.formats import get_format
from tests.kv.test_kv_quant import _batches, _capture_kv, _tiny

RATIOS = 8
KV_MSE = {"name": "kv_mse", "rules": [], "kv_cache": {"format": "fp8"},
          "calib": {"algorithm": "mse", "ratios": RATIOS}}


def test_kv_mse_amax_is_the_argmin_of_the_squared_error(megatron_single):
    import megaquant
    from megaquant.evaluate import run_forward

    model, batches = _tiny(), _batches()
    seen = _capture_kv(model, batches)
    megaquant.quantize(model, KV_MSE, lambda m: run_forward(m, batches, "calib"))
    fmt, moved = get_format("fp8"), 0
    for name, pairs in seen.items():
        attn = model.get_submodule(name)
        for i, q in enumerate((attn.k_quantizer, attn.v_quantizer)):
            x = torch.cat([p[i].reshape(-1) for p in pairs]).float()
            m = x.abs().max()
            cands = [m * 2.0 ** (j / RATIOS) for j in range(RATIOS)]
            errs = [(fmt.fake_quantize(x, c) - x).double().pow(2).sum() for c in cands]
            best = min(range(RATIOS), key=lambda j: errs[j])
            torch.testing.assert_close(q.amax, cands[best].float(), rtol=1e-6, atol=0)
            assert errs[best] <= errs[0]  # never worse than max calibration on this data
            moved += best != 0
    assert moved > 0  # the search moved at least one scale away from the max


def test_kv_mse_leaves_a_fixed_unit_scale_and_nvfp4_kv_alone(megatron_single):
    import megaquant
    from megaquant.evaluate import run_forward

    model, batches = _tiny(), _batches()
    recipe = {**KV_MSE, "kv_cache": {"format": "fp8", "scale": "unit"}}
    megaquant.quantize(model, recipe, lambda m: run_forward(m, batches, "calib"))
    attn = model.decoder.layers[0].self_attention.core_attention
    assert float(attn.k_quantizer.amax) == float(attn.v_quantizer.amax) == 448.0
    with pytest.raises(ValueError, match="no weights and has no fp8 kv_cache"):
        megaquant.quantize(_tiny(), {**KV_MSE, "kv_cache": {"format": "nvfp4"}},
                           lambda m: run_forward(m, batches, "calib"))
