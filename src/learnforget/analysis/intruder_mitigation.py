"""peft's intruder-dimension mitigation as an eval variant of a LoRA run.

    derived = mitigate_run(Path("runs/study/<lora run>"), mitigation_lambda=0.75)
    # then: learnforget eval <derived>   (and analyze: it is one more method setting)

For every checkpoint of a LoRA run, `peft.tuners.lora.intruders.reduce_intruder_dimension`
(top_k, threshold_epsilon, mitigation_lambda) rescales the intruder directions of W_base + ΔW
by λ and refits a rank-r adapter; the result is written as a sibling run folder
`<run>-intr<λ>` whose checkpoints are those adapters (same manifests, steps and tokens), with
method_summary `<summary>+intr<λ>`. Scored and analysed like any run, it shows what removing
intruders does to learning and forgetting next to the original.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, read_json
from learnforget.methods.registry import family
from learnforget.runfolder import MANIFEST, RunFolder


def mitigate_checkpoint(base_dir: Path, ckpt: Path, out: Path, *, top_k: int = 10,
                        threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75
                        ) -> dict[str, int]:
    """Write the mitigated adapter of one checkpoint to `out`; returns {module: intruders}."""
    import re

    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    import learnforget.assets.models  # noqa: F401 - quiet loading

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ckpt)
    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=threshold_epsilon,
                              mitigation_lambda=mitigation_lambda, logging_sink=lines.append)
    counts = {}
    for line in lines:
        m = re.match(r"base_model\.model\.(.+): (?:Intruders: (\d+)|No intruders)", line)
        if m:
            counts[m.group(1)] = int(m.group(2) or 0)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["intruder_reduced"])
    sub = tmp / "intruder_reduced"  # peft writes a non-default adapter into a subfolder
    src = sub if sub.exists() else tmp
    manifest = read_json(ckpt / MANIFEST) or {}
    atomic_write_json(src / MANIFEST, {**manifest, "intruder_mitigation": {
        "top_k": top_k, "threshold_epsilon": threshold_epsilon,
        "mitigation_lambda": mitigation_lambda, "intruders": counts, "source": str(ckpt)}})
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(src), str(out))
    shutil.rmtree(tmp, ignore_errors=True)
    return counts


def mitigate_run(run_dir: Path, *, top_k: int = 10, threshold_epsilon: float = 0.5,
                 mitigation_lambda: float = 0.75, cache_dir: Path | None = None) -> Path:
    """The sibling run `<run>-intr<λ>` with every checkpoint mitigated (see module doc)."""
    from learnforget.analysis.weights import base_model_folder

    run_dir = Path(run_dir)
    source = RunFolder(run_dir)
    info = source.read_record()
    method = info.run.method if info else None
    fam = family(str(method))
    if not fam.lora_adapter or fam.quantised:  # LoRA factors on the original base
        raise ConfigError(f"intruder mitigation needs a LoRA run, got method={method!r} in "
                          f"{run_dir} (expected lora or dora)")
    if not 0 <= mitigation_lambda <= 1:
        raise ConfigError(f"mitigation_lambda must be in [0, 1], got {mitigation_lambda!r}")
    base_dir = base_model_folder(run_dir, cache_dir)
    tag = f"intr{mitigation_lambda:g}"
    derived = RunFolder(run_dir.parent / f"{run_dir.name}-{tag}")
    out = derived.path
    derived.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    all_counts: dict[str, Any] = {}
    for ck in RunFolder(run_dir).checkpoint_dirs():
        all_counts[ck.name] = mitigate_checkpoint(
            base_dir, ck, derived.checkpoint(ck.name), top_k=top_k,
            threshold_epsilon=threshold_epsilon, mitigation_lambda=mitigation_lambda)
    if source.config.exists():
        shutil.copy2(source.config, derived.config)
    if source.tokenizer.is_dir():
        shutil.copytree(source.tokenizer, derived.tokenizer, dirs_exist_ok=True)
    info.run = replace(info.run, name=out.name, derived_from=str(run_dir),
                       method_summary=f"{info.run.method_summary}+{tag}")
    info.intruder_mitigation = {"top_k": top_k, "threshold_epsilon": threshold_epsilon,
                                "mitigation_lambda": mitigation_lambda, "intruders": all_counts}
    derived.write_record(info)
    (out / "DERIVED.txt").write_text(json.dumps({"from": str(run_dir), "by": "peft "
                                                 "reduce_intruder_dimension"}) + "\n")
    return out
