from pathlib import Path

import pytest
import yaml

from proxy.config import (
    ConfigError,
    Secret,
    load,
    mask_url_password,
    masked,
    parse,
    url_passwords,
)

ENV = {"LUXSCI_API_TOKEN": "tok-123", "LUXSCI_API_SECRET": "s3cr3t-value"}
MINIMAL = """
auth:
  token: ${LUXSCI_API_TOKEN}
  secret: ${LUXSCI_API_SECRET}
"""


def test_defaults_follow_the_documented_contract() -> None:
    cfg = parse(MINIMAL, ENV)
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 8080)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9100)
    assert cfg.upstream.url == "https://rest.luxsci.com"
    assert cfg.auth.scheme == "luxsci"
    assert cfg.auth.token == Secret("tok-123")
    assert cfg.auth.secret is not None and cfg.auth.secret.get() == "s3cr3t-value"
    assert cfg.auth.code_lifetime == 900


def test_env_default_is_used_and_numbers_are_coerced_from_strings() -> None:
    cfg = parse(MINIMAL + "listen: {port: '${PORT:-8181}'}\n", ENV)
    assert cfg.listen.port == 8181
    cfg = parse(MINIMAL + "listen: {port: '${PORT:-8181}'}\n", {**ENV, "PORT": "9000"})
    assert cfg.listen.port == 9000


def test_missing_env_var_without_default_names_key_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"^auth\.secret: environment variable LUXSCI_API_SECRET"):
        parse(MINIMAL, {"LUXSCI_API_TOKEN": "t"})


def test_env_values_are_not_parsed_as_yaml() -> None:
    cfg = parse(MINIMAL, {**ENV, "LUXSCI_API_SECRET": "a: b\n- [c"})
    assert cfg.auth.secret is not None and cfg.auth.secret.get() == "a: b\n- [c"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("listen: {prot: 1}", r"^listen\.prot: unknown key"),
        ("listen: {port: 70000}", r"^listen\.port: must be a TCP port"),
        ("listen: {port: eighty}", r"^listen\.port: must be a number"),
        ("upstream: {url: ftp://x}", r"^upstream\.url: must be an https:// URL"),
        ("upstream: {url: 'http://127.0.0.1:1'}", r"^upstream\.url: plain http://"),
        ("upstream: {url: 'https://h/perl'}", r"^upstream\.url: give only scheme"),
        ("upstream: {ca_file: /nope.pem}", r"^upstream\.ca_file: no such file"),
        ("upstream: {max_header_bytes: 512}", r"^upstream\.max_header_bytes: must be at least"),
        ("auth: {scheme: basic}", r"^auth\.scheme: must be one of luxsci, bearer"),
        ("auth: {user: joe@example.com}", r"^auth\.password: auth\.user and auth\.password"),
        ("auth: {refresh_margin: 1000}", r"^auth\.refresh_margin"),
        ("bogus: 1", r"^bogus: unknown key"),
        ("listen: [1, 2]", r"^listen: must be a mapping"),
    ],
)
def test_bad_values_name_the_key(extra: str, message: str) -> None:
    text = (
        MINIMAL + extra
        if not extra.startswith("auth:")
        else extra.replace("auth: {", "auth: {token: t, secret: s, ")
    )
    with pytest.raises(ConfigError, match=message):
        parse(text, ENV)


def test_luxsci_scheme_requires_token_and_secret() -> None:
    with pytest.raises(ConfigError, match=r"^auth\.token: required for scheme luxsci"):
        parse("auth: {scheme: luxsci}", {})


def test_an_api_key_with_a_line_break_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError, match=r"^auth\.api_key: contains a control character") as e:
        parse("auth: {scheme: bearer, api_key: '${K}'}", {"K": "key-1\r\nX-Injected: 1"})
    assert "key-1" not in str(e.value)


def test_bearer_scheme_requires_api_key() -> None:
    with pytest.raises(ConfigError, match=r"^auth\.api_key: required for scheme bearer"):
        parse("auth: {scheme: bearer}", {})
    cfg = parse("auth: {scheme: bearer, api_key: '${K}'}", {"K": "key-1"})
    assert cfg.auth.api_key == Secret("key-1")


