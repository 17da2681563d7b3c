"""Where config values come from: defaults, the file, LUXSCI_PROXY_* variables, flags."""

from __future__ import annotations

import argparse
import dataclasses
import io
import typing
from pathlib import Path

import pytest
import yaml

from proxy.config import Config, ConfigError, Secret, key_fields, masked
from proxy.sources import (
    OWN_ENV,
    Inputs,
    Setting,
    add_arguments,
    annotated_yaml,
    env_names,
    host_port,
    inputs_from,
    keys,
    resolve,
)

SECRETS = {"LUXSCI_PROXY_AUTH_TOKEN": "tok-from-env", "LUXSCI_PROXY_AUTH_SECRET": "sec-from-env"}


def flags(*argv: str) -> tuple[Setting, ...]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return inputs_from(parser.parse_args(list(argv)), {}).settings


def config_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Every key of the config format, walked from the dataclasses themselves."""
    found = set()
    hints = typing.get_type_hints(cls)
    for f in key_fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            found |= config_keys(tp, f"{prefix}{f.name}.")
        else:
            found.add(f"{prefix}{f.name}")
    return found


def test_every_key_of_every_section_has_its_variable_named_after_it() -> None:
    names = env_names()
    targets = {key.target for key in names.values()}
    assert targets == config_keys()  # derived: a new key has its variable at once
    assert names["LUXSCI_PROXY_LISTEN_PORT"].dotted == "listen.port"
    assert names["LUXSCI_PROXY_LIMITS_STATE_FILE"].dotted == "limits.state_file"
    assert names["LUXSCI_PROXY_SHUTDOWN_TIMEOUT"].dotted == "shutdown_timeout"
    assert names["LUXSCI_PROXY_AUTH_SECRET_FILE"].target == "auth.secret"
    assert names["LUXSCI_PROXY_ACCESS_CLIENT_TOKEN_FILE"].target == "access.client_token"
    # The variables that mean something else keep their meaning: no key takes their names.
    assert set(OWN_ENV) == {
        "LUXSCI_PROXY_CONFIG",
        "LUXSCI_PROXY_STATE_DIR",
        "LUXSCI_PROXY_STATE_KEY",
    }
    assert not set(OWN_ENV) & set(names)


def test_without_a_file_flags_and_environment_make_the_whole_config() -> None:
    env = {
        **SECRETS,
        "LUXSCI_PROXY_QUEUE_MAX_WAIT": "12.5",
        "LUXSCI_PROXY_LOGGING_LEVEL": "DEBUG",
        "LUXSCI_PROXY_ACCESS_ALLOW_CLIENTS": "10.0.0.0/8, 127.0.0.1/32",
        "LUXSCI_PROXY_ACCESS_PROTECTED_USERS": '["ceo@example.com"]',
        "LUXSCI_PROXY_ACCESS_RULES": '[{"methods": ["GET"], "path": "/perl/api/v2/user/**"}]',
        "LUXSCI_PROXY_LIMITS_STATE_FILE": "",
        "LUXSCI_PROXY_UPSTREAM_ALLOW_INSECURE": "yes",
    }
    resolved = resolve(
        Inputs(
            settings=flags(
                "--upstream",
                "http://127.0.0.1:9",
                "--listen",
                "0.0.0.0:18080",
                "--admin",
                "19100",
                "--log-format",
                "Console",
            )
        ),
        env,
    )
    cfg = resolved.config
    assert cfg.upstream.url == "http://127.0.0.1:9" and cfg.upstream.allow_insecure is True
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 18080)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 19100)  # a port alone
    assert (cfg.logging.level, cfg.logging.format) == ("debug", "console")
    assert cfg.queue.max_wait == 12.5
    assert cfg.access.allow_clients == ("10.0.0.0/8", "127.0.0.1/32")
    assert cfg.access.protected_users == ("ceo@example.com",)
    assert cfg.access.rules[0].path == "/perl/api/v2/user/**"
    assert cfg.limits.state_file == ""  # empty means what it means in the file: off
    assert cfg.auth.secret == Secret("sec-from-env")
    assert resolved.source == ""
    assert resolved.origins["listen.port"] == "flag:--listen"
    assert resolved.origins["admin.host"] == "default"
    assert resolved.origins["auth.secret"] == "env:LUXSCI_PROXY_AUTH_SECRET"
    assert resolved.origins["access.rules"] == "env:LUXSCI_PROXY_ACCESS_RULES"
    assert resolved.origins["retry.max_attempts"] == "default"
    assert cfg.warnings == ()  # secrets from the environment are where they belong


def test_flags_beat_the_environment_which_beats_the_file_which_beats_defaults(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: {port: 1001, max_connections: 7}\n"
        "queue: {max_wait: 3}\n"
        "auth: {token: '${T}', secret: '${S}'}\n"
    )
    env = {
        "T": "t-file",
        "S": "s-file",
        "LUXSCI_PROXY_LISTEN_PORT": "1002",
        "LUXSCI_PROXY_QUEUE_MAX_WAIT": "4",
    }
    resolved = resolve(
        Inputs(str(path), settings=flags("--listen", "1003", "--set", "queue.max_size=5")), env
    )
    cfg, origins = resolved.config, resolved.origins
    assert cfg.listen.port == 1003 and origins["listen.port"] == "flag:--listen"
    assert (
        cfg.queue.max_wait == 4 and origins["queue.max_wait"] == "env:LUXSCI_PROXY_QUEUE_MAX_WAIT"
    )
    assert cfg.listen.max_connections == 7 and origins["listen.max_connections"] == "file"
    assert cfg.queue.max_size == 5 and origins["queue.max_size"] == "flag:--set"
    assert cfg.retry.max_time == 30 and origins["retry.max_time"] == "default"
    assert origins["auth.secret"] == "file:${S}"
    assert resolved.source == str(path)


def test_the_last_flag_on_the_command_line_wins() -> None:
    resolved = resolve(
        Inputs(settings=flags("--set", "listen.port=1", "--listen", "2", "--set", "listen.port=3")),
        SECRETS,
    )
    assert resolved.config.listen.port == 3


def test_a_key_and_its_file_form_are_one_setting_across_sources(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("sec-from-a-file\n")
    path = tmp_path / "c.yaml"
    path.write_text("auth: {token: t, secret: '${S}'}\n")
    # The environment's file replaces the file's value: no "give either" error.
    resolved = resolve(
        Inputs(str(path)), {"S": "s", "LUXSCI_PROXY_AUTH_SECRET_FILE": str(secret_file)}
    )
    assert resolved.config.auth.secret == Secret("sec-from-a-file")
    assert resolved.origins["auth.secret"] == "env:LUXSCI_PROXY_AUTH_SECRET_FILE"
    # A flag's file replaces the environment's value.
    resolved = resolve(
        Inputs(settings=flags("--auth-secret-file", str(secret_file))),
        {**SECRETS, "LUXSCI_PROXY_AUTH_SECRET": "ignored"},
    )
    assert resolved.config.auth.secret == Secret("sec-from-a-file")
    assert resolved.origins["auth.secret"] == "flag:--auth-secret-file"
    # One source giving both is the same mistake as in the file.
    with pytest.raises(ConfigError, match=r"^auth\.secret: give either auth\.secret or"):
        resolve(Inputs(), {**SECRETS, "LUXSCI_PROXY_AUTH_SECRET_FILE": str(secret_file)})


@pytest.mark.parametrize(
    "argv",
    [
        ("--set", "auth.secret=hunter2-hunter2"),
        ("--set", "auth.api_key=hunter2-hunter2"),
        ("--set", "access.client_token=hunter2-hunter2"),
        ("--set", "auth.state_key=hunter2-hunter2"),
        ("--set", "limits.redis_url=redis://app:hunter2-hunter2@redis/0"),
        ("--set", "limits.redis_url=redis://redis/0?password=hunter2-hunter2"),
        ("--set", "limits.redis_url=redis+sentinel://s1,s2/m?sentinel_password=hunter2-hunter2"),
        ("--set", "limits.redis_url=redis+cluster://app:hunter2-hunter2@n1,n2"),
    ],
)
def test_secrets_are_never_taken_from_the_command_line(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="never taken from the command line") as error:
        resolve(Inputs(settings=flags(*argv)), SECRETS)
    assert "hunter2" not in str(error.value)
    assert "LUXSCI_PROXY_" in str(error.value)  # and says where to put it instead


def test_errors_name_the_key_and_the_variable_or_flag_that_set_it() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^listen\.port: must be a number \(got 'eighty'\) "
        r"\(set by LUXSCI_PROXY_LISTEN_PORT\)$",
    ):
        resolve(Inputs(), {**SECRETS, "LUXSCI_PROXY_LISTEN_PORT": "eighty"})
    with pytest.raises(ConfigError, match=r"^queue\.max_wait: must be greater than 0.*--set"):
        resolve(Inputs(settings=flags("--set", "queue.max_wait=0")), SECRETS)
    with pytest.raises(ConfigError, match=r"^access\.allow_clients\[0\]: not an IP network"):
        resolve(Inputs(), {**SECRETS, "LUXSCI_PROXY_ACCESS_ALLOW_CLIENTS": "nonsense"})
    with pytest.raises(ConfigError, match=r"^queue\.max_wiat: unknown key \(--set\); did you"):
        resolve(Inputs(settings=flags("--set", "queue.max_wiat=3")), SECRETS)
    with pytest.raises(ConfigError, match=r"^--set: expected KEY=VALUE"):
        resolve(Inputs(settings=flags("--set", "queue.max_wait")), SECRETS)
    with pytest.raises(ConfigError, match=r"^access\.rules: give JSON"):
        resolve(Inputs(), {**SECRETS, "LUXSCI_PROXY_ACCESS_RULES": "/x/**"})
    with pytest.raises(ConfigError, match=r"^access\.rules: not valid JSON"):
        resolve(Inputs(), {**SECRETS, "LUXSCI_PROXY_ACCESS_RULES": "[{"})
    # A key nobody set: the message says which variables would set it.
    with pytest.raises(
        ConfigError,
        match=r"^auth\.token: required .*from the environment: LUXSCI_PROXY_AUTH_TOKEN or "
        r"LUXSCI_PROXY_AUTH_TOKEN_FILE$",
    ):
        resolve(Inputs(), {})


def test_an_unknown_luxsci_proxy_variable_is_a_warning_naming_it_never_an_error() -> None:
    env = {
        **SECRETS,
        "LUXSCI_PROXY_LISTEN_PROT": "1",
        "LUXSCI_PROXY_FUTURE_THING": "x",
        "LUXSCI_PROXY_CONFIG": "",
        "LUXSCI_PROXY_STATE_DIR": "/tmp",
        "LUXSCI_API_SECRET": "not ours",
    }
    warnings = resolve(Inputs(), env).config.warnings
    assert len(warnings) == 2
    prot, future = sorted(warnings, key=lambda w: "FUTURE" in w)
    assert prot.startswith("LUXSCI_PROXY_LISTEN_PROT: not a setting")
    assert "did you mean LUXSCI_PROXY_LISTEN_PORT?" in prot
    assert future.startswith("LUXSCI_PROXY_FUTURE_THING: not a setting")


def test_the_state_key_variable_keeps_its_meaning_and_shows_as_the_source() -> None:
    key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    env = {
        "LUXSCI_PROXY_AUTH_SCHEME": "oauth2",
        "LUXSCI_PROXY_AUTH_TOKEN_URL": "https://auth.example.com/token",
        "LUXSCI_PROXY_AUTH_CLIENT_ID": "app",
        "LUXSCI_PROXY_AUTH_CLIENT_SECRET": "cs-123456",
        "LUXSCI_PROXY_AUTH_GRANT": "refresh_token",
        "LUXSCI_PROXY_AUTH_REFRESH_TOKEN": "rt-123456",
        "LUXSCI_PROXY_STATE_KEY": key,
    }
    resolved = resolve(Inputs(), env)
    assert resolved.config.auth.state_key == Secret(key)
    assert resolved.origins["auth.state_key"] == "env:LUXSCI_PROXY_STATE_KEY"
    assert resolved.config.warnings == ()
    # A source that sets auth.state_key wins over it.
    other = key.replace("AAEC", "BBEC")
    resolved = resolve(Inputs(), {**env, "LUXSCI_PROXY_AUTH_STATE_KEY": other})
    assert resolved.config.auth.state_key == Secret(other)


def test_standard_input_is_a_config_file_whose_paths_start_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_text("sec-from-stdin-file\n")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    stdin = io.StringIO("auth: {token: t, secret_file: secret}\nlogging: {level: WARNING}\n")
    inputs = inputs_from(parser.parse_args(["--config", "-"]), {}, stdin)
    resolved = resolve(inputs, {})
    assert resolved.source == "<stdin>"
    assert resolved.config.auth.secret == Secret("sec-from-stdin-file")
    assert resolved.config.logging.level == "warning"
    assert resolved.origins["auth.secret"] == "file:secret_file"
    # Read once: a reload resolves the same text again.
    assert resolve(inputs, {}).config == resolved.config


def test_the_config_variable_names_the_file_and_empty_means_none(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert inputs_from(parser.parse_args([]), {"LUXSCI_PROXY_CONFIG": "/x.yaml"}).file == "/x.yaml"
    assert inputs_from(parser.parse_args([]), {"LUXSCI_PROXY_CONFIG": ""}).file is None
    assert inputs_from(parser.parse_args(["--config", "a.yaml"]), {}).file == "a.yaml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", (None, "8080")),
        (":8080", (None, "8080")),
        ("0.0.0.0:8080", ("0.0.0.0", "8080")),
        ("[::1]:8080", ("::1", "8080")),
        ("proxy.local:1", ("proxy.local", "1")),
    ],
)
def test_host_port(text: str, expected: tuple[str | None, str]) -> None:
    assert host_port(text, "--listen") == expected


@pytest.mark.parametrize("text", ["", "host", "::1:80", "h:p", "[::1]"])
def test_host_port_refuses_what_is_not_one(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--listen: expected \[HOST:\]PORT"):
        host_port(text, "--listen")


def test_check_output_is_yaml_with_a_source_comment_on_every_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "auth: {token: t, secret: '${S}'}\n"
        "access: {rules: [{methods: [GET], path: /x/**}], protected_users: ['a\\nb']}\n"
    )
    resolved = resolve(
        Inputs(str(path), settings=flags("--log-level", "debug")),
        {"S": "s3cr3t-value", "LUXSCI_PROXY_LIMITS_REDIS_URL": "redis://:pw-123456@r/0"},
    )
    text = annotated_yaml(resolved)
    assert "s3cr3t-value" not in text and "pw-123456" not in text
    assert yaml.safe_load(text) == masked(resolved.config)  # comments only: still the config
    lines = text.splitlines()
    assert "level: debug" in next(line for line in lines if "level:" in line)
    assert next(line for line in lines if " level:" in line).endswith("# flag:--log-level")
    assert next(line for line in lines if "redis_url:" in line).endswith(
        "# env:LUXSCI_PROXY_LIMITS_REDIS_URL"
    )
    assert next(line for line in lines if "  secret:" in line).endswith("# file:${S}")
    assert next(line for line in lines if "rules:" in line).endswith("# file")
    assert next(line for line in lines if "pool_size:" in line).endswith("# default")
    # Every key says where its value came from.
    commented = {line.split("#")[-1].strip() for line in lines if "#" in line}
    assert commented <= {"default", "file", "file:${S}", "flag:--log-level"} | {
        "env:LUXSCI_PROXY_LIMITS_REDIS_URL"
    }
    assert len([line for line in lines if "#" in line]) == len(resolved.origins)


@dataclasses.dataclass(frozen=True)
class _Aging:
    after: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Queue:
    aging: _Aging = dataclasses.field(default_factory=_Aging)
    size: int = 1


def test_keys_walk_nested_sections_too() -> None:
    names = {key.env: key.dotted for key in keys(_Queue, ("queue",))}
    assert names == {
        "LUXSCI_PROXY_QUEUE_AGING_AFTER": "queue.aging.after",
        "LUXSCI_PROXY_QUEUE_SIZE": "queue.size",
    }


@dataclasses.dataclass(frozen=True)
class _Client:
    name: str = ""
    token: Secret | None = None


@dataclasses.dataclass(frozen=True)
class _Access:
    clients: tuple[_Client, ...] = ()
    rules: tuple[str, ...] = ()


def test_a_list_of_sections_holding_a_secret_is_a_secret_for_the_command_line() -> None:
    secret = {key.dotted: key.secret for key in keys(_Access, ("access",))}
    assert secret == {"access.clients": True, "access.rules": False}


def test_file_paths_inside_list_entries_are_relative_to_the_file_too(tmp_path: Path) -> None:
    from proxy.config import file_values

    raw = {"access": {"clients": [{"name": "a", "token_file": "a.token"}], "rules": ["x"]}}
    data = file_values(raw, {}, tmp_path)
    assert data["access"]["clients"][0]["token_file"] == str(tmp_path / "a.token")
    assert data["access"]["rules"] == ["x"]
