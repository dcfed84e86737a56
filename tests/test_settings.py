"""Settings: every bad value fails with one line naming the variable, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from voicegrow.settings import ConfigError, Settings, load_settings, read_env_file


def test_defaults_match_the_deployment_document() -> None:
    s = load_settings({}, env_file=None)
    assert (s.server_host, s.ws_port, s.http_port, s.debug, s.log_level, s.workers) == (
        "0.0.0.0", 4399, 8000, False, "INFO", 1)
    assert (s.asr_model_size, s.asr_device, s.asr_compute_type, s.asr_language, s.asr_timeout) == (
        "small", "cpu", "int8", "auto", 30.0)
    assert (s.tts_voice_zh, s.tts_voice_en, s.tts_speaking_rate, s.tts_pitch, s.tts_timeout) == (
        "zh-CN-Neural2-C", "en-US-Neural2-C", 0.9, 0.0, 30.0)
    assert (s.llm_model, s.llm_max_tokens, s.llm_temperature, s.llm_timeout) == (
        "gemini-2.0-flash-exp", 300, 0.7, 30.0)
    assert s.tts_base_url == s.llm_base_url == s.mysql_host == s.redis_host == s.minio_endpoint == ""


def test_values_are_converted() -> None:
    s = load_settings({"WS_PORT": "5000", "DEBUG": "yes", "TTS_SPEAKING_RATE": "1.5", "LOG_LEVEL": "debug",
                       "MINIO_SECURE": "true", "ASR_LANGUAGE": "auto"}, env_file=None)
    assert (s.ws_port, s.debug, s.tts_speaking_rate, s.log_level, s.minio_secure, s.asr_language) == (
        5000, True, 1.5, "DEBUG", True, "auto")


BAD_VALUES = [
    ("WS_PORT", "abc", "expected an integer from 0 to 65535"),
    ("WS_PORT", "70000", "expected an integer from 0 to 65535"),
    ("HTTP_PORT", "-1", "expected an integer from 0 to 65535"),
    ("DEBUG", "maybe", "expected true or false"),
    ("LOG_LEVEL", "LOUD", "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("WORKERS", "0", "expected an integer from 1 to 64"),
    ("ASR_MODEL_SIZE", "huge", "expected one of tiny"),
    ("ASR_DEVICE", "tpu", "expected one of cpu, cuda, auto"),
    ("ASR_COMPUTE_TYPE", "int4", "expected one of int8"),
    ("ASR_LANGUAGE", "chinese!", "expected a language code"),
    ("ASR_TIMEOUT", "soon", "expected a number"),
    ("TTS_SPEAKING_RATE", "5", "expected a number from 0.25 to 4"),
    ("TTS_SPEAKING_RATE", "0.1", "expected a number from 0.25 to 4"),
    ("TTS_PITCH", "21", "expected a number from -20 to 20"),
    ("TTS_TIMEOUT", "0", "expected a number from 0.1 to 3600"),
    ("LLM_TEMPERATURE", "2.5", "expected a number from 0 to 2"),
    ("LLM_TEMPERATURE", "nan", "expected a number from 0 to 2"),
    ("LLM_MAX_TOKENS", "0", "expected an integer from 1 to 100000"),
    ("LLM_BASE_URL", "ftp://x", "expected an http:// or https:// URL"),
    ("TTS_BASE_URL", "localhost:9000", "expected an http:// or https:// URL"),
    ("MYSQL_PORT", "x", "expected an integer"),
    ("REDIS_PORT", "99999", "expected an integer from 0 to 65535"),
    ("MINIO_SECURE", "2", "expected true or false"),
    ("VAD_AGGRESSIVENESS", "4", "expected an integer from 0 to 3"),
    ("VAD_FRAME_MS", "25", "expected one of 10, 20, 30"),
    ("DEVICE_AUTH", "magic", "expected one of off, token, hmac"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_variable_value_and_what_is_allowed(name: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value}, env_file=None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r} is not allowed")
    assert allowed in message


def test_ws_and_http_port_must_differ() -> None:
    with pytest.raises(ConfigError, match="HTTP_PORT=5000 is not allowed: it must differ from WS_PORT"):
        load_settings({"WS_PORT": "5000", "HTTP_PORT": "5000"}, env_file=None)


def test_env_file_is_read_and_environment_wins(tmp_path) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\nexport WS_PORT=4500\nLLM_MODEL='gpt-x'\nHTTP_PORT=\"8100\"\n", encoding="utf-8")
    assert read_env_file(env) == {"WS_PORT": "4500", "LLM_MODEL": "gpt-x", "HTTP_PORT": "8100"}
    s = load_settings({"HTTP_PORT": "8200"}, env_file=env)
    assert (s.ws_port, s.llm_model, s.http_port) == (4500, "gpt-x", 8200)


def test_env_file_syntax_error_names_the_line(tmp_path) -> None:
    env = tmp_path / ".env"
    env.write_text("WS_PORT=1\nthis is not an assignment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.env:2: expected KEY=value"):
        load_settings({}, env_file=env)


def test_masked_hides_set_secrets_only() -> None:
    s = load_settings({"LLM_API_KEY": "sk-123", "MYSQL_PASSWORD": "pw", "ADMIN_TOKEN": ""}, env_file=None)
    masked = s.masked()
    assert masked["LLM_API_KEY"] == "***" and masked["MYSQL_PASSWORD"] == "***"
    assert masked["ADMIN_TOKEN"] == "" and masked["WS_PORT"] == 4399
    assert set(masked) == {f.name.upper() for f in dataclasses.fields(Settings)}


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", *args],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_config_command_prints_masked_settings() -> None:
    result = _run_cli("config", env={"LLM_API_KEY": "sk-secret", "WS_PORT": "4400"})
    assert result.returncode == 0, result.stderr
    assert "WS_PORT=4400" in result.stdout
    assert "LLM_API_KEY=***" in result.stdout
    assert "sk-secret" not in result.stdout


def test_serve_with_bad_value_fails_with_one_clear_line() -> None:
    result = _run_cli("serve", env={"TTS_SPEAKING_RATE": "9"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "voicegrow: configuration error: TTS_SPEAKING_RATE='9' is not allowed: expected a number from 0.25 to 4"]
