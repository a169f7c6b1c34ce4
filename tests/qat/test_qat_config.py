"""Training settings, the schedule and the NeMo-style Hydra overrides (pure, fast)."""

import math

import pytest

from megaquant.train.config import BatchConfig, DistillConfig, OptimConfig, TrainerConfig
from megaquant.train.schedule import lr_at


def test_lr_schedule_warmup_then_cosine_matches_formula():
    optim = OptimConfig.from_dict({"lr": 1.0, "sched": {"warmup_steps": 4, "min_lr": 0.1}})
    got = [lr_at(s, 14, optim) for s in range(14)]
    want = [0.25, 0.5, 0.75, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 9))
                                     for k in range(10)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == pytest.approx(0.1) and max(got) == 1.0


def test_lr_schedule_linear_and_constant():
    lin = OptimConfig.from_dict({"lr": 2.0, "sched": {"decay": "linear", "min_lr": 0.0}})
    assert [lr_at(s, 5, lin) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    const = OptimConfig.from_dict({"lr": 2.0, "sched": {"decay": "constant"}})
    assert {lr_at(s, 5, const) for s in range(5)} == {2.0}


@pytest.mark.parametrize("maker, values, message", [
    (TrainerConfig.from_dict, {"max_step": 3}, r"unknown key\(s\) \['max_step'\].*max_steps"),
    (TrainerConfig.from_dict, {"precision": "fp8"}, "precision must be one of"),
    (OptimConfig.from_dict, {"sched": {"warmup": 3}}, r"model.optim.sched.*warmup_steps"),
    (OptimConfig.from_dict, {"name": "sgd"}, "adamw"),
    (DistillConfig.from_dict, {"temp": 2}, r"model.distill.*temperature"),
    (DistillConfig.from_dict, {"temperature": 0}, r"model.distill.temperature must be > 0"),
    (DistillConfig.from_dict, {"temperature": -1.5}, r"model.distill.temperature must be > 0"),
    (DistillConfig.from_dict, {"enabled": True, "kl_weight": 0}, r"both 0: nothing to train"),
])
def test_configs_reject_bad_keys_naming_valid_ones(maker, values, message):
    with pytest.raises(ValueError, match=message):
        maker(values)


def test_global_batch_must_split_over_dp_and_micro_batches():
    assert BatchConfig(8, 2).micro_batches_per_rank(2) == 2
    with pytest.raises(ValueError, match="multiple of 4"):
        BatchConfig(6, 2).micro_batches_per_rank(2)


def test_micro_batches_follow_the_step_and_split_over_dp():
    import torch

    from megaquant.train.step import micro_batches

    w = torch.arange(10).unsqueeze(1).expand(10, 3).contiguous()
    batch = BatchConfig(4, 1)
    one = torch.cat(micro_batches(w, 2, batch, 0, 1))[:, 0].tolist()
    assert one == [8, 9, 0, 1]  # step 2 starts at window 8, wrapping around
    r0 = torch.cat(micro_batches(w, 2, batch, 0, 2))[:, 0].tolist()
    r1 = torch.cat(micro_batches(w, 2, batch, 1, 2))[:, 0].tolist()
    assert sorted(r0 + r1) == sorted(one) and r0 == [8, 0]


def _compose(args):
    from hydra import compose, initialize_config_dir

    from megaquant.jobs.qat import nemo_style_overrides, register_quantization_group
    from megaquant.recipe import RECIPE_DIR

    register_quantization_group()
    with initialize_config_dir(config_dir=str(RECIPE_DIR.parent / "configs"), version_base=None):
        return compose("qat", overrides=nemo_style_overrides(args))


def test_model_quantization_overrides_as_nemo_users_type_them():
    import yaml

    from megaquant.recipe import RECIPE_DIR

    cfg = _compose([])
    assert cfg.model.quantization.name == "nvfp4" and cfg.model.source == "smollm2"
    cfg = _compose(["model.quantization=int4_w4a16",
                    "model.quantization.rules.0.weight.block_size=32"])
    want = yaml.safe_load((RECIPE_DIR / "int4_w4a16.yaml").read_text())
    want["rules"][0]["weight"]["block_size"] = 32
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.model.quantization) == want
    assert cfg.run.output_dir == "outputs/qat/int4_w4a16"
    cfg = _compose(["model.quantization=null", "model.distill.enabled=true"])
    assert "quantization" not in cfg.model and cfg.run.output_dir == "outputs/qad/unquantized"
    # The composed sections are what the job's typed configs accept.
    TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer))
    OptimConfig.from_dict(OmegaConf.to_container(cfg.model.optim))
    DistillConfig.from_dict(OmegaConf.to_container(cfg.model.distill))


def test_unknown_recipe_in_model_quantization_names_the_group():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="nvfp5"):
        _compose(["model.quantization=nvfp5"])
