"""The Method protocol (learnforget.methods.base): outside methods/ the harness asks the method's
object and never compares method names; a family package registers itself; run names are the
ones the string-based registry gave."""
from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from learnforget.config import compose, run_name
from learnforget.errors import ConfigError
from learnforget.methods import registry
from learnforget.methods.base import Method

PKG = Path(__file__).resolve().parents[1] / "src" / "learnforget"
# where `method` names something other than a finetuning method
NOT_A_METHOD = {
    "analysis/svd.py": "top_singular(method=...) is the SVD route: full | partial | truncated",
}


def _names() -> set[str]:
    return set(registry.methods()) | {"vera", "loha"}


def _is_name_constant(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
    return False


def name_comparisons(source: str, names: set[str]) -> list[str]:
    """`x == "qlora"`, `name in ("lora", "dora")`, ... where the other side mentions a method:
    one line per comparison found."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        operands = [node.left, *node.comparators]
        for i, side in enumerate(operands):
            others = [ast.unparse(o) for j, o in enumerate(operands) if j != i]
            if _is_name_constant(side, names) and any("method" in o.lower() for o in others):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_the_scanner_flags_name_comparisons_and_not_other_strings():
    names = _names()
    bad = textwrap.dedent("""
        if cfg.method.name == "qlora": pass
        if method not in ("lora", "dora"): pass
        full = g[g["method"] == "full"]
        ok = cfg.method.name == other
        route = "full" if method_route == 1 else None
        if kind == "LORA": pass
        if "lora" in models: pass
    """)
    assert [f.split(": ")[1] for f in name_comparisons(bad, names)] == [
        "cfg.method.name == 'qlora'", "method not in ('lora', 'dora')",
        "g['method'] == 'full'"]


def test_no_method_name_comparison_outside_methods():
    names = _names()
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("methods/") or rel in NOT_A_METHOD:
            continue
        found += [f"{rel}:{f}" for f in name_comparisons(path.read_text(), names)]
    assert found == [], ("ask the Method object (learnforget.methods.registry.method_of / family) "
                         "instead of comparing method names:\n" + "\n".join(found))


def test_the_grep_of_issue_27_finds_nothing_outside_methods():
    import re

    pattern = re.compile(r'method\.name ==|method\.name in|\.name == "qlora"|LORA_FAMILY|'
                         r'BASE_WEIGHT_METHODS')
    hits = [f"{p.relative_to(PKG)}:{i}" for p in PKG.rglob("*.py")
            if not p.relative_to(PKG).as_posix().startswith("methods/")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# Recorded with the string-based registry (commit f9aa9bd) before the protocol: the names
# must not change (a changed name retrains a finished study).
PINNED = {
    "method=full": "tiny_llama-full-stdlib_code-s0-23a495",
    "method=qlora": "tiny_llama-qlora_r16_a32_all_nf4_dq_float32-stdlib_code-s0-f79295",
    "method=prompt": "tiny_llama-prompt_v20_initrandom-stdlib_code-s0-330fe0",
    "method=topk": "tiny_llama-topk_k2-stdlib_code-s0-25db02",
    "method=adapter": "tiny_llama-adapter_b64_houlsby_relu-stdlib_code-s0-6a50a9",
    "method=vera": "tiny_llama-vera_r256_all-stdlib_code-s0-07a237",
    "method=loha": "tiny_llama-loha_r8_all-stdlib_code-s0-e531c5",
    "method=lora method.init=eva": "tiny_llama-lora_r16_a32_all_eva_cb8-stdlib_code-s0-5ebc75",
    "method=qlora method.init=loftq":
        "tiny_llama-qlora_r16_a32_all_nf4_dq_float32_loftq_it1-stdlib_code-s0-3a5042",
    "method=qlora method.quant_type=int8":
        "tiny_llama-qlora_r16_a32_all_int8_float32-stdlib_code-s0-e0247a",
    "method=adapter method.placement=pfeiffer":
        "tiny_llama-adapter_b64_pfeiffer_relu-stdlib_code-s0-fa0f99",
    "method=lora +method.peft.use_dora=true": "tiny_llama-lora_r16_a32_all-stdlib_code-s0-ecc272",
}


def test_run_names_are_the_ones_the_string_registry_gave():
    got = {k: run_name(compose(k.split())) for k in PINNED}
    assert got == PINNED


def test_registry_holds_every_conf_method_and_the_family_package():
    conf = Path(__file__).resolve().parents[1] / "conf" / "method"
    yaml_names = {p.stem for p in conf.glob("*.yaml") if not p.stem.startswith("_")}
    ms = registry.methods()
    assert type(ms["adapter"]).__module__ == "learnforget.methods.bottleneck"
    data = {n for n in yaml_names - set(ms)}
    assert data == {"vera", "loha"}  # described by their peft: section alone
    for n in data:
        cfg = compose([f"method={n}"]).method
        assert type(registry.method_of(cfg)).__name__ == "PeftMethod"
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        registry.method_of(OmegaConf.create({"name": "nope"}))


def test_what_the_harness_asks_each_family():
    def ask(*overrides):
        cfg = compose(list(overrides)).method
        return registry.method_of(cfg), cfg

    m, cfg = ask("method=qlora", "method.quant_type=int8")
    q = m.quantisation(cfg)
    assert (q.quant_type, q.label, q.base_suffix) == ("int8", "int8", "-8bit-int8-float32")
    assert m.base_config(cfg) is cfg and not m.shares_base_in_eval(cfg)
    m, cfg = ask("method=qlora")
    assert (m.quantisation(cfg).label, m.quantisation(cfg).base_suffix) == (
        "nf4+dq", "-4bit-nf4-dq-float32")
    assert m.counting_config(cfg).name == "lora" and m.label(cfg) == "qlora r=16"
    m, cfg = ask("method=lora")
    assert m.quantisation(cfg) is None and m.base_config(cfg).name == "full"
    assert m.shares_base_in_eval(cfg) and m.checkpoint_format(cfg) == "peft_adapter"
    assert m.per_rank_reason(cfg) is None
    m, cfg = ask("method=lora", "method.init=pissa")
    assert "pissa" in m.per_rank_reason(cfg)
    m, cfg = ask("method=prefix")
    assert not m.shares_base_in_eval(cfg) and m.checkpoint_format(cfg) == "peft_adapter"
    m, cfg = ask("method=prompt", "method.prompt_init=text")
    assert m.counting_config(cfg).prompt_init == "random" and "embeddings" in m.per_rank_reason(cfg)
    m, cfg = ask("method=adapter")
    assert m.checkpoint_format(cfg) == "bottleneck_adapter" and not m.shares_base_in_eval(cfg)
    assert m.delta_route("bottleneck_adapter", {}, Path("."), "factors") is None
    flags = {n: (m.trains_base_weights, m.lora_adapter, m.quantised, m.reference)
             for n, m in registry.methods().items()}
    assert flags == {"full": (True, False, False, True), "bitfit": (True, False, False, False),
                     "topk": (True, False, False, False), "lora": (False, True, False, False),
                     "dora": (False, True, False, False), "qlora": (False, True, True, False),
                     "ia3": (False,) * 4, "prefix": (False,) * 4, "prompt": (False,) * 4,
                     "adapter": (False,) * 4, "said": (False,) * 4, "did": (False,) * 4}


def test_full_weight_checkpoints_and_lora_factors_route_their_deltas():
    full = registry.family("full")
    assert full.delta_route("safetensors", {}, Path("."), "factors") == "full"
    lora, qlora = registry.family("lora"), registry.family("qlora")
    cfg = {"peft_type": "LORA"}
    assert lora.delta_route("peft_adapter", cfg, Path("."), "factors") == "factors"
    # the quantised base's adapter always goes through its factors (its base is dequantised)
    assert qlora.delta_route("peft_adapter", cfg, Path("."), "merge") == "factors"


def test_a_family_package_registers_itself(tmp_path, monkeypatch):
    """Adding a method: one package under learnforget.methods (and a YAML in conf/method)."""
    import learnforget.methods as pkg

    fam = tmp_path / "norms_only"
    fam.mkdir()
    (fam / "__init__.py").write_text(textwrap.dedent('''
        from learnforget.methods.base import Method

        class NormsOnly(Method):
            """Only the RMSNorm weights train."""
            keys = ("top_k",)

            def apply(self, model, cfg, ctx):
                for name, p in model.named_parameters():
                    p.requires_grad_("norm" in name)
                return model

        METHODS = (NormsOnly("norms"),)
    '''))
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    registry.methods.cache_clear()
    try:
        cfg = compose(["model=tiny_llama", "method=full"])
        cfg.method.name = "norms"
        assert type(registry.method_of(cfg.method)).__name__ == "NormsOnly"
        assert registry.method_summary(cfg.method) == "norms_k2"
        assert run_name(cfg).startswith("tiny_llama-norms_k2-")
        from transformers import AutoModelForCausalLM

        from learnforget.assets.models import build_config
        from learnforget.methods.apply import apply_method, count_parameters

        model = AutoModelForCausalLM.from_config(build_config(cfg.model))
        expected = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
        model, notes = apply_method(model, cfg.method, model_name="tiny_llama")
        assert count_parameters(model)[0] == expected > 0
        assert "method.r is ignored by method=norms" in notes
    finally:
        registry.methods.cache_clear()
        sys.modules.pop("learnforget.methods.norms_only", None)


def test_methods_are_objects_of_the_protocol():
    for m in registry.methods().values():
        assert isinstance(m, Method)
