"""train.speed (learnforget.train.speed, learnforget.train.lm_loss): each switch computes what the
path before it computed. References: torch's own for-loop AdamW, autocast's per-call casts,
transformers' unchunked loss and a float64 hand computation of the cross-entropy gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, OFFLINE_DATA, step_losses

from learnforget.errors import ConfigError
from learnforget.train import lm_loss, speed

BASE = [*FAST, "train.checkpoints.unit=steps", "train.checkpoints.at=[3]", "train.lr=1e-3",
        "train.num_threads=1", *OFFLINE_DATA["stdlib_code"]]
OLD_PATH = ["train.speed.optimizer_impl=for_loop", "train.speed.frozen_cast=false",
            "train.speed.loss_chunk=0"]


def _train(make_cfg, *overrides):
    from learnforget.train.loop import train

    return train(make_cfg(*BASE, *overrides))


@pytest.mark.parametrize("method", [["method=full"], ["method=lora", "method.r=4"]])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_path_keeps_the_loss_curve(make_cfg, method, precision):
    """fused AdamW + frozen cast + chunked loss against the path before them, same batches."""
    old = step_losses(_train(make_cfg, *method, f"train.precision={precision}", *OLD_PATH,
                             "experiment_name=old"))
    new = step_losses(_train(make_cfg, *method, f"train.precision={precision}",
                             "train.speed.loss_chunk=16", "experiment_name=new"))
    assert len(old) == len(new) == 3
    assert old[0] != 0 and all(abs(a - b) <= 2e-3 * abs(a) for a, b in zip(old, new, strict=True))
    assert old != step_losses(_train(make_cfg, *method, f"train.precision={precision}",
                                     "train.lr=1e-2", "experiment_name=other"))  # can fail


def test_chunked_loss_matches_a_float64_hand_computation():
    """Loss and the gradients of hidden states, weight and bias against softmax - one-hot."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True)
    y = torch.tensor([[3, 1, -100, 7, 0], [10, -100, 2, 2, 5]])
    loss = lm_loss._ChunkedHeadLoss.apply(h, w, b, y, 4.0, 3, torch.float32)
    (2.5 * loss).backward()
    hd, wd, bd = h.detach().double().reshape(-1, 8), w.detach().double(), b.detach().double()
    z = hd @ wd.T + bd
    p = torch.exp(z - z.logsumexp(-1, keepdim=True))
    yy = y.reshape(-1)
    ref = sum(-torch.log(p[i, yy[i]]) for i in range(10) if yy[i] != -100) / 4.0
    onehot = torch.zeros_like(p)
    for i in range(10):
        if yy[i] != -100:
            onehot[i, yy[i]] = 1.0
    gz = 2.5 * (p - onehot) * (yy != -100).double()[:, None] / 4.0
    assert loss.item() == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(h.grad.double().reshape(-1, 8), gz @ wd, atol=1e-6)
    assert torch.allclose(w.grad.double(), gz.T @ hd, atol=1e-6)
    assert torch.allclose(b.grad.double(), gz.sum(0), atol=1e-6)


def test_chunked_loss_matches_transformers_on_tiny_llama(make_cfg):
    from learnforget.train.loop import setup
    from learnforget.train.plan import micro_batch

    s = setup(make_cfg(*BASE, "method=full", "train.precision=fp32"))
    batch = micro_batch(s.data, s.plan, s.cfg.train, 0, s.cfg.seed, s.tokenizer.pad_token_id)
    ref = s.model(**batch, num_items_in_batch=100).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in s.model.named_parameters()}
    s.model.zero_grad(set_to_none=True)
    got = lm_loss.chunked_loss(s.model, batch, 7, num_items_in_batch=100)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in s.model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6), n


