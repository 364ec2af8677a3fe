"""Bottleneck adapters (method=adapter): identity at init, Houlsby/Pfeiffer placement, training
through setup()/fit(), adapter-only checkpoints that reload to identical logits, resume,
exact parameter counts, spectra skipped, and clear errors for bad settings."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import eval_logits as _logits
from conftest import load_base as _base

import learnforget.train.loop as train_mod
from learnforget.analysis.deltas import extract_deltas
from learnforget.analysis.spectra import compute_spectra
from learnforget.config import compose, validate
from learnforget.errors import ConfigError
from learnforget.eval.scoring import load_for_eval
from learnforget.methods.apply import apply_method, count_parameters
from learnforget.methods.bottleneck import model as bottleneck
from learnforget.train.loop import fit, setup
from learnforget.train.params import param_report


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_fresh_adapter_leaves_base_logits_unchanged(make_cfg, model, placement):
    cfg = make_cfg(f"model={model}", "method=adapter", f"method.placement={placement}",
                   "method.adapter_act=gelu")
    base = _base(cfg)
    before = _logits(base)
    adapted, _ = apply_method(base, cfg.method, model_name=model)
    assert bottleneck.has_adapters(adapted)
    assert torch.equal(_logits(adapted), before)  # zero up-projection: exactly the identity


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_houlsby_has_two_adapters_per_layer_and_pfeiffer_one(make_cfg, model):
    counts = {}
    for placement in ("houlsby", "pfeiffer"):
        cfg = make_cfg(f"model={model}", "method=adapter", f"method.placement={placement}")
        adapted, _ = apply_method(_base(cfg), cfg.method, model_name=model)
        names = [n for n, _ in bottleneck.adapters(adapted)]
        n_layers = adapted.config.num_hidden_layers
        counts[placement] = len(names) / n_layers
        parents = {n.split(".")[-2] for n in names}
        assert parents == ({"mlp", "self_attn" if model == "tiny_llama" else "attn"}
                           if placement == "houlsby" else {"mlp"})
        assert adapted.bottleneck_spec["modules"] == [n.rsplit(".", 1)[0] for n in names]
        # only the adapters train
        assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
            f"{a}.{w}" for a in names for w in ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert counts == {"houlsby": 2, "pfeiffer": 1}


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_adapter_trains_saves_only_adapters_and_reloads_identically(make_cfg, model):
    cfg = make_cfg(f"model={model}", "method=adapter", "method.bottleneck=8", "train.lr=1e-2",
                   "train.checkpoints.at=[1,4]", "train.precision=fp32")
    s = setup(cfg)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in s.model.named_parameters()}
    out = fit(s)
    after = dict(s.model.named_parameters())
    for name, (trainable, value) in before.items():
        assert (not torch.equal(value, after[name].detach())) == trainable, name

    rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert len(held) == 3 and held[-1] < held[0], held  # base, step 1, step 4

    ckpt = out / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter.safetensors", "bottleneck_config.json", "manifest.json"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format"] == "bottleneck_adapter" and manifest["method"] == "adapter"
    spec = json.loads((ckpt / "bottleneck_config.json").read_text())
    assert spec["bottleneck"] == 8 and spec["placement"] == "houlsby"

    reloaded = load_for_eval(cfg, ckpt, Path(cfg.paths.cache_dir), "cpu")
    assert torch.equal(_logits(reloaded), _logits(s.model))
    assert not torch.equal(_logits(reloaded), _logits(_base(cfg)))  # the adapter matters


def test_resume_matches_an_uninterrupted_run(make_cfg, monkeypatch):
    """Stopped by SIGTERM after its first checkpoint, the run resumes from train/resume.pt and
    ends with the same adapter weights as a run that was never stopped."""
    common = ("method=adapter", "method.bottleneck=8", "train.lr=1e-2",
              "train.checkpoints.at=[2,3]", "train.num_threads=1")
    straight = fit(setup(make_cfg(*common, "experiment_name=straight")))

    cfg = make_cfg(*common, "experiment_name=stopped")
    real_save = train_mod.save_checkpoint

    def save_then_signal(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by fit(): stop at this step boundary

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_signal)
    run = fit(setup(cfg))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["train"]["steps_done"] == 2
    assert (run / "train/resume.pt").exists()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)

    fit(setup(cfg))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and "resumed from step 2" in info["train"]["notes"]
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints/step-000003/adapter.safetensors")
    b = load_file(run / "checkpoints/step-000003/adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_spectra_skip_adapter_runs_with_a_note(make_cfg, capsys):
    cfg = make_cfg("method=adapter", "method.bottleneck=4", "train.checkpoints.at=[1]")
    run = fit(setup(cfg))
    assert extract_deltas(run, "step-000001") is None
    assert compute_spectra(run, cache_dir=Path(cfg.paths.cache_dir)) == []
    assert "method=adapter changes no weight matrix" in capsys.readouterr().out
    assert not (run / "spectra").exists()


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "smollm2_135m"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_params_counts_match_the_built_model(make_cfg, model, placement):
    cfg = make_cfg(f"model={model}", "method=adapter", "method.bottleneck=16",
                   f"method.placement={placement}")
    rep = param_report(cfg)
    per_layer = 2 if placement == "houlsby" else 1
    arch = cfg.model.arch
    d = arch.get("hidden_size") or arch.get("n_embd")
    n_layers = arch.get("num_hidden_layers") or arch.get("n_layer")
    expected = n_layers * per_layer * (2 * d * 16 + 16 + d)
    assert rep.trainable == expected
    assert rep.total == rep.base_total + expected
    assert rep.grads_bytes == 4 * expected  # float32 adapters, like peft's
    if model != "smollm2_135m":  # the real weights are not needed for the count
        adapted, _ = apply_method(_base(cfg), cfg.method, model_name=model)
        assert count_parameters(adapted) == (rep.trainable, rep.total)


def test_llama2_7b_count_by_hand():
    rep = param_report(compose(["model=llama2_7b", "method=adapter", "method.bottleneck=64"]))
    d, L = 4096, 32
    assert rep.trainable == L * 2 * (2 * d * 64 + 64 + d)


@pytest.mark.parametrize(("override", "message"), [
    ("method.bottleneck=0", "method.bottleneck must be a positive integer.*got 0"),
    ("method.bottleneck=-8", "method.bottleneck must be a positive integer.*got -8"),
    ("method.bottleneck=2.5", "method.bottleneck must be a positive integer.*got 2.5"),
    ("method.placement=middle", "method.placement 'middle' is unknown.*houlsby, pfeiffer"),
    ("method.adapter_act=swishy", "method.adapter_act 'swishy' is unknown.*relu, gelu"),
])
def test_bad_settings_are_clear_errors(make_cfg, override, message):
    cfg = make_cfg("method=adapter", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    with pytest.raises(ConfigError, match=message):
        setup(cfg)


def test_run_name_and_ignored_keys(make_cfg):
    from learnforget.config import run_name

    cfg = make_cfg("method=adapter", "method.bottleneck=32", "method.placement=pfeiffer")
    assert run_name(cfg).startswith("tiny_llama-adapter_b32_pfeiffer_relu-stdlib_code")
    # the adapter keys do not change other methods' runs
    assert run_name(make_cfg("method=lora", "method.bottleneck=32")) == run_name(
        make_cfg("method=lora"))


def test_job_trains_evaluates_and_skips_spectra(make_cfg):
    """train -> eval (cross-entropy only) -> spectra (skipped), as a sweep job runs it."""
    from learnforget.studies.job import job_state, run_job

    cfg = make_cfg("method=adapter", "method.bottleneck=4", "train.lr=1e-2",
                   "train.checkpoints.at=[1]", "eval=smoke", "eval.tasks=[]",
                   "eval.diversity.prompts=[]", "eval.limit=4")
    result = run_job(cfg)
    assert result["stages"] == {"train": "done", "eval": "done", "spectra": "done"}
    rows = json.loads((Path(result["run_dir"]) / "eval/summary-smoke.json").read_text())["rows"]
    assert [r["checkpoint"] for r in rows] == ["base", "step-000001"]
    assert rows[1]["target_ce"] != rows[0]["target_ce"]  # the trained adapter is loaded
    assert job_state(cfg)[0] == "done"


@pytest.mark.slow
def test_smollm2_adapter_lowers_heldout_code_loss(tmp_path):
    """Real SmolLM2-135M (Llama architecture) from the cache: Houlsby adapters train."""
    cache = os.environ.get("LEARNFORGET_CACHE_DIR", str(Path.home() / ".cache/learnforget"))
    cfg = compose([f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache}", "logger=none",
                   "model=smollm2_135m", "method=adapter", "method.bottleneck=32",
                   "data=stdlib_code", "data.max_docs=60", "data.heldout_docs=8",
                   "train.seq_len=128", "train.batch_size=4", "train.lr=1e-3",
                   "train.checkpoints.unit=steps", "train.checkpoints.at=[6]",
                   "train.heldout_batches=4"])
    s = setup(cfg)
    assert s.trainable == 30 * 2 * (2 * 576 * 32 + 32 + 576)
    out = fit(s)
    rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert len(held) == 2 and held[1] < held[0] - 0.01, held
    reloaded = load_for_eval(cfg, out / "checkpoints/step-000006", Path(cache), "cpu")
    assert torch.equal(_logits(reloaded), _logits(s.model))
