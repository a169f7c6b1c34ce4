"""megaquant.util: atomic writes leave the old or the new file; flat reductions keep shapes."""

import json

import torch

from megaquant.util import all_reduce_flat, is_rank0, write_json_atomic


def test_util_write_json_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2], "p": tmp_path})  # default=str for paths
    assert json.loads(path.read_text()) == {"b": [1, 2], "p": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_util_all_reduce_flat_without_a_group_returns_the_inputs():
    ts = [torch.ones(2, 3), torch.zeros(())]
    assert all_reduce_flat(ts, None) is ts and is_rank0()
