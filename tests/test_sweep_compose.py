"""A method x rank multirun composes; rank is ignored by full and its runs deduplicate."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_method_rank_multirun(tmp_path, cache_dir):
    runs = tmp_path / "runs"
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(runs), "LEARNFORGET_CACHE_DIR": str(cache_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "learnforget.cli", "train", "-m", "method=full,lora",
         "method.r=4,8", "debug=fast", "experiment_name=sweep", "data.max_docs=8",
         "data.heldout_docs=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    folders = sorted(p.name for p in (runs / "sweep").iterdir())
    assert len(folders) == 3, folders  # full (once), lora r4, lora r8
    assert sum(f.startswith("tiny_llama-full-") for f in folders) == 1
    assert out.stdout.count("is already finished") == 1
    for f in folders:
        info = json.loads((runs / "sweep" / f / "run.json").read_text())
        assert info["status"] == "finished"
        if info["run"]["method"] == "full":
            assert "r" in info["run"]["ignored_method_keys"]
