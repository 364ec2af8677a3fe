"""The LM head of every scored log-likelihood in fp32 (eval.head).

A model scored in bf16 (`model=llama2_7b`, loaded in bfloat16, with eval.precision=model, or any
model with eval.precision=bf16) would compute its logits with a bf16 matmul and round them to
bf16: near logits of 10-20 the bf16 spacing is 0.06-0.125 nats, as large as the per-item margins
behind a 1-point forgetting change. With eval.head=fp32 (the default) `install_fp32_head`
replaces the model's output embedding (its `lm_head`, found with transformers'
`get_output_embeddings`) by `Fp32Head`: the final hidden state, whatever the body's dtype, is
upcast (exactly) to fp32 and multiplied by an fp32 copy of the head weight with autocast off,
so the logits come out in fp32 and every log-softmax taken from them (lm-eval's HFLM, the
shared-context backend, cross-entropy, drift, generation) runs in fp32. The copy is taken from
the weight as loaded, before eval.precision=bf16 casts the body. The base model and every
checkpoint of an eval stage are scored under the same policy (it is part of the eval key
wherever it changes results: `head_in_key`).

Memory: the fp32 copy of the weight (Llama-2-7B: 32,000 x 4,096 x 4 bytes = 524 MB; SmolLM2-135M:
113 MB, the weight itself when it already is fp32) and fp32 logits instead of bf16 ones, twice
the bytes of HFLM's [batch, length, vocab] logits and log-softmax (Llama-2-7B, 8 x 2,048 tokens:
2.1 GB each). The shared-context backend and drift compute logits at scored positions only
where the model allows (logits_to_keep), so no chunking is needed there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from learnforget.errors import ConfigError
from learnforget.eval.suite import head_policy


class Fp32Head(torch.nn.Module):
    """An output layer computing `hidden.float() @ W32.T (+ b32)` in fp32 with autocast off.
    `head` (the replaced nn.Linear, put back by eval.head=model) stays a submodule and its
    parameter `weight` is this module's too, so transformers' `tie_weights` (which lm-eval's
    HFLM calls) can re-tie it to the input embeddings as on any head; W32 is a plain attribute
    (not a parameter or buffer), so neither that nor a later `model.to(dtype)` can round it,
    and it follows the hidden state's device."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head
        self.weight = head.weight
        self.source_dtype = head.weight.dtype
        self._weight = head.weight.detach().to(torch.float32)
        self._bias = None if head.bias is None else head.bias.detach().to(torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._weight.device != hidden.device:
            self._weight = self._weight.to(hidden.device)
            self._bias = None if self._bias is None else self._bias.to(hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.to(torch.float32), self._weight, self._bias)


def _inner(model):
    """The transformers model under the eval wrappers (StripVirtualTokens, PeftModel)."""
    net = model
    while type(net).__name__ == "StripVirtualTokens":
        net = net.model
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def install_fp32_head(model) -> Fp32Head:
    """Replace the model's output layer by an Fp32Head (in place; a second call returns the one
    installed). A ConfigError where the head is not a plain linear layer (a quantised or
    adapted lm_head), which an fp32 copy would misrepresent."""
    net = _inner(model)
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if isinstance(head, Fp32Head):
        return head
    if type(head) is not torch.nn.Linear:
        raise ConfigError(f"eval.head=fp32 needs a plain nn.Linear output layer, this model's "
                          f"is {type(head).__name__}: use eval.head=model")
    fp32 = Fp32Head(head)
    net.set_output_embeddings(fp32)
    return fp32


def apply_head_policy(model, ev: DictConfig):
    """The model with eval.head's output layer (in place): `fp32` installs Fp32Head, `model`
    keeps (or puts back) the model's own layer."""
    if head_policy(ev) == "fp32":
        install_fp32_head(model)
        return model
    net = _inner(model)
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if isinstance(head, Fp32Head):
        net.set_output_embeddings(head.head)
    return model


def head_record(model, ev: DictConfig) -> dict[str, str]:
    """What a result records of its LM head: the policy, the dtype of the head's matmul and
    log-softmax input (`logits`), and the dtype of the weight it was taken from."""
    head = _inner(model).get_output_embeddings()
    if isinstance(head, Fp32Head):
        return {"policy": head_policy(ev), "logits": "float32",
                "weight": str(head.source_dtype).removeprefix("torch.")}
    dtype = str(getattr(getattr(head, "weight", None), "dtype", "unknown")).removeprefix("torch.")
    return {"policy": head_policy(ev), "logits": dtype, "weight": dtype}
