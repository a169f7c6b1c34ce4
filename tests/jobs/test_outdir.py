"""Output directories: one run at a time, run.overwrite honoured, commit whole, leftovers
handled."""

import pytest

from tests.distributed_utils import run_script


def _dir_with(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_second_run_fails_fast_naming_the_holder(tmp_path):
    import os

    from megaquant.outdir import OutputDir, OutputDirBusy

    first = OutputDir(tmp_path / "out")
    first.acquire(overwrite=True)
    with pytest.raises(OutputDirBusy,
                       match=rf"run.output_dir=.*out is in use by pid {os.getpid()}"):
        OutputDir(tmp_path / "out").acquire(overwrite=True)
    first.release()
    OutputDir(tmp_path / "out").acquire(overwrite=True)  # free again once released


def test_overwrite_false_refuses_non_empty_and_keeps_it(tmp_path):
    from megaquant.outdir import OutputDir

    out = _dir_with(tmp_path / "out", **{"summary.json": "fp8"})
    with pytest.raises(ValueError, match=r"not empty and run.overwrite=false.*run.overwrite=true"):
        OutputDir(out).acquire(overwrite=False)
    assert _tree(out) == {"summary.json": "fp8"}
    OutputDir(tmp_path / "empty").acquire(overwrite=False)  # absent (or empty) is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        OutputDir(tmp_path / "file").acquire(overwrite=True)


@pytest.mark.parametrize("state, expected, note", [
    # killed while writing: staging is dropped, the previous output stays
    ({"out": "old", ".out.partial": "new"}, "old", "interrupted run"),
    # killed between the two renames: the previous output comes back
    ({".out.old": "old", ".out.partial": "new"}, "old", "restored the previous output"),
    # killed after the swap, before deleting .old: the new output (all of it) stays
    ({"out": "new", ".out.old": "old"}, "new", "killed after committing"),
])
def test_leftovers_of_an_interrupted_run_are_resolved_and_reported(tmp_path, state, expected,
                                                                   note):
    from megaquant.outdir import OutputDir

    for name, tag in state.items():
        _dir_with(tmp_path / name, **{"summary.json": tag, "checkpoint/w": tag})
    handle = OutputDir(tmp_path / "out")
    notes = handle.acquire(overwrite=True)
    assert any(note in n for n in notes), notes
    assert _tree(tmp_path / "out") == {"summary.json": expected, "checkpoint/w": expected}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_claim_commits_everything_at_once_or_nothing(tmp_path):
    from megaquant.outdir import claim_output_dir

    out = _dir_with(tmp_path / "out", **{"summary.json": "old", "report.md": "old"})
    with (pytest.raises(RuntimeError, match="boom"),
          claim_output_dir(out, overwrite=True) as claimed):
        (claimed.staging / "summary.json").write_text("new")
        raise RuntimeError("boom")
    assert _tree(out) == {"summary.json": "old", "report.md": "old"}
    assert not (tmp_path / ".out.partial").exists()
    with claim_output_dir(out, overwrite=True) as claimed:
        _dir_with(claimed.staging, **{"summary.json": "new", "checkpoint/w": "new"})
        assert _tree(out) == {"summary.json": "old", "report.md": "old"}  # nothing visible yet
        claimed.commit()
    assert _tree(out) == {"summary.json": "new", "checkpoint/w": "new"}  # no stale report.md


@pytest.mark.timeout(300)
def test_ptq_script_honours_overwrite_false(tmp_path):
    out = _dir_with(tmp_path / "out", **{"summary.json": "an fp8 run"})
    res = run_script("ptq.py", ["+recipe=int8", "model=tiny", f"run.output_dir={out}",
                                "run.overwrite=false"])
    assert res.returncode != 0
    assert "run.overwrite=false" in res.stderr + res.stdout
    assert _tree(out) == {"summary.json": "an fp8 run"}
