"""`learnforget node-check`: the first thing to run on a fresh node, before any study.

One verdict per item (ok / FAIL / skipped: reason); the exit status is 1 when any item FAILs.

    versions     torch, CUDA, NCCL, transformers, peft, lm-eval, bitsandbytes; FAIL when one is
                 missing, or when the node has a GPU (nvidia-smi) and torch sees none
    bf16         a bf16 matmul against float64 (relative error below 2e-2), on the GPU
                 (torch.cuda.is_bf16_supported) or the CPU (its bf16 instruction sets shown)
    all-reduce   NCCL over every GPU of the node (gloo over 2 CPU processes without one): the
                 sum is exact, and the bus bandwidth of a large all-reduce (as nccl-tests
                 reports it: algorithm bandwidth x 2 (n - 1) / n)
    fsdp         one FSDP2 step (learnforget's own sharding, one unit per decoder layer) of a
                 small Llama over the same ranks: the gathered weights equal one unsharded
                 process's SGD step on all ranks' batches (to 1e-4 of the update on CPU, 1e-3
                 on GPU: TF32-free fp32 matmuls in both, reduction order differs)
    memory       GPU only: the memory estimate (learnforget.train.params, what `learnforget
                 params` and the sweep's GPU fit use) against torch.cuda.max_memory_allocated
                 over two training steps of a ~0.1B Llama (full, bf16, AdamW): within 15%
    lm-eval      one batch of loglikelihood requests through lm-eval's HFLM on a small Llama,
                 against the same log-probabilities summed directly from the model's logits

On a CPU-only machine the GPU items are skipped with their reason and the rest runs in well
under a minute. The check writes nothing outside a temporary folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"
PACKAGES = ("torch", "transformers", "peft", "lm_eval", "bitsandbytes")
DIST_TIMEOUT_S = 180  # the whole multi-process part (process group, all-reduce, FSDP step)


@dataclass
class Item:
    name: str
    verdict: str  # ok | FAIL | skipped
    detail: str

    def line(self) -> str:
        verdict = f"skipped: {self.detail}" if self.verdict == SKIPPED else self.verdict
        detail = "" if self.verdict == SKIPPED else f"  {self.detail}"
        return f"{self.name:<11} {verdict}{detail}"


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------- items

def check_versions() -> Item:
    import torch

    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name.replace('_', '-'))}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    cuda = torch.version.cuda or "none (CPU build)"
    nccl = "none"
    if torch.cuda.is_available():
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    detail = (f"python {sys.version.split()[0]}, {', '.join(found)}, CUDA {cuda}, NCCL {nccl}, "
              f"GPUs {_gpus()}")
    if missing:
        return Item("versions", FAIL, f"{detail}; missing: {', '.join(missing)}")
    if shutil.which("nvidia-smi") and not torch.cuda.is_available():
        return Item("versions", FAIL, f"{detail}; nvidia-smi is here but torch sees no GPU "
                    "(a CPU build of torch, or CUDA_VISIBLE_DEVICES empty)")
    return Item("versions", OK, detail)


def check_bf16() -> Item:
    import torch

    on_gpu = _gpus() > 0
    if on_gpu and not torch.cuda.is_bf16_supported():
        return Item("bf16", FAIL, f"{torch.cuda.get_device_name(0)} does not support bf16")
    device = "cuda" if on_gpu else "cpu"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    ref = a.double() @ b.double()
    got = (a.to(device, torch.bfloat16) @ b.to(device, torch.bfloat16)).double().cpu()
    err = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
    if on_gpu:
        where = torch.cuda.get_device_name(0)
    else:
        from learnforget.runfolder import cpu_info

        cpu = cpu_info()
        where = (f"CPU, bf16 instructions: {', '.join(cpu['bf16_flags']) or 'none (emulated)'},"
                 f" torch kernels {cpu['torch_capability']}")
    verdict = OK if err < 2e-2 else FAIL
    return Item("bf16", verdict, f"{where}; bf16 matmul 512^3 relative error {err:.2e} "
                f"(limit 2e-2)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce(rank: int, world: int, device, elements: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    want = world * (world + 1) / 2
    got = float(x[0])
    exact = bool((x == want).all())
    y = torch.ones(elements, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        dist.all_reduce(y)
    sync()
    iters = 5
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(y)
    sync()
    dt = (time.perf_counter() - t0) / iters
    algbw = elements * 4 / dt
    return {"exact": exact, "want": want, "got": got, "bytes": elements * 4, "time_s": dt,
            "busbw_GBps": algbw * 2 * (world - 1) / world / 1e9}


def _fsdp_step(rank: int, world: int, device) -> dict[str, Any]:
    """One SGD step of a small Llama sharded per decoder layer; rank 0 compares the gathered
    weights with one unsharded model stepped on all ranks' batches."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnforget.methods.modules import decoder_layers
    from learnforget.train import distributed

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device).train()
    start = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model) if rank == 0 else None
    ids = torch.randint(0, cfg.vocab_size, (world, 2, 32),
                        generator=torch.Generator().manual_seed(1)).to(device)
    distributed.shard_model(model, decoder_layers(model))
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = model(input_ids=ids[rank], labels=ids[rank]).loss
    loss.backward()
    opt.step()
    full = distributed.full_state_dict(model)
    if rank != 0:
        return {}
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    ref_loss = sum(ref(input_ids=ids[r], labels=ids[r]).loss for r in range(world)) / world
    ref_loss.backward()
    ref_opt.step()
    want = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    update = max(float((want[k] - start[k]).abs().max()) for k in want)
    diff = max(float((full[k].float() - want[k]).abs().max()) for k in want)
    return {"tensors": len(want), "update": update, "diff": diff,
            "loss": float(loss.detach()), "same_keys": sorted(full) == sorted(want)}


