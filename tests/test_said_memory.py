"""SAID/DID keep no weight-sized tensor for the backward (learnforget.methods.said.linear):
gradients equal those of the parametrized path (W0 + λ P(θ_d) as a tensor, then the layer's own
forward) and of dense random matrices, with and without activation checkpointing; the tensors
autograd saves are counted with saved_tensors_hooks on real tensors; the meta-device estimate
follows."""

from __future__ import annotations

import pytest
import torch
from conftest import load_base as _base
from conftest import logits_input
from transformers import AutoModelForCausalLM

from learnforget.assets.models import build_config
from learnforget.config import run_name, validate
from learnforget.errors import ConfigError
from learnforget.methods.apply import apply_method
from learnforget.methods.said import model as said
from learnforget.train.activations import enable_checkpointing
from learnforget.train.params import cached_param_report, param_report


def _adapted(make_cfg, method: str, model: str, d: int = 40, targets: str = "all"):
    cfg = make_cfg(f"model={model}", f"method={method}", f"method.d={d}",
                   f"method.targets={targets}")
    adapted, _ = apply_method(_base(cfg), cfg.method, model_name=model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        adapted.intrinsic.theta.copy_(torch.randn(d, generator=gen) * 0.5)
        if adapted.intrinsic.lam is not None:
            lam = adapted.intrinsic.lam
            lam.copy_(1 + 0.3 * torch.randn(lam.numel(), generator=gen))
    return cfg, adapted


def _loss(model, **kwargs):
    ids = logits_input()
    return model(input_ids=ids, labels=ids.clone(), **kwargs).loss


def _parametrized_weights(model) -> dict[str, torch.Tensor]:
    """Each target's W0 + λ_i P_i(θ_d) as a tensor, differentiable in θ_d and λ through the
    Fastfood Function (the parametrization's forward: the path before IntrinsicLinear)."""
    return {name + ".weight": p(module.parametrizations.weight.original)
            for name, module, p in said.parametrizations(model)}


def _grads(model) -> list[torch.Tensor]:
    v = model.intrinsic
    out = [v.theta.grad.clone()] + ([] if v.lam is None else [v.lam.grad.clone()])
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method", ["said", "did"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_gradients_equal_the_parametrized_path(make_cfg, method, model):
    """Every linear weight reparametrised (so the input gradients flow through several
    IntrinsicLinear backwards); gpt2's Conv1D layers have the transposed layout."""
    cfg, adapted = _adapted(make_cfg, method, model)
    adapted.eval()
    loss = _loss(adapted)
    loss.backward()
    got = _grads(adapted)
    assert all(g.abs().sum() > 0 for g in got)

    ref = _base(cfg).eval()  # the same base, its forwards untouched, weights substituted
    ref_loss = torch.func.functional_call(
        ref, _parametrized_weights(adapted),
        kwargs={"input_ids": logits_input(), "labels": logits_input().clone()}).loss
    ref_loss.backward()
    want = _grads(adapted)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_gives_the_same_gradients(make_cfg):
    _, adapted = _adapted(make_cfg, "said", "tiny_llama")
    adapted.train()  # transformers checkpoints the decoder layers in training mode only
    loss = _loss(adapted)
    loss.backward()
    plain = _grads(adapted)
    enable_checkpointing(adapted)
    assert any(getattr(m, "gradient_checkpointing", False) for m in adapted.modules())
    loss_ck = _loss(adapted)
    loss_ck.backward()
    checkpointed = _grads(adapted)
    torch.testing.assert_close(loss_ck.detach(), loss.detach(), rtol=0, atol=0)
    for g, w in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def _saved_bytes(run, models) -> tuple[int, int]:
    """(bytes, storages) of the distinct non-parameter storages autograd saves while `run()`
    computes a loss (real tensors), found with torch's saved-tensor hooks."""
    params = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    del loss
    return sum(saved.values()), len(saved)


def _train_targets_only(model, names: list[str]):
    """Full finetuning of these linear weights alone (every other parameter frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    return model


def test_no_weight_sized_tensor_is_saved_for_the_backward(make_cfg):
    """SAID saves exactly what full finetuning of the same weights saves (the same
    activations; the weights are parameters); the parametrized path saves one float32
    W0 + ΔW per target on top."""
    cfg, adapted = _adapted(make_cfg, "said", "tiny_llama")
    adapted.eval()
    ids = logits_input()
    names = [n for n, _, _ in said.parametrizations(adapted)]
    full = _train_targets_only(_base(cfg).eval(), names)
    ref = _base(cfg).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = _parametrized_weights(adapted)
    keep = list(weights.values())  # built outside the hooks (as the parametrization would)

    def parametrized():
        return torch.func.functional_call(
            ref, dict(zip(weights, keep, strict=True)),
            kwargs={"input_ids": ids, "labels": ids.clone()}).loss

    said_bytes, _ = _saved_bytes(lambda: _loss(adapted), [adapted])
    full_bytes, _ = _saved_bytes(lambda: _loss(full), [full])
    old_bytes, _ = _saved_bytes(parametrized, [ref, adapted])
    target_bytes = sum(4 * w.numel() for w in keep)
    # by hand: 2 layers x (q, k, v, o: 64 x 64; gate, up, down: 64 x 256) in float32
    assert target_bytes == 2 * (4 * 64 * 64 + 3 * 64 * 256) * 4
    assert said_bytes == full_bytes
    # every W but layer 0's q, k, v: their input (the normed embeddings) needs no gradient
    assert old_bytes - full_bytes == target_bytes - 3 * 64 * 64 * 4


def test_meta_trace_keeps_no_weight(make_cfg):
    """The meta-device trace (learnforget params, the dry run) sees the same: SAID's traced
    activations are those of full finetuning of the same weights; through the parametrized
    path (the layers' own forwards, which read module.weight) one W0 + ΔW per target more."""
    from learnforget.train.activations import trace_activations

    cfg = make_cfg("method=said", "method.d=40")
    with torch.device("meta"):
        adapted, _ = apply_method(AutoModelForCausalLM.from_config(build_config(cfg.model)),
                                  cfg.method, model_name="tiny_llama")
        full = AutoModelForCausalLM.from_config(build_config(cfg.model))
    names = [n for n, _, _ in said.parametrizations(adapted)]
    _train_targets_only(full, names)
    vocab = int(full.config.vocab_size)
    said_act = trace_activations(adapted, 2, 16, vocab).activations_bytes
    assert said_act == trace_activations(full, 2, 16, vocab).activations_bytes
    for name in names:  # back to the layer's own forward: W0 + ΔW from the parametrization
        del adapted.get_submodule(name).forward
    old = trace_activations(adapted, 2, 16, vocab).activations_bytes
    assert old - said_act == (2 * (4 * 64 * 64 + 3 * 64 * 256) - 3 * 64 * 64) * 4


def test_peak_adds_the_largest_targets_workspace(make_cfg):
    """By hand, tiny_llama's largest targets are gate/up/down (64 x 256 = 16,384 entries,
    L = 2^14): 24 bytes x L + (4 + 4) bytes x 16,384 in float32; the peak adds it where the
    logits' gradients would be (they are gone by the first target's backward)."""
    rep = param_report(make_cfg("method=said", "method.d=40", "train.precision=fp32"))
    assert rep.workspace_bytes == 24 * 2**14 + 8 * 64 * 256
    assert rep.peak_bytes == rep.weights_bytes + rep.optimizer_bytes + rep.activations_bytes \
        + max(2 * rep.logits_bytes, rep.workspace_bytes)
    assert param_report(make_cfg("method=full")).workspace_bytes == 0


def test_merging_restores_the_layers_own_forward(make_cfg):
    _, adapted = _adapted(make_cfg, "said", "tiny_llama")
    adapted.eval()
    with torch.no_grad():
        before = adapted(input_ids=logits_input()).logits
    names = [n for n, _, _ in said.parametrizations(adapted)]
    merged = said.merge_intrinsic(adapted)
    for name in names:
        module = merged.get_submodule(name)
        assert type(module) is torch.nn.Linear and "forward" not in vars(module)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=logits_input()).logits, before,
                                   rtol=1e-5, atol=1e-6)


