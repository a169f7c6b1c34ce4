"""Launcher parsing, layout checks and config errors: pure functions, no processes."""

import pytest

from megaquant.megatron.dist import check_parallel_layout, expand_nodelist, parse_launch_env

# megaquant.models.gpt (hence Megatron) is imported inside the tests that need it: spawned
# ranks import this module to find their worker, and Megatron takes ~10 s to import.


def test_expand_nodelist_ranges_padding_and_lists():
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_nodelist("a1,b[8-10],c") == ["a1", "b8", "b9", "b10", "c"]
    assert expand_nodelist("gpu[3]-ib") == ["gpu3-ib"]
    assert expand_nodelist("single") == ["single"]


def test_expand_nodelist_rejects_nested_brackets():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        expand_nodelist("rack[1-2]node[1-2]")


def test_parse_launch_env_torchrun_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    info = parse_launch_env(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1)
    assert (info.master_addr, info.master_port, info.source) == ("h0", 1234, "torchrun")


def test_parse_launch_env_slurm_first_host_and_job_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456"}
    info = parse_launch_env(env)
    assert (info.rank, info.world_size, info.local_rank) == (5, 8, 1)
    assert info.master_addr == "gpu07"
    assert info.master_port == 20000 + 123456 % 20000
    assert info.source == "slurm"
    assert parse_launch_env({**env, "MASTER_PORT": "999"}).master_port == 999


def test_parse_launch_env_single_process():
    assert parse_launch_env({}) is None
    with pytest.raises(ValueError, match="not an integer"):
        parse_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_check_parallel_layout_says_what_to_do():
    check_parallel_layout(4, tp=2, pp=2, ep=1)
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by tensor_parallel 3 x "
                                         r"pipeline 1; launch with --nproc-per-node=3"):
        check_parallel_layout(2, tp=3, pp=1, ep=1)
    with pytest.raises(ValueError, match="expert_parallel 4"):
        check_parallel_layout(4, tp=2, pp=1, ep=4)


def test_gpt_config_tensor_parallel_error_names_valid_sizes():
    from megaquant.models.gpt import GPTConfig

    smollm2 = GPTConfig(num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                        num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                        seq_length=2048, name="SmolLM2")
    smollm2.check_tensor_parallel(3)
    with pytest.raises(ValueError, match="SmolLM2 has 9 heads and 3 KV groups: tensor parallel "
                                         "must be 1 or 3, got 2"):
        smollm2.check_tensor_parallel(2)


def test_gpt_config_from_dict_rejects_unknown_keys():
    from megaquant.models.gpt import GPTConfig, tiny_gpt_config

    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['hiden_size'\].*valid keys"):
        GPTConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match="normalization"):
        tiny_gpt_config(normalization="BatchNorm")


def _timeout_worker(timeout_s):
    import time

    import torch
    import torch.distributed as dist

    from megaquant.megatron.dist import init_distributed

    env = init_distributed(timeout_s=timeout_s)
    if env.rank == 1:  # a "failed" rank: alive but never joins the collective
        time.sleep(timeout_s + 3)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as e:  # noqa: BLE001 - gloo raises once the timeout has passed
        return {"error": type(e).__name__, "waited": time.monotonic() - start,
                "backend": env.backend}
    return {"error": None}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_init_distributed_collective_timeout_fails_instead_of_hanging():
    from tests.distributed_utils import run_ranks

    first, _ = run_ranks(_timeout_worker, world_size=2, args=(3.0,), timeout_s=100)
    assert first["backend"] == "gloo"
    assert first["error"] is not None, "all_reduce with a silent peer returned"
    assert 2.0 < first["waited"] < 30.0, first  # the 3 s timeout, not a hang