def _rank_main(rank: int, world: int, port: int, backend: str, out: str) -> None:
    """One rank of the collective items; rank 0 writes the results to `out`."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=DIST_TIMEOUT_S))
    res: dict[str, Any] = {}
    try:
        for key, fn in (("allreduce", lambda: _allreduce(
                rank, world, device, (1 << 26) if backend == "nccl" else (1 << 22))),
                        ("fsdp", lambda: _fsdp_step(rank, world, device))):
            try:
                res[key] = fn()
            except Exception as e:  # reported as the item's FAIL; the other ranks time out
                res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


class Collectives:
    """The all-reduce and FSDP items over every GPU (NCCL) or 2 CPU processes (gloo), run in
    their own processes: started, then collected (the other items run meanwhile)."""

    def __init__(self, gpus: int):
        import multiprocessing as mp

        self.backend, self.world = ("nccl", gpus) if gpus >= 2 else ("gloo", 2)
        self._tmp = tempfile.TemporaryDirectory(prefix="learnforget-node-check-")
        self.out = Path(self._tmp.name) / "result.json"
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(r, self.world, port, self.backend,
                                                            str(self.out)))
                      for r in range(self.world)]
        for p in self.procs:
            p.start()
        self.deadline = time.monotonic() + DIST_TIMEOUT_S + 60

    def result(self) -> dict[str, Any]:
        for p in self.procs:
            p.join(max(1.0, self.deadline - time.monotonic()))
        stuck = [p for p in self.procs if p.is_alive()]
        for p in stuck:
            p.kill()
            p.join()
        res = json.loads(self.out.read_text()) if self.out.exists() else {}
        self._tmp.cleanup()
        return {"backend": self.backend, "world": self.world, "stuck": len(stuck),
                "exitcodes": [p.exitcode for p in self.procs], **res}


def collective_items(gpus: int, started: Collectives | None = None) -> list[Item]:
    r = (started or Collectives(gpus)).result()
    how = f"{r['backend']}, {r['world']} {'GPUs' if r['backend'] == 'nccl' else 'CPU processes'}"
    if gpus == 1:
        how += " (one GPU: NCCL needs two; gloo on the CPU instead)"
    items = []
    a = r.get("allreduce")
    if a is None:
        items.append(Item("all-reduce", FAIL, f"{how}: no result (exit codes {r['exitcodes']}, "
                          f"{r['stuck']} stuck)"))
    elif "error" in a:
        items.append(Item("all-reduce", FAIL, f"{how}: {a['error']}"))
    else:
        items.append(Item("all-reduce", OK if a["exact"] else FAIL,
                          f"{how}: sum {a['got']:g} (expected {a['want']:g}), "
                          f"{a['bytes'] / 2**20:.0f} MiB in {a['time_s'] * 1e3:.1f} ms, bus "
                          f"bandwidth {a['busbw_GBps']:.2f} GB/s"))
    f = r.get("fsdp")
    tol = 1e-3 if r["backend"] == "nccl" else 1e-4
    if f is None:
        items.append(Item("fsdp", FAIL, f"{how}: no result (exit codes {r['exitcodes']})"))
    elif "error" in f:
        items.append(Item("fsdp", FAIL, f"{how}: {f['error']}"))
    else:
        rel = f["diff"] / f["update"] if f["update"] else float("inf")
        good = f["same_keys"] and rel <= tol
        items.append(Item("fsdp", OK if good else FAIL,
                          f"{how}: one SGD step, {f['tensors']} tensors gathered; largest "
                          f"difference to one unsharded process {rel:.1e} of the update "
                          f"(limit {tol:g}), loss {f['loss']:.4f}"))
    return items


def check_memory(gpus: int) -> Item:
    if gpus == 0:
        return Item("memory", SKIPPED, "no CUDA GPU (the estimate is checked against "
                    "torch.cuda.max_memory_allocated on one)")
    import torch

    from learnforget.config import compose
    from learnforget.train.loop import setup
    from learnforget.train.params import param_report
    from learnforget.train.plan import micro_batch

    with tempfile.TemporaryDirectory(prefix="learnforget-node-check-") as tmp:
        overrides = ["model=tiny_llama", "model.arch.vocab_size=2048",
                     "model.arch.hidden_size=1024", "model.arch.intermediate_size=2816",
                     "model.arch.num_hidden_layers=8", "model.arch.num_attention_heads=8",
                     "model.arch.num_key_value_heads=8", "model.arch.attention_bias=false",
                     "model.arch.mlp_bias=false", "model.arch.max_position_embeddings=1024",
                     "method=full", "train.precision=bf16", "train.optimizer=adamw",
                     "train.batch_size=4", "train.seq_len=512", f"paths.runs_dir={tmp}/runs",
                     f"paths.cache_dir={tmp}/cache", "data=stdlib_code", "data.max_docs=64",
                     "data.heldout_docs=2", "logger=none", "train.checkpoints.unit=steps",
                     "train.checkpoints.at=[2]"]
        est = param_report(compose(overrides), device="cuda")
        s = setup(compose(overrides))
        s.model.train()
        torch.cuda.reset_peak_memory_stats()
        for i in range(2):  # the second step holds optimizer state
            b = {k: v.cuda() for k, v in micro_batch(s.data, s.plan, s.cfg.train, i, 0,
                                                      s.tokenizer.pad_token_id).items()}
            with s.policy.autocast(s.device):
                loss = s.model(**b).loss
            loss.backward()
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated()
    ratio = est.peak_bytes / peak
    return Item("memory", OK if abs(ratio - 1) <= 0.15 else FAIL,
                f"{est.total / 1e6:.0f}M-parameter Llama, full bf16 AdamW, 4 x 512: estimate "
                f"{est.peak_bytes / 2**30:.2f} GiB, max_memory_allocated {peak / 2**30:.2f} GiB "
                f"(ratio {ratio:.3f}, limit 1 +- 0.15)")


def check_lm_eval(gpus: int) -> Item:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnforget.assets.models import tiny_tokenizer

    device = "cuda" if gpus else "cpu"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4)).to(device).eval()
    pairs = [("The capital of France is", " Paris."), ("def add(a, b):", "\n    return a + b"),
             ("1, 2, 3,", " 4, 5"), ("Once upon a time", " there was a node.")]
    quiet = logging.getLogger("lm_eval")  # its notes on an in-memory model are expected here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=len(pairs), device=device)
    finally:
        quiet.setLevel(level)
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    want = []
    with torch.no_grad():
        for ctx, cont in pairs:
            whole, head = tok.encode(ctx + cont), tok.encode(ctx)
            ids = torch.tensor([whole], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            want.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(head), len(whole))))
    diff = max(abs(g - w) for g, w in zip(got, want, strict=True))
    return Item("lm-eval", OK if diff <= 1e-3 else FAIL,
                f"{len(pairs)} loglikelihood requests in one batch (HFLM, {device}); largest "
                f"difference to the model's own log-probabilities {diff:.1e} (limit 1e-3)")


# ----------------------------------------------------------------------------- the command

def _guard(name: str, fn: Callable[[], Any]) -> Any:
    """fn(), or [a FAIL item naming the exception]."""
    try:
        out = fn()
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return [Item(name, FAIL, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                     f" ({Path(tb.filename).name}:{tb.lineno})")]
    return [out] if isinstance(out, Item) else out


def run_checks(emit: Callable[[Item], None] = lambda i: None) -> list[Item]:
    """Every item in order, each passed to `emit` as it completes."""
    try:
        n = _gpus()
    except Exception:  # a broken CUDA install: the versions item says so
        n = 0
    items: list[Item] = []

    def done(out: list[Item]) -> None:
        for item in out:
            items.append(item)
            emit(item)

    done(_guard("versions", check_versions))
    done(_guard("bf16", check_bf16))
    started = _guard("all-reduce", lambda: Collectives(n))  # [a FAIL item] if it cannot start
    lm_eval = _guard("lm-eval", lambda: check_lm_eval(n))  # meanwhile, in this process
    done(_guard("all-reduce", lambda: collective_items(n, started))
         if isinstance(started, Collectives) else started)
    done(_guard("memory", lambda: check_memory(n)))
    done(lm_eval)
    return items


def main(args: list[str]) -> int:
    """`learnforget node-check [--json FILE]`: the verdicts, exit status 1 on any FAIL."""
    out = None
    if args[:1] == ["--json"] and len(args) == 2:
        out = Path(args[1])
    elif args:
        print(f"learnforget: error: node-check takes only --json FILE, got {' '.join(args)!r}",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    print(f"learnforget node-check on {socket.gethostname()}", flush=True)
    items = run_checks(lambda i: print(i.line(), flush=True))
    failed = [i.name for i in items if i.verdict == FAIL]
    print(f"{'FAIL: ' + ', '.join(failed) if failed else 'all ok'} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    if out is not None:
        from learnforget.files import atomic_write_json

        atomic_write_json(out, {"host": socket.gethostname(),
                                "items": [asdict(i) for i in items]})
    return 1 if failed else 0