def test_rebuild_weight_false_keeps_each_weight_in_the_same_run(make_cfg):
    """method.rebuild_weight=false: the layers' own forwards (the parametrized path); the same
    run name, the kept weights in the traced activations (cached reports told apart), the same
    gradients."""
    on = make_cfg("method=said", "method.d=40", "train.precision=fp32")  # the bytes: float32
    off = make_cfg("method=said", "method.d=40", "method.rebuild_weight=false",
                   "train.precision=fp32")
    assert run_name(on) == run_name(off)
    kept = (2 * (4 * 64 * 64 + 3 * 64 * 256) - 3 * 64 * 64) * 4  # as above
    assert cached_param_report(off).activations_bytes \
        - cached_param_report(on).activations_bytes == kept
    assert "rebuild_weight=false" in cached_param_report(off).method_note
    grads = []
    for cfg in (on, off):
        model, notes = apply_method(_base(cfg), cfg.method, model_name="tiny_llama")
        assert said.rebuilds_weight(model) is (cfg is on)
        assert any("rebuild_weight=" + ("true" if cfg is on else "false") in n for n in notes)
        with torch.no_grad():
            model.intrinsic.theta.copy_(torch.linspace(-1, 1, 40))
        _loss(model.eval()).backward()
        grads.append(_grads(model))
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="method.rebuild_weight must be true or false.*'yes'"):
        validate(make_cfg("method=said", "method.rebuild_weight=yes"))
