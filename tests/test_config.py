from pathlib import Path

import pytest

from assistant.config import AsrConfig, Config, load_config
from assistant.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_offline_cpu_configuration():
    config = load_config()
    assert config == Config()
    assert config.asr.backend == "faster-whisper"
    assert config.asr.model == "whisper-base"
    assert config.vad.enabled


def test_default_yaml_spells_out_the_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("asr:\n  modle: x\n", r"unknown key asr\.modle; valid keys in asr: backend, model"),
        ("asrr: {}\n", "unknown key asrr"),
        ("asr:\n  batch_size: many\n", r"asr\.batch_size: expected int, got str 'many'"),
        ("transcribe:\n  max_cue_s: .inf\n", r"transcribe\.max_cue_s: inf is not valid"),
        ("transcribe:\n  max_cue_s: .nan\n", r"transcribe\.max_cue_s: nan is not valid"),
        ("transcribe:\n  max_line_chars: 3\n", r"transcribe\.max_line_chars: 3 is not valid"),
        ("transcribe:\n  audio_channel: -1\n", r"transcribe\.audio_channel: -1 is not valid"),
    ],
    ids=["unknown-key-dotted-path", "unknown-section", "wrong-type", "cue-inf", "cue-nan", "line-chars", "channel"],
)
def test_bad_file_content_is_named(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="asr.beam_size"):
        load_config(overrides=["asr.beam_size=true"])


def test_overrides_are_parsed_as_yaml_and_validated():
    config = load_config(overrides=["asr.beam_size=5", "asr.language=zh", "transcribe.formats=srt,json"])
    assert config.asr.beam_size == 5
    assert config.asr.language == "zh"
    assert config.transcribe.formats == ("srt", "json")
    assert load_config(overrides=["asr.temperatures=[0.0]"]).asr.temperatures == (0.0,)
    assert load_config(overrides=["asr.language=null"]).asr.language is None


def test_override_needs_key_and_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["asr.beam_size"])


def test_literal_choices_are_listed():
    with pytest.raises(ConfigError, match="transcribe, translate"):
        load_config(overrides=["asr.task=summarise"])
    with pytest.raises(ConfigError, match=r"transcribe\.formats\[0\]: 'docx' is not one of txt, srt"):
        load_config(overrides=["transcribe.formats=docx"])


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="choose one of faster-whisper, openai, whisper-hf"):
        AsrConfig(backend="whisper-cpp")


def test_range_checks():
    with pytest.raises(ConfigError, match="asr.chunk_s"):
        load_config(overrides=["asr.chunk_s=45"])
    with pytest.raises(ConfigError, match="asr.device"):
        load_config(overrides=["asr.device=tpu"])


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("asr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(AttributeError):
        config.asr.model = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("llm.backend=vllm", r"llm\.backend: unknown backend 'vllm'; choose one of hf, llama-cpp, openai"),
        (
            "llm.template=vicuna",
            r"llm\.template: 'vicuna' is not valid; expected one of auto, tokenizer, llama2-chinese",
        ),
        ("llm.quantize=3bit", r"llm\.quantize: '3bit' is not one of none, 8bit, 4bit"),
        ("llm.sampling.temperature=-1", r"llm\.sampling\.temperature"),
        ("llm.sampling.top_p=0", r"llm\.sampling\.top_p"),
        ("llm.sampling.max_new_tokens=9000", r"fewer than llm\.context_tokens \(4096\)"),
        ("llm.sampling.stop=['']", r"llm\.sampling\.stop"),
        ("llm.device=tpu", r"llm\.device"),
    ],
)
def test_bad_llm_options_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_llm_sampling_overrides():
    config = load_config(overrides=["llm.sampling.stop=['Human:', '###']", "llm.sampling.seed=3", "llm.quantize=4bit"])
    assert config.llm.sampling.stop == ("Human:", "###") and config.llm.sampling.seed == 3
    assert config.llm.quantize == "4bit"