def test_chunked_loss_on_instructions_skips_the_unlabelled_positions(make_cfg, monkeypatch):
    """IFT (loss on the response only): the same loss and gradients as transformers' loss on the
    full logits, with the LM head applied to the labelled positions only."""
    from learnforget.train.loop import setup
    from learnforget.train.plan import micro_batch

    cfg = make_cfg(*BASE, "method=lora", "method.r=2", "method.dropout=0.0", "train.precision=fp32",
                   "train.batch_size=4", *OFFLINE_DATA["arith_ift"], data="arith_ift")
    s = setup(cfg)
    batch = micro_batch(s.data, s.plan, s.cfg.train, 0, s.cfg.seed, s.tokenizer.pad_token_id)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"].numel() // 2  # prompts and padding carry no label
    ref = s.model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}
    s.model.zero_grad(set_to_none=True)
    rows = []

    class CountingF:  # torch.nn.functional as lm_loss sees it, counting the head's rows
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def linear(self, x, *a, **k):
            rows.append(x.shape[0])
            return torch.nn.functional.linear(x, *a, **k)

    monkeypatch.setattr(lm_loss, "F", CountingF())
    got = lm_loss.chunked_loss(s.model, batch, 16)
    got.backward()
    assert sum(rows) == labelled  # the head ran on the labelled positions, none other
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ref_grads
    for n, p in s.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6), n


def test_frozen_cast_is_what_autocast_computes(make_cfg):
    """LoRA under bf16 autocast: logits and LoRA gradients bit-identical with the frozen linear
    weights cast once; the tied embedding / LM head is left in float32."""
    from learnforget.train.loop import setup
    from learnforget.train.plan import micro_batch

    cfgs = [make_cfg(*BASE, "method=lora", "method.r=4", "train.precision=bf16",
                     f"train.speed.frozen_cast={v}", f"experiment_name=c{v}")
            for v in ("false", "true")]
    out = []
    for cfg in cfgs:
        s = setup(cfg)
        batch = micro_batch(s.data, s.plan, s.cfg.train, 0, s.cfg.seed, s.tokenizer.pad_token_id)
        with s.policy.autocast("cpu"):
            loss = s.model(**batch).loss
        loss.backward()
        dtypes = {n: p.dtype for n, p in s.model.named_parameters()}
        out.append((loss.item(), {n: p.grad for n, p in s.model.named_parameters()
                                  if p.grad is not None}, dtypes, s.notes))
    (l0, g0, d0, _), (l1, g1, d1, notes1) = out
    assert l0 == l1 and g0.keys() == g1.keys()
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    cast = [n for n in d1 if d1[n] == torch.bfloat16]
    assert cast and all("base_layer" in n or n.endswith("lm_head.weight") for n in cast)
    assert not any("embed" in n or "norm" in n or "lora_" in n for n in cast)
    assert all(d0[n] == torch.float32 for n in d0)
    assert any("frozen_cast" in n for n in notes1)


def test_fused_adamw_is_chosen_and_falls_back(monkeypatch):
    from omegaconf import OmegaConf

    from learnforget.train.optim import make_optimizer

    p = [torch.nn.Parameter(torch.randn(3))]
    t = OmegaConf.create({"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                          "weight_decay": 0.0, "speed": {"optimizer_impl": "fused"}})
    opt, notes = make_optimizer(p, t, "cpu")
    assert opt.defaults["fused"] is True and "fused AdamW" in notes[0]
    t.speed.optimizer_impl = "for_loop"
    assert make_optimizer(p, t, "cpu")[0].defaults["foreach"] is False
    t.speed.optimizer_impl = "fused"  # a device without a fused kernel: torch raises, as here
    real = torch.optim.AdamW

    def no_fused(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point "
                               "Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt, notes = make_optimizer(p, t, "cpu")
    assert not opt.defaults["fused"] and "torch refused it" in notes[0]


@pytest.mark.parametrize("bad,match", [({"optimizer_impl": "fast"}, "optimizer_impl 'fast'"),
                                       ({"loss_chunk": -1}, "loss_chunk must be"),
                                       ({"compile": "yes"}, "compile must be"),
                                       ({"turbo": True}, "speed.turbo is unknown")])
def test_bad_speed_settings_name_the_value(bad, match):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=match):
        speed.settings(OmegaConf.create({"speed": bad}))


def test_compile_without_a_compiler_warns_and_stays_eager(monkeypatch):
    monkeypatch.setattr(speed, "inductor_compiler", lambda: None)
    m = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="no C..? compiler"):
        notes = speed.compile_model(m, True, "cpu")
    assert "eager" in notes[0] and m._compiled_call_impl is None


def test_speed_keys_do_not_rename_runs(make_cfg):
    from learnforget.config import run_name

    assert run_name(make_cfg(*BASE)) == run_name(make_cfg(*BASE, *OLD_PATH,
                                                          "train.speed.compile=true"))
