"""Checkpoints that try to run code, and checkpoints that are damaged, are refused by file name.

Reference for "the payload would have run": the same crafted file read the stock way
(``pickle.load`` / ``torch.load(weights_only=False)``) creates the marker file.
"""

import io
import json
import os
import pickle
import shutil

import pytest
import torch

from tests.export.export_helpers import quantized_tiny


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(megatron_single, tmp_path_factory):
    from megaquant.megatron.checkpoint import save_checkpoint

    model, _ = quantized_tiny("fp8", megatron_single.dp_group)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(model, directory, metadata={"recipe": "fp8"})
    return model, directory


@pytest.fixture
def ckpt(saved, tmp_path):
    model, directory = saved
    copy = tmp_path / "checkpoint"
    shutil.copytree(directory, copy)
    return model, copy


def _byte_item(directory):
    """(file, offset, length) of one ShardedObject (byte item) inside a .distcp file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = pickle.loads((directory / ".metadata").read_bytes())
    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata[index.fqn], BytesStorageMetadata):
            return md, index, info
    raise AssertionError("the tiny checkpoint has no byte items")


def _plant_in_metadata(directory, marker):
    real = (directory / ".metadata").read_bytes()
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return lambda: pickle.loads((directory / ".metadata").read_bytes()) and real


def _plant_in_distcp(directory, marker):
    md, index, info = _byte_item(directory)
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    shard = directory / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as fh:  # append the payload and point the item at it
        fh.write(buf.getvalue())
    md.storage_data[index] = type(info)(info.relative_path, offset, len(buf.getvalue()),
                                        info.transform_descriptors)
    (directory / ".metadata").write_bytes(pickle.dumps(md))
    data = buf.getvalue()
    return lambda: torch.load(io.BytesIO(data), weights_only=False)


def _plant_in_common(directory, marker):
    torch.save({"payload": Payload(marker)}, directory / "common.pt")
    return lambda: torch.load(directory / "common.pt", weights_only=False)


@pytest.mark.parametrize("plant,file", [(_plant_in_metadata, ".metadata"),
                                        (_plant_in_distcp, ".distcp"),
                                        (_plant_in_common, "common.pt")])
def test_load_refuses_code_in_each_checkpoint_file(ckpt, tmp_path, plant, file):
    from megaquant import manifest
    from megaquant.megatron.checkpoint import load_checkpoint
    from megaquant.megatron.safe_load import UnsafeCheckpointError

    model, directory = ckpt
    marker = tmp_path / "pwned"
    stock_load = plant(directory, marker)
    manifest.write_manifest(directory)  # an attacker ships a matching manifest
    with pytest.raises(UnsafeCheckpointError, match=rf"{file}.*refused to load"):
        load_checkpoint(model, directory)
    assert not marker.exists(), "the payload ran"
    stock_load()  # reference: read the stock way, the same file does run the payload
    assert marker.exists()


def _flip_bits(directory):
    shard = directory / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    for i in range(100, min(len(data), 100 + 1000 * 97), 97):
        data[i] ^= 0x40
    shard.write_bytes(bytes(data))
    return "__0_0.distcp", "SHA-256"


def _truncate(name):
    def damage(directory):
        path = directory / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return name, "truncated"
    return damage


def _remove(directory):
    (directory / "__0_1.distcp").unlink()
    return "__0_1.distcp", "missing"


@pytest.mark.parametrize("damage", [_flip_bits, _truncate("__0_0.distcp"), _truncate(".metadata"),
                                    _truncate("common.pt"), _remove],
                         ids=["flip_distcp", "trunc_distcp", "trunc_metadata", "trunc_common",
                              "missing_distcp"])
def test_load_refuses_damaged_file_by_name(ckpt, damage):
    from megaquant.manifest import ManifestError
    from megaquant.megatron.checkpoint import load_checkpoint

    model, directory = ckpt
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    name, why = damage(directory)
    with pytest.raises(ManifestError, match=rf"{name}.*{why}"):
        load_checkpoint(model, directory)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a damaged load touched weights"


def test_damaged_file_without_manifest_still_named(ckpt):
    """Checkpoints from before manifests: a truncated shard is a clear error, not a bare
    EOFError."""
    from megaquant.megatron.checkpoint import load_checkpoint
    from megaquant.megatron.safe_load import CorruptCheckpointError

    model, directory = ckpt
    (directory / "manifest.json").unlink()
    _truncate(".metadata")(directory)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata.*truncated or damaged"):
        load_checkpoint(model, directory)


def test_bad_megaquant_json_and_run_dir_hint(ckpt):
    from megaquant.megatron.checkpoint import read_metadata

    _, directory = ckpt
    with pytest.raises(FileNotFoundError, match=r"is a run directory: use .*checkpoint"):
        read_metadata(directory.parent)
    (directory / "megaquant.json").write_text('{"metadata": {,}')
    with pytest.raises(ValueError, match=r"megaquant.json is damaged"):
        read_metadata(directory)


def test_manifest_lists_every_file_and_roundtrip_loads(ckpt):
    from megaquant.megatron.checkpoint import load_checkpoint

    model, directory = ckpt
    listed = set(json.loads((directory / "manifest.json").read_text())["files"])
    on_disk = {p.name for p in directory.iterdir()} - {"manifest.json"}
    assert listed == on_disk and {".metadata", "common.pt", "megaquant.json"} <= listed
    assert load_checkpoint(model, directory) == {"recipe": "fp8"}


def test_megaquant_verify_command(ckpt, capsys):
    from megaquant.cli import main

    _, directory = ckpt
    assert main(["verify", str(directory)]) == 0
    assert f"OK {directory}" in capsys.readouterr().out
    _flip_bits(directory)
    assert main(["verify", str(directory)]) == 1
    assert "__0_0.distcp does not match its SHA-256" in capsys.readouterr().err
