"""The LM head in fp32 against bf16 on the paired change of a real checkpoint (eval.head):

    PYTHONPATH=src python scripts/head_precision.py runs/default/<run> --checkpoint step-000008 \
        --subset hellaswag=100,arc_challenge=100,winogrande=100 --out /tmp/head_precision.json

Scores the base model and one checkpoint of the run (a full finetune's safetensors folder, or an
adapter, merged in fp32) on fixed seeded
subsets of HellaSwag, ARC-Challenge and WinoGrande (the demo suite's task definitions: lm-eval's
own YAMLs on the real data from `learnforget assets fetch`), with one body and three heads:

* `fp32`: learnforget.eval.head.Fp32Head, the harness's eval.head=fp32 (fp32 copy of the head
  weight, fp32 matmul, fp32 log-softmax);
* `bf16`: the head of a bf16 model, eval.head=model: logits rounded to bf16 after the matmul
  (fp32 accumulation, as bf16 GEMMs on GPUs do) and lm-eval's log-softmax of bf16 logits in
  bf16, as HFLM and the shared backend take it (softmax_dtype None);
* `fp64`: the reference, float64 matmul and log-softmax of the same hidden states and weight.

The body is that of a bf16 model (model=llama2_7b's dtype, loaded in bf16, eval.precision=model):
every weight rounded to bf16, and on a CPU without bf16 matrix units (where a bf16 matmul runs at
~1/50 of fp32's) its compute is emulated: fp32 arithmetic with every linear layer's, norm's and
decoder layer's output rounded to bf16 (what a bf16 GPU body stores; attention softmax stays
fp32, as in fused bf16 attention kernels). The body's output is memoised by its exact inputs, so
the three heads see identical hidden states and the body runs once per batch.

Prints per task and model: per-choice |Δll| of bf16 and fp32 heads against fp64 (max, mean), the
items whose chosen answer differs between bf16 and fp32 heads, and the paired change of the
checkpoint against the base (Δacc with its 95% paired-bootstrap interval, Δmargin) under each
head. `--out` keeps every per-item result. Nothing is written to the run folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from learnforget.assets.models import load_tokenizer
from learnforget.config import compose
from learnforget.eval.head import install_fp32_head
from learnforget.eval.lm_eval_run import evaluate
from learnforget.eval.paired import paired_change
from learnforget.eval.scoring import lm_class, load_for_eval
from learnforget.eval.suite import checked_specs, task_subsets
from learnforget.eval.task_yaml import write_task_dir
from learnforget.runfolder import RunFolder

HEADS = ("fp32", "bf16", "fp64")


class Bf16OutHead(torch.nn.Module):
    """A bf16 model's head: the matmul accumulated in fp32, its output rounded to bf16."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.w = weight.detach().float()

    def forward(self, hidden):
        return F.linear(hidden.float(), self.w).to(torch.bfloat16)


