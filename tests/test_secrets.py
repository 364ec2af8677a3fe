"""Secrets (issue 29, item 4): with HF_TOKEN, HUGGING_FACE_HUB_TOKEN and WANDB_API_KEY set, no
file the harness writes holds them: run folders, configs, logs, W&B offline files, submitit
pickles, analysis outputs, the cache, and whatever lands in $HOME or $TMPDIR. Every file is
read as raw bytes, and gzip files and zip archives (torch's .pt files) are also read
unpacked. WANDB_MODE=offline is forced: a set WANDB_API_KEY must not take the mirror online."""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path

import pytest
from conftest import FAST

from learnforget.cli import main
from learnforget.tracking import wandb_mode

SECRETS = {
    "HF_TOKEN": "hf_fakeTokenForLeakTest0123456789abcd",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHubTokenForLeakTest9876543210",
    "WANDB_API_KEY": "fakewandbkeyforleaktest0123456789abcdef01",
}


def _contents(path: Path) -> list[bytes]:
    """The file's bytes, and those of what it packs (gzip, zip members)."""
    raw = path.read_bytes()
    out = [raw]
    if raw[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(raw))
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            out += [z.read(n) for n in z.namelist()]
    return out


def leaks(*roots: Path) -> list[str]:
    """`file: NAME` for each file under the roots that holds a secret's value."""
    found = []
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
            for blob in _contents(path):
                found += [f"{path}: {name}" for name, value in SECRETS.items()
                          if value.encode() in blob]
    return sorted(set(found))


def test_the_grep_finds_a_secret_in_plain_gzip_pickle_and_zip_files(tmp_path):
    value = SECRETS["HF_TOKEN"]
    (tmp_path / "a.txt").write_text(f"token={value}\n")
    (tmp_path / "b.gz").write_bytes(gzip.compress(value.encode()))
    (tmp_path / "c.pkl").write_bytes(pickle.dumps({"env": {"HF_TOKEN": value}}))
    with zipfile.ZipFile(tmp_path / "d.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("data.pkl", pickle.dumps(value))
    (tmp_path / "e.txt").write_text("nothing here")
    assert leaks(tmp_path) == [f"{tmp_path / n}: HF_TOKEN" for n in
                               ("a.txt", "b.gz", "c.pkl", "d.pt")]


@pytest.fixture
def secret_env(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
        (tmp_path / var.lower()).mkdir()
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _offline_only(runs: Path) -> None:
    folders = [p.name for p in runs.rglob("*") if p.is_dir() and p.parent.name == "wandb"
               and p.name.split("-")[0] in ("run", "offline")]
    assert folders and all(f.startswith("offline-run-") for f in folders), folders


def test_a_trained_and_analysed_run_holds_no_secret(secret_env, capsys):
    """Default suite: one run trained with the W&B mirror (offline despite the key), then
    analysed; every file written anywhere is searched."""
    assert wandb_mode("auto") == "offline"  # WANDB_MODE=offline wins over a set key
    root = secret_env
    assert main(["train", *FAST, "data.max_docs=8", "data.heldout_docs=2", "logger=wandb",
                 "method=lora"]) in (0, None)
    runs = root / "runs"
    assert main(["analyze", str(runs), "--out", str(root / "analysis")]) in (0, None)
    capsys.readouterr()
    _offline_only(runs)
    assert list((root / "analysis").iterdir())
    assert leaks(root) == []


STUDY = """
description: the secrets toy study (tests/test_secrets.py)
launcher: submitit_local
analyze: true
stages: [train, eval, spectra]
holds:
  - model=tiny_llama
  - data=stdlib_code
  - data.max_docs=8
  - data.heldout_docs=2
  - eval=demo_tiny
  - logger=wandb
  - train.batch_size=2
  - train.seq_len=32
  - train.checkpoints.unit=steps
  - train.checkpoints.at=[1,2]
  - train.heldout_batches=1
sweep:
  method: [full, lora]
gpu_hours_per_job: 0
"""


@pytest.mark.slow
def test_a_trained_scored_and_analysed_toy_study_holds_no_secret(secret_env, capsys):
    """Must-show 4: a toy study through submitit_local (its pickles and logs), trained, scored
    on the demo_tiny suite, its spectra taken and analysed; ~2 min on 2 busy cores."""
    from learnforget.studies.command import sweep_main

    root = secret_env
    study = root / "secrets_toy.yaml"
    study.write_text(STUDY)
    sweep_main(str(study), [f"paths.runs_dir={root / 'runs'}"])
    capsys.readouterr()
    runs = root / "runs"
    assert len(list((runs / "secrets_toy").glob("*/eval"))) == 2
    assert list(runs.rglob("*_submitted.pkl")) and list((runs / "secrets_toy").glob("_analysis/*"))
    _offline_only(runs)
    assert leaks(root) == []


def test_scrub_redacts_secret_names_and_keeps_token_counts():
    """config.yaml is reloaded by later stages: counts of tokens must survive the scrub (a
    prefix-tuning run's method.num_virtual_tokens, an eval task's max_new_tokens)."""
    from learnforget.tracking import scrub

    cfg = {"method": {"num_virtual_tokens": 20}, "data": {"expected_tokens": 10**9,
                                                            "shard_tokens": 2**20},
           "eval": {"tasks": [{"max_new_tokens": 48}]},
           "auth": {"hf_token": "x", "token": "y", "HF_TOKEN": "z", "wandb_api_key": "k",
                    "api-key": "k2", "db_password": "p", "client_secret": "s"}}
    out = scrub(cfg)
    assert out["method"] == {"num_virtual_tokens": 20}
    assert out["data"] == {"expected_tokens": 10**9, "shard_tokens": 2**20}
    assert out["eval"] == {"tasks": [{"max_new_tokens": 48}]}
    assert set(out["auth"].values()) == {"<redacted>"}