def test_secret_file_is_read_and_trailing_newline_dropped(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-file\n")
    cfg = parse(f"auth: {{token: t, secret_file: {tmp_path / 'secret'}}}", {})
    assert cfg.auth.secret == Secret("from-file")


def test_secret_file_problems_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^auth\.secret_file: cannot read"):
        parse(f"auth: {{token: t, secret_file: {tmp_path / 'missing'}}}", {})
    (tmp_path / "s").write_text("x")
    with pytest.raises(ConfigError, match=r"^auth\.secret_file: give either"):
        parse(f"auth: {{token: t, secret: y, secret_file: {tmp_path / 's'}}}", {})


def test_invalid_yaml_is_a_config_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen:\n  port: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load(path)


def test_secrets_never_show_in_repr_or_masked_dump() -> None:
    cfg = parse(
        MINIMAL + "auth: {token: t, secret: s3cr3t-value, user: u, password: pw-value}", ENV
    )
    assert "s3cr3t-value" not in repr(cfg)
    assert "pw-value" not in repr(cfg)
    dump = masked(cfg)
    assert dump["auth"]["secret"] == "********"
    assert dump["auth"]["password"] == "********"
    assert dump["auth"]["user"] == "u"


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    cfg = load(example, {"LUXSCI_API_TOKEN": "t", "LUXSCI_API_SECRET": "s"})
    assert cfg.listen.port == 8080


def test_masked_dump_hides_a_password_in_the_redis_url() -> None:
    cfg = parse(
        MINIMAL + "limits: {backend: redis, redis_url: 'redis://app:pa55word@redis:6379/0'}", ENV
    )
    assert masked(cfg)["limits"]["redis_url"] == "redis://app:********@redis:6379/0"


def test_masked_dump_of_rules_and_lists_is_plain_yaml() -> None:
    cfg = parse(
        MINIMAL
        + """
access:
  allow_clients: [10.0.0.0/8]
  rules: [{methods: [GET, POST], path: /perl/api/v2/user/*/profile}, {path: /x/**}]
  protected_users: [ceo@example.com]
""",
        ENV,
    )
    dump = masked(cfg)
    assert "warnings" not in dump  # not a key of the file
    assert yaml.safe_load(yaml.safe_dump(dump)) == dump
    assert dump["access"]["rules"] == [
        {"methods": ["GET", "POST"], "path": "/perl/api/v2/user/*/profile"},
        {"methods": ["*"], "path": "/x/**"},
    ]
    assert dump["access"]["allow_clients"] == ["10.0.0.0/8"]


@pytest.mark.parametrize(
    ("url", "shown", "passwords"),
    [
        ("redis://h:6379/0", "redis://h:6379/0", []),
        ("redis://:pw1@h/0", "redis://:********@h/0", ["pw1"]),
        (
            "redis://h/0?db=1&password=pw%2F2",
            "redis://h/0?db=1&password=********",
            ["pw%2F2"],
        ),
        (
            "unix:///run/redis.sock?password=pw3",
            "unix:///run/redis.sock?password=********",
            ["pw3"],
        ),
        ("redis://h/0?password=", "redis://h/0?password=", []),
    ],
)
def test_url_passwords_in_the_authority_or_the_query_are_found_and_masked(
    url: str, shown: str, passwords: list[str]
) -> None:
    assert mask_url_password(url) == shown
    assert url_passwords(url) == passwords


def test_auth_cookie_is_off_by_default_and_for_scheme_luxsci_only() -> None:
    assert parse(MINIMAL, ENV).auth.auth_cookie is False
    assert parse(MINIMAL + "  auth_cookie: true\n", ENV).auth.auth_cookie is True
    bearer = "auth: {scheme: bearer, api_key: k-123456, auth_cookie: true}"
    with pytest.raises(ConfigError, match=r"^auth\.auth_cookie: applies to scheme luxsci only"):
        parse(bearer, ENV)
    assert parse(bearer.replace("true", "false"), ENV).auth.auth_cookie is False
    with pytest.raises(ConfigError, match=r"^auth\.auth_cookie: must be true or false"):
        parse(MINIMAL + "  auth_cookie: both\n", ENV)


def test_limits_queue_and_retry_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^limits\.fallback_share"):
        parse(MINIMAL + "limits: {fallback_share: 0}", ENV)
    with pytest.raises(ConfigError, match=r"^limits\.redis_url"):
        parse(MINIMAL + "limits: {backend: redis, redis_url: 'http://x'}", ENV)
    with pytest.raises(ConfigError, match=r"^queue\.max_wait: must be greater than 0"):
        parse(MINIMAL + "queue: {max_wait: 0}", ENV)
    with pytest.raises(ConfigError, match=r"^retry\.backoff_max"):
        parse(MINIMAL + "retry: {backoff_base: 2, backoff_max: 1}", ENV)


def test_an_empty_state_file_in_the_file_turns_it_off_rather_than_meaning_the_default() -> None:
    # "" is documented as "off"; it once read as unset, and the default file was written.
    assert parse(MINIMAL + 'limits: {state_file: ""}\n', ENV).limits.state_file == ""
    assert parse(MINIMAL + "limits: {state_file: '${NONE:-}'}\n", ENV).limits.state_file == ""
    assert parse(MINIMAL + "limits: {state_file: null}\n", ENV).limits.state_file is None
    # Other optional strings still read "" as not set (`${VAR:-}`).
    assert parse(MINIMAL + "upstream: {ca_file: ''}\n", ENV).upstream.ca_file is None


# -- scheme oauth2 ------------------------------------------------------------------------

OAUTH = """
auth:
  scheme: oauth2
  token_url: https://auth.example.com/oauth/token
  client_id: app
  client_secret: ${CLIENT_SECRET}
"""
OAUTH_ENV = {"CLIENT_SECRET": "cs-123456"}
STATE_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def test_oauth2_client_credentials_minimal() -> None:
    auth = parse(OAUTH, OAUTH_ENV).auth
    assert (auth.grant, auth.client_auth, auth.refresh_margin) == (
        "client_credentials",
        "client_secret_basic",
        60.0,
    )
    assert auth.client_secret == Secret("cs-123456")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("  token_url: https://auth.example.com/oauth/token\n", ""),
            r"^auth\.token_url: required",
        ),
        (("  client_id: app\n", ""), r"^auth\.client_id: required"),
        (("  client_secret: ${CLIENT_SECRET}\n", ""), r"^auth\.client_secret: required"),
        (("https://auth", "http://auth"), r"^auth\.token_url: plain http://"),
        (
            ("https://auth.example.com", "https://u:p@auth.example.com"),
            r"^auth\.token_url: no cred",
        ),
        (("/oauth/token", "/oauth/token#x"), r"^auth\.token_url: no credentials or #fragment"),
        (("https://auth", "ftp://auth"), r"^auth\.token_url: must be an https:// URL"),
        (("client_id: app", "client_id: app\n  auth_cookie: true"), r"^auth\.auth_cookie: applies"),
        (("client_id: app", "client_id: app\n  grant: password"), r"^auth\.grant: must be one of"),
        (("client_id: app", "client_id: app\n  client_auth: jwt"), r"^auth\.client_auth: must be"),
        (("client_id: app", "client_id: app\n  refresh_token: rt"), r"^auth\.refresh_token: only"),
        (
            ("client_id: app", "client_id: app\n  refresh_margin: -1"),
            r"^auth\.refresh_margin: must",
        ),
        (
            ("client_id: app", "client_id: app\n  grant: refresh_token"),
            r"^auth\.refresh_token: requi",
        ),
        (("client_id: app", 'client_id: "a\\nb"'), r"^auth\.client_id: contains a control"),
    ],
)
def test_oauth2_config_errors_name_the_key(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(OAUTH.replace(*change), OAUTH_ENV)


def test_oauth2_plain_http_token_url_with_allow_insecure() -> None:
    text = (
        OAUTH.replace("https://auth", "http://auth")
        + "upstream: {url: 'http://api', allow_insecure: true}\n"
    )
    assert parse(text, OAUTH_ENV).auth.token_url == "http://auth.example.com/oauth/token"


def test_oauth2_refresh_grant_needs_a_state_key_unless_kept_in_memory() -> None:
    refresh = OAUTH + "  grant: refresh_token\n  refresh_token: ${RT}\n"
    env = {**OAUTH_ENV, "RT": "rt-0001"}
    with pytest.raises(
        ConfigError, match=r"^auth\.state_key: required with auth\.grant: refresh_token"
    ):
        parse(refresh, env)
    assert parse(refresh + '  state_file: ""\n', env).auth.state_file == ""
    cfg = parse(refresh + "  state_key: ${KEY}\n", {**env, "KEY": STATE_KEY})
    assert cfg.auth.state_key == Secret(STATE_KEY)
    with pytest.raises(ConfigError, match=r"^auth\.state_key: each key must be 32 random bytes"):
        parse(refresh + "  state_key: ${KEY}\n", {**env, "KEY": "too-short"})
    # The key may live in the environment alone.
    cfg = parse(refresh, {**env, "LUXSCI_PROXY_STATE_KEY": STATE_KEY})
    assert cfg.auth.state_key == Secret(STATE_KEY)


def test_oauth2_secrets_from_files_and_never_literal_without_a_warning(tmp_path: Path) -> None:
    for name, value in (("cs", "cs-from-file"), ("rt", "rt-from-file"), ("key", STATE_KEY)):
        (tmp_path / name).write_text(value + "\n")
    text = f"""
auth:
  scheme: oauth2
  token_url: https://auth.example.com/oauth/token
  client_id: app
  client_secret_file: {tmp_path / "cs"}
  grant: refresh_token
  refresh_token_file: {tmp_path / "rt"}
  state_key_file: {tmp_path / "key"}
"""
    auth = parse(text, {}).auth
    assert auth.client_secret == Secret("cs-from-file")
    assert auth.refresh_token == Secret("rt-from-file")
    assert auth.state_key == Secret(STATE_KEY)
    literal = parse(OAUTH.replace("${CLIENT_SECRET}", "literal-secret"), {})
    assert any(w.startswith("auth.client_secret: a literal secret") for w in literal.warnings)
    assert "literal-secret" not in repr(literal)