class Fp64Head(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.w = weight.detach().double()

    def forward(self, hidden):
        return hidden.double() @ self.w.T


def _round_bf16(module, args, output):
    if isinstance(output, torch.Tensor):
        return output.to(torch.bfloat16).to(output.dtype)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].to(torch.bfloat16).to(output[0].dtype), *output[1:])
    return output


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"-")
            continue
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                 else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def emulated_bf16_body(model) -> None:
    """Weights rounded to bf16; every linear (but the head), norm and decoder layer output
    rounded to bf16; the body's output memoised by its exact inputs (see the module doc)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    head = model.get_output_embeddings()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    body = model.model
    for m in body.modules():
        kind = type(m).__name__
        if m is not head and (isinstance(m, torch.nn.Linear) or kind.endswith("RMSNorm")
                              or kind.endswith("DecoderLayer") or isinstance(m, torch.nn.Embedding)):
            m.register_forward_hook(_round_bf16)
    memo: dict[str, torch.Tensor] = {}
    inner = body.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kw):
        key = _digest(input_ids, attention_mask if isinstance(attention_mask, torch.Tensor)
                      else None, position_ids)
        if key not in memo:
            kw["use_cache"] = False
            memo[key] = inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, **kw).last_hidden_state
        return BaseModelOutputWithPast(last_hidden_state=memo[key])

    body.forward = forward
    body._lf_memo = memo


def set_head(model, kind: str, weight: torch.Tensor, original) -> None:
    model.set_output_embeddings(original)
    if kind == "fp32":
        install_fp32_head(model)  # the harness's own eval.head=fp32
    elif kind == "bf16":
        model.set_output_embeddings(Bf16OutHead(weight))
    else:
        model.set_output_embeddings(Fp64Head(weight))


def load(run_cfg, folder: RunFolder, checkpoint: str | None, cache: Path):
    model = load_for_eval(run_cfg, folder.checkpoint(checkpoint) if checkpoint else None,
                          cache, "cpu")
    if hasattr(model, "merge_and_unload"):  # an adapter: its ΔW merged, in fp32
        model = model.merge_and_unload()
    return model.eval()


def score_heads(model, tok, ev, specs, include, subsets, backend: str) -> dict:
    weight = model.get_output_embeddings().weight.detach().clone()  # bf16-valued, as loaded
    original = model.get_output_embeddings()
    out = {}
    for kind in HEADS:
        set_head(model, kind, weight, original)
        lm = lm_class(model, backend)(pretrained=model, tokenizer=tok,
                                      batch_size=int(ev.batch_size))
        t0 = time.perf_counter()
        res = evaluate(lm, specs, include, batch_size=int(ev.batch_size), seed=int(ev.seed),
                       samples=subsets, items=True)
        out[kind] = {"tasks": res, "wall_s": time.perf_counter() - t0}
        print(f"  head {kind}: {out[kind]['wall_s']:.0f} s", flush=True)
    set_head(model, "model", weight, original)
    return out


def _chosen(items) -> np.ndarray:
    """The chosen answer per item (lm-eval's: argmax of the (length-normalised) lls)."""
    lens = items.get("lens")
    return np.array([int(np.argmax(np.asarray(v, float) / (np.asarray(lens[i], float)
                                                           if lens is not None else 1.0)))
                     for i, v in enumerate(items["lls"])])


def report(scores: dict) -> list[str]:
    lines = ["| model | task | items | bf16 head: max / mean abs(ll - ll64) | fp32 head: max / "
             "mean abs(ll - ll64) | max abs(ll_bf16 - ll_fp32) | choices flipped bf16 vs fp32 "
             "| acc bf16 / fp32 / fp64 |", "|---|---|---|---|---|---|---|---|"]
    for name, by_head in scores.items():
        for t in by_head["fp64"]["tasks"]:
            items = {k: by_head[k]["tasks"][t]["items"] for k in HEADS}
            lls = {k: np.concatenate([np.asarray(v, float) for v in items[k]["lls"]])
                   for k in HEADS}
            e_bf, e_fp = np.abs(lls["bf16"] - lls["fp64"]), np.abs(lls["fp32"] - lls["fp64"])
            flips = int((_chosen(items["bf16"]) != _chosen(items["fp32"])).sum())
            acc = [np.mean(items[k]["correct"]) for k in ("bf16", "fp32", "fp64")]
            lines.append(f"| {name} | {t} | {len(items['fp64']['correct'])} | "
                         f"{e_bf.max():.4f} / {e_bf.mean():.4f} | {e_fp.max():.2e} / "
                         f"{e_fp.mean():.2e} | {np.abs(lls['bf16'] - lls['fp32']).max():.4f} | "
                         f"{flips} | {acc[0]:.3f} / {acc[1]:.3f} / {acc[2]:.3f} |")
    lines += ["", "| task | head | Δacc [95% CI] | right→wrong / wrong→right | Δmargin [95% CI] |",
              "|---|---|---|---|---|"]
    base, ckpt = scores["base"], scores["checkpoint"]
    for t in base["fp64"]["tasks"]:
        for k in HEADS:
            p = paired_change(base[k]["tasks"][t]["items"], ckpt[k]["tasks"][t]["items"])
            lines.append(f"| {t} | {k} | {p['acc_delta']:+.4f} [{p['acc_delta_lo']:+.4f}, "
                         f"{p['acc_delta_hi']:+.4f}] | {p['right_to_wrong']} / "
                         f"{p['wrong_to_right']} | {p['margin_delta']:+.5f} "
                         f"[{p['margin_delta_lo']:+.5f}, {p['margin_delta_hi']:+.5f}] |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--subset", default="hellaswag=100,arc_challenge=100,winogrande=100",
                   help="items per task, task=N,... (fixed seeded subsets, eval.subset_seed 0)")
    p.add_argument("--backend", default="shared", choices=("hf", "shared"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/head_precision")
    p.add_argument("--out", default=None, help="write every per-item result here (JSON)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sizes = dict(kv.split("=") for kv in a.subset.split(","))
    ev = compose(["eval=demo"]).eval
    ev.tasks = [OmegaConf.merge(t, {"subset": int(sizes[t.name])}) for t in ev.tasks
                if t.name in sizes]
    folder = RunFolder(Path(a.run).resolve())
    run_cfg = OmegaConf.load(folder.config)
    cache = Path(run_cfg.paths.cache_dir).expanduser()
    specs = checked_specs(ev, cache)
    include = write_task_dir(specs, Path(a.work) / "tasks")
    subsets = task_subsets(ev, specs)
    tok = load_tokenizer(str(folder.tokenizer))
    scores = {}
    for name, checkpoint in (("base", None), ("checkpoint", a.checkpoint)):
        model = load(run_cfg, folder, checkpoint, cache)
        emulated_bf16_body(model)
        print(f"{name}:", flush=True)
        scores[name] = score_heads(model, tok, ev, specs, include, subsets, a.backend)
        del model
    lines = [f"run {folder.path.name}, checkpoint {a.checkpoint}, backend {a.backend}, "
             f"subsets {a.subset}", "", *report(scores)]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "report": lines, "scores": scores},
                                          default=str))


if __name__ == "__main__":
    main()
