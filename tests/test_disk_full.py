"""A full disk or quota (issue 29, item 1): a checkpoint, resume state, result or shard write
that hits ENOSPC leaves every earlier file intact, stops with one line naming the path, the
bytes needed and the bytes free, and once space is freed the run resumes to the same weights
as an uninterrupted run.

The file-system tests mount a small tmpfs (root only: CI runs as root; skipped with the reason
elsewhere); the injected ones raise ENOSPC the way the libraries do (torch.save: a RuntimeError
during the OSError; safetensors: its own error quoting "os error 28")."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from learnforget.cli import main
from learnforget.files import DiskFull, atomic_write_json, is_disk_full
from learnforget.runfolder import RunFolder

ONE_LINE = re.compile(r"^learnforget: error: disk full writing (?P<path>\S+): no space left on "
                      r"device \(ENOSPC\): it needs about (?P<needed>[\d,]+) bytes, "
                      r"(?P<free>[\d,]+) bytes are free there; earlier files are intact: free "
                      r"space \(or raise the quota\), then rerun the same command to resume$")
COMMON = [*FAST, "train.num_threads=1", "data.max_docs=8", "data.heldout_docs=2",
          "method=full", "train.checkpoints.at=[1,2,3]"]


@contextlib.contextmanager
def small_fs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _num(s: str) -> int:
    return int(s.replace(",", ""))


def _cli(runs: Path, cache: Path, monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(runs))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(cache))
    try:
        code = main(["train", *COMMON, *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code or 0, [x for x in err.splitlines() if x.startswith("learnforget: error:")]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fill_after_budget(monkeypatch, at_step: int, leave: int, filler: Path) -> None:
    """After the budget checkpoint (and resume state) of `at_step`, fill the file system of
    `filler` until only `leave` bytes are free."""
    from learnforget.train import loop

    real = loop.save_budget

    def save_then_fill(s, run, step, step_loss):
        real(s, run, step, step_loss)
        if step == at_step:
            free = os.statvfs(filler.parent).f_bavail * os.statvfs(filler.parent).f_frsize
            with filler.open("wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, free - leave))

    monkeypatch.setattr(loop, "save_budget", save_then_fill)


def test_a_checkpoint_that_fills_a_small_disk(tmp_path, cache_dir, monkeypatch, capsys):
    """Must-show 1: the runs folder on a small tmpfs that fills during the step-2 checkpoint."""
    code, _ = _cli(tmp_path / "ref", cache_dir, monkeypatch, capsys)
    assert code == 0
    ref = next((tmp_path / "ref").glob("*/*/checkpoints")).parent
    size = (ref / "checkpoints/step-000002/model.safetensors").stat().st_size
    with small_fs(tmp_path / "fs", "48m") as fs:
        runs = fs / "runs"
        filler = fs / "filler.bin"
        with monkeypatch.context() as m:
            _fill_after_budget(m, 1, size // 2, filler)  # half a checkpoint left
            code, lines = _cli(runs, cache_dir, monkeypatch, capsys)
        assert code == 2 and len(lines) == 1, lines
        hit = ONE_LINE.match(lines[0])
        assert hit, lines[0]
        run = next(runs.glob("*/*/checkpoints")).parent
        assert Path(hit["path"]) == run / "checkpoints/step-000002"
        assert _num(hit["needed"]) == pytest.approx(size, rel=0.01)  # the tensors' bytes
        assert _num(hit["free"]) < _num(hit["needed"])
        # the earlier checkpoint is intact and equal to the uninterrupted run's; nothing half
        # written is left (no step-2 folder, no temporary folder) and the run is not finished
        assert _same(_weights(run / "checkpoints/step-000001"),
                     _weights(ref / "checkpoints/step-000001"))
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
        assert RunFolder(run).read_record().status == "failed"
        assert (run / "train/resume.pt").exists()
        filler.unlink()  # space freed: the same command resumes from step 1
        code, lines = _cli(runs, cache_dir, monkeypatch, capsys)
        assert code == 0 and lines == []
        assert RunFolder(run).read_record().status == "finished"
        for label in ("step-000001", "step-000002", "step-000003"):
            assert _same(_weights(run / "checkpoints" / label), _weights(ref / "checkpoints" / label))


def test_a_resume_state_that_fills_a_small_disk(tmp_path, cache_dir, monkeypatch, capsys):
    """The resume state written after the step-2 checkpoint hits the full disk: the old
    resume state (step 1) stays and the rerun ends where an uninterrupted run ends."""
    code, _ = _cli(tmp_path / "ref", cache_dir, monkeypatch, capsys)
    assert code == 0
    ref = next((tmp_path / "ref").glob("*/*/checkpoints")).parent
    ckpt = (ref / "checkpoints/step-000002/model.safetensors").stat().st_size
    with small_fs(tmp_path / "fs", "48m") as fs:
        runs, filler = fs / "runs", fs / "filler.bin"
        from learnforget.train import run_state

        real = run_state.save_checkpoint

        def fill_after_step2_checkpoint(out, *a, **k):
            real(out, *a, **k)
            if out.name == "step-000002":  # room for nothing like a resume state (3x)
                free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
                filler.write_bytes(b"\0" * max(0, free - ckpt))

        from learnforget.train import loop

        with monkeypatch.context() as m:
            m.setattr(loop, "save_checkpoint", fill_after_step2_checkpoint)
            code, lines = _cli(runs, cache_dir, monkeypatch, capsys)
        assert code == 2 and len(lines) == 1, lines
        hit = ONE_LINE.match(lines[0])
        run = next(runs.glob("*/*/checkpoints")).parent
        assert hit and Path(hit["path"]) == run / "train/resume.pt", lines[0]
        assert _num(hit["needed"]) > 2 * ckpt  # weights and two Adam moments
        state = torch.load(run / "train/resume.pt", weights_only=False)
        assert state["progress"]["step"] == 1  # the earlier resume state, loadable
        assert not [p for p in (run / "train").iterdir() if p.name.endswith(".tmp")]
        filler.unlink()
        code, lines = _cli(runs, cache_dir, monkeypatch, capsys)
        assert code == 0 and lines == []
        assert _same(_weights(run / "checkpoints/step-000003"),
                     _weights(ref / "checkpoints/step-000003"))


def test_a_small_result_file_on_a_full_disk_keeps_the_old_one(tmp_path):
    with small_fs(tmp_path / "fs", "64k") as fs:
        target = fs / "eval" / "result.json"
        atomic_write_json(target, {"acc": 0.5})
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        (fs / "filler").write_bytes(b"\0" * free)
        big = {"items": ["x" * 100] * 2000}
        with pytest.raises(DiskFull) as err:
            atomic_write_json(target, big)
        need = len((json.dumps(big, indent=2) + "\n").encode())
        assert str(err.value).startswith(f"disk full writing {target}: no space left on device "
                                         f"(ENOSPC): it needs about {need:,} bytes, 0 bytes are "
                                         "free there")
        assert json.loads(target.read_text()) == {"acc": 0.5}
        assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_the_libraries_ways_of_saying_enospc_are_recognised(tmp_path):
    from safetensors.torch import save_file

    with small_fs(tmp_path / "fs", "64k") as fs:
        big = {"w": torch.zeros(100_000)}
        with open(fs / "a.pt", "wb") as f, pytest.raises(RuntimeError) as torch_err:
            torch.save(big, f)
        with pytest.raises(Exception) as st_err:
            save_file(big, str(fs / "b.safetensors"))
    assert is_disk_full(torch_err.value) and is_disk_full(st_err.value)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


def test_an_injected_enospc_in_the_shard_writer_leaves_no_partial_shard(tmp_path, monkeypatch):
    """Without root: a shard write that fails with ENOSPC part-way."""
    import numpy as np

    from learnforget.data import shards

    class FullFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 64:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    w = shards._ShardWriter(tmp_path, "train-00000.bin", np.dtype(np.uint16))
    w.f = FullFile(w.f)
    with pytest.raises(DiskFull, match=r"disk full writing \S+train-00000.bin: no space left"):
        for _ in range(100):
            w.add(list(range(10)), 0)
    assert list(tmp_path.iterdir()) == []  # the temporary shard is gone
