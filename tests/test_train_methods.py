"""Every method trains on tiny_llama, and only its trainable parameters move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE_DATA

from learnforget.config import conf_dir, run_name
from learnforget.methods.registry import BUILTIN, is_data_method, validate_method
from learnforget.runfolder import RunFolder
from learnforget.train.loop import fit, setup

CONF = conf_dir()
ALL_METHODS = sorted(p.stem for p in (CONF / "method").glob("[!_]*.yaml"))
ALL_DATA = sorted(p.stem for p in (CONF / "data").glob("[!_]*.yaml"))


def test_config_groups_list_every_method(make_cfg):
    assert set(BUILTIN) <= set(ALL_METHODS)
    for method in ALL_METHODS:  # each file is a method of that name: built in or peft by data
        cfg = make_cfg(f"method={method}").method
        validate_method(cfg)
        assert cfg.name == method
        assert (method in BUILTIN) != is_data_method(cfg)
    assert {"vera", "loha"} <= set(ALL_METHODS) - set(BUILTIN)  # added by YAML alone


@pytest.mark.parametrize("data", ALL_DATA)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_x_data_composes(make_cfg, method, data):
    cfg = make_cfg(f"method={method}", data=data)
    assert cfg.method.name == method and cfg.data.name == data
    assert cfg.data.regime in ("cpt", "ift")
    assert run_name(cfg).startswith(f"tiny_llama-{method}")


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_two_steps_change_exactly_the_trainable_parameters(make_cfg, method):
    cfg = make_cfg(f"method={method}", "method.r=4", "method.num_virtual_tokens=4")
    s = setup(cfg)
    before = _snapshot(s.model)
    n_trainable = sum(t for t, _ in before.values())
    assert 0 < n_trainable
    out = fit(s)

    after = dict(s.model.named_parameters())
    for name, (trainable, value) in before.items():
        changed = not torch.equal(value, after[name].detach())
        assert changed == trainable, f"{method}: {name} trainable={trainable} changed={changed}"
    info = RunFolder(out).read_record()
    assert info.status == "finished"
    assert info.train.steps_done == 2
    assert info.train.checkpoints == ["step-000001", "step-000002"]
    rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)


@pytest.mark.parametrize("data", sorted(OFFLINE_DATA))
def test_each_offline_data_set_trains(make_cfg, data):
    cfg = make_cfg("method=lora", "method.r=4", data=data)
    s = setup(cfg)
    if cfg.data.regime == "ift":  # the loss is on response tokens only
        ex = s.data.train[0]
        assert ex.labels[0] == -100 and any(lbl != -100 for lbl in ex.labels)
    out = fit(s)
    manifest = json.loads((out / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["tokens"] > 0
    assert manifest["heldout_loss"] > 0
    assert (out / "checkpoints" / "step-000002" / "adapter_model.safetensors").exists()


def test_full_checkpoint_is_safetensors_and_run_is_skipped_when_finished(make_cfg, capsys):
    cfg = make_cfg("method=full")
    out = fit(setup(cfg))
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    stamp = (out / "run.json").stat().st_mtime_ns
    assert setup(cfg) is None  # finished: nothing is loaded or rewritten
    assert "already finished" in capsys.readouterr().out
    assert (out / "run.json").stat().st_mtime_ns == stamp


def test_rank_is_ignored_by_full_and_runs_deduplicate(make_cfg):
    full16, full64 = make_cfg("method=full", "method.r=16"), make_cfg("method=full", "method.r=64")
    lora16, lora64 = make_cfg("method=lora", "method.r=16"), make_cfg("method=lora", "method.r=64")
    assert run_name(full16) == run_name(full64)
    assert run_name(lora16) != run_name(lora64)
    assert "r16_a32" in run_name(lora16) and "r64_a128" in run_name(lora64)  # alpha = 2r
    s = setup(full16)
    assert "method.r is ignored by method=full" in s.notes


def test_a_yaml_method_is_identified_by_its_peft_section(make_cfg):
    vera = make_cfg("method=vera")
    assert "-vera_r256_all-" in run_name(vera)
    assert "-vera_r64_all-" in run_name(make_cfg("method=vera", "method.r=64"))  # ${..r}
    assert run_name(make_cfg("method=vera", "method.top_k=5")) == run_name(vera)  # not read
    changed = make_cfg("method=vera", "method.peft.d_initial=0.5")
    assert run_name(changed) != run_name(vera) and "-vera_r256_all-" in run_name(changed)
    lora = make_cfg("method=lora")  # a built-in's peft section names the type only...
    extra = make_cfg("method=lora", "+method.peft.lora_bias=true")  # ...an added argument counts
    assert run_name(extra) != run_name(lora)
    s = setup(make_cfg("method=vera", "method.r=4", "method.targets=attention"))
    peft_cfg = s.model.peft_config["default"]
    assert type(peft_cfg).__name__ == "VeraConfig" and peft_cfg.r == 4
    assert set(peft_cfg.target_modules) == {"self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj", "self_attn.o_proj"}
    assert "method.top_k is ignored by method=vera" in s.notes


def test_alpha_override_and_targets_sets(make_cfg):
    from learnforget.methods.modules import resolve_targets

    cfg = make_cfg("method=lora", "method.alpha=8", "method.targets=attention")
    s = setup(cfg)
    peft_cfg = s.model.peft_config["default"]
    assert peft_cfg.lora_alpha == 8
    assert set(peft_cfg.target_modules) == {"self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj", "self_attn.o_proj"}
    base = s.model.get_base_model()
    assert set(resolve_targets(base, "mlp")) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(resolve_targets(base, "all")) == 7


def test_topk_trains_only_the_last_blocks(make_cfg):
    s = setup(make_cfg("method=topk", "method.top_k=1"))
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm")) for n in trainable)
    assert any(n.startswith("model.norm") for n in trainable)


def test_bitfit_on_gpt2_trains_only_biases(make_cfg):
    s = setup(make_cfg("model=tiny_gpt2", "method=bitfit"))
    trainable = [n for n, p in s.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)


def test_lora_on_gpt2_conv1d_targets(make_cfg):
    s = setup(make_cfg("model=tiny_gpt2", "method=lora", "method.targets=mlp"))
    assert set(s.model.peft_config["default"].target_modules) == {"mlp.c_fc", "mlp.c_proj"}


def test_schedules_and_optimizers_run(make_cfg):
    for opt, sched in [("lionw", "inverse_sqrt"), ("adamw8bit", "constant"),
                       ("paged_adamw", "cosine"), ("lion", "cosine")]:
        cfg = make_cfg("method=lora", f"train.optimizer={opt}", f"train.schedule={sched}",
                       f"experiment_name={opt}")
        s = setup(cfg)
        if opt == "paged_adamw" and s.device == "cpu":
            assert any("needs CUDA" in n for n in s.notes)
        out = fit(s)
        rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
        assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN


def test_token_budget_checkpoints(make_cfg):
    # seq 32 x batch 2 = 64 tokens per step: budgets 64 and 192 tokens -> steps 1 and 3.
    cfg = make_cfg("train.checkpoints.unit=tokens", "train.checkpoints.at=[64,192]")
    out = fit(setup(cfg))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["token-000000064", "token-000000192"]
    m = json.loads((out / "checkpoints" / "token-000000192" / "manifest.json").read_text())
    assert m["step"] == 3 and m["tokens"] == 192


def test_epoch_checkpoints_for_ift(make_cfg):
    cfg = make_cfg("train.checkpoints.unit=epochs", "train.checkpoints.at=[1,2]",
                   "train.batch_size=8", data="arith_ift")
    s = setup(cfg)
    per_epoch = len(s.data.train) // 8 + (len(s.data.train) % 8 > 0)
    assert s.plan.total_steps == 2 * per_epoch
    out = fit(s)
    assert json.loads((out / "checkpoints/epoch-1/manifest.json").read_text())["epoch"] == 1.0


def test_run_folder_layout(make_cfg):
    out = fit(setup(make_cfg("method=lora")))
    assert out.parent.name == "default" and Path(out).name.startswith("tiny_llama-lora_r16_a32_all")
    for rel in ("config.yaml", "run.json", "train/metrics.jsonl", "tokenizer/tokenizer.json"):
        assert (out / rel).exists(), rel
    assert not (out / "train/resume.pt").exists()  # a finished run keeps no resume state
    info = RunFolder(out).read_record()
    assert info.meta.versions["torch"].startswith("2.")
    assert info.train.trainable_params < info.train.total_params
    assert info.train.peak_mem_mb > 0 and info.train.wall_time_s > 0


def test_grad_accumulation_matches_the_larger_batch(make_cfg):
    """CPT blocks have equal length, so 2 x 1 accumulated equals 1 x 2 (same data order); fp32
    compute, since bf16 rounds a batch of 2 and two of 1 differently."""
    from learnforget.train.plan import micro_batch

    one = setup(make_cfg("method=full", "train.batch_size=2", "train.grad_accum=1",
                         "experiment_name=a", "train.checkpoints.at=[1]", "train.precision=fp32"))
    two = setup(make_cfg("method=full", "train.batch_size=1", "train.grad_accum=2",
                         "experiment_name=b", "train.checkpoints.at=[1]", "train.precision=fp32"))
    for s in (one, two):  # no dropout in a plain Llama: the step is deterministic
        s.model.zero_grad()
    b = micro_batch(one.data, one.plan, one.cfg.train, 0, 0, one.tokenizer.pad_token_id)
    one.model(**b).loss.backward()
    for k in range(2):
        mb = {key: v[k:k + 1] for key, v in b.items()}
        (two.model(**mb).loss / 2).backward()
    for (n, p), (_, q) in zip(one.model.named_parameters(), two.model.named_parameters(),
                              strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)
    one.model.zero_grad(set_to_none=True)
    two.model.zero_grad(set_to_none=True)
    out_a, out_b = fit(one), fit(two)
    wa = dict(one.model.named_parameters())
    for n, q in two.model.named_parameters():
        torch.testing.assert_close(wa[n], q, atol=1e-5, rtol=1e-4, msg=n)
    assert out_a != out_b


def test_bf16_autocast_and_prompt_text_init(make_cfg):
    s = setup(make_cfg("method=prompt", "method.prompt_init=text",
                       "method.prompt_init_text='def main'", "method.num_virtual_tokens=4",
                       "train.precision=bf16"))
    assert s.autocast_dtype == torch.bfloat16
    emb = s.model.get_input_embeddings().weight
    ids = s.tokenizer("def main", add_special_tokens=False)["input_ids"]
    prompt = s.model.prompt_encoder["default"].embedding.weight
    # text init: the virtual tokens start as the embeddings of the text's tokens (repeated)
    torch.testing.assert_close(prompt[0], emb[ids[0]])
    out = fit(s)
    info = RunFolder(out).read_record()
    assert info.train.precision == "bf16" and info.status == "finished"
