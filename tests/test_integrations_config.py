"""`integrations:`: the list, names, duplicates, errors naming the key, and a config
without the list being exactly today's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proxy.config import (
    Config,
    ConfigError,
    IntegrationConfig,
    build,
    integrations_of,
    parse,
)
from proxy.service import jobs_store, limits_key, state_file
from proxy.sources import Inputs, resolve

ENV = {"T": "token-0123456789", "S": "secret-abcdefghijkl"}
SINGLE = """
upstream: {url: http://127.0.0.1:9, allow_insecure: true}
auth: {token: "${T}", secret: "${S}"}
"""


def entry(name: str, port: int | str, **extra: str) -> str:
    lines = [
        f"  - name: {name}",
        f"    listen: {{port: {port}}}",
        "    upstream: {url: http://127.0.0.1:9, allow_insecure: true}",
        '    auth: {token: "${T}", secret: "${S}"}',
    ]
    return "\n".join(lines + [f"    {k}: {v}" for k, v in extra.items()]) + "\n"


def listed(*entries: str, top: str = "") -> str:
    return top + "integrations:\n" + "".join(entries)


def error_of(text: str, env: dict[str, str] = ENV) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text, env)
    return str(e.value)


def test_each_entry_becomes_a_whole_config_of_its_own_with_the_processs_sections() -> None:
    cfg = parse(
        listed(
            entry("mail", 8081),
            entry("crm", 8082, queue="{max_wait: 7}"),
            top="admin: {port: 9200}\nlogging: {level: debug}\n",
        ),
        ENV,
    )
    views = integrations_of(cfg)
    assert [(v.name, v.integration, v.listen.port) for v in views] == [
        ("mail", "mail", 8081),
        ("crm", "crm", 8082),
    ]
    assert all(v.admin.port == 9200 and v.logging.level == "debug" for v in views)
    assert views[1].queue.max_wait == 7 and views[0].queue.max_wait == Config().queue.max_wait
    assert all(not v.integrations for v in views)


def test_a_config_without_the_list_is_todays_one_integration_named_default() -> None:
    cfg = parse(SINGLE, ENV)
    assert cfg.integrations == ()
    assert integrations_of(cfg) == [cfg] and integrations_of(cfg)[0] is cfg
    assert cfg.name == "default" and cfg.integration == ""
    # Equal to a Config built as before the list existed.
    same = Config(
        upstream=dataclasses.replace(cfg.upstream),
        auth=dataclasses.replace(cfg.auth),
    )
    assert cfg == same


def test_a_listed_integrations_state_is_named_after_it_and_the_default_keeps_todays_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUXSCI_PROXY_STATE_DIR", str(tmp_path))
    single = parse(SINGLE, ENV)
    key = limits_key(single)
    assert len(key) == 16 and "-" not in key  # today's name: the token's digest alone
    assert state_file(single, key) == str(tmp_path / f"limits-{key}.json")
    assert jobs_store(single) == str(tmp_path / f"jobs-{key}.db")
    # Two listed integrations with the same token: never the same state.
    cfg = parse(listed(entry("mail", 8081), entry("crm", 8082)), ENV)
    mail, crm = integrations_of(cfg)
    assert limits_key(mail) == f"mail-{key}" and limits_key(crm) == f"crm-{key}"
    assert jobs_store(mail) != jobs_store(crm)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            listed(entry("mail", 8081), entry("mail", 8082)),
            "integrations[1].name: 'mail' is given twice",
        ),
        (
            listed(entry("Mail!", 8081)),
            "integrations[0].name: required, a short name of a-z, 0-9, _ and - starting "
            "with a letter or digit (got 'Mail!')",
        ),
        (
            "integrations:\n  - listen: {port: 8081}\n",
            "integrations[0].name: required, a short name of a-z, 0-9, _ and - starting "
            "with a letter or digit (got '')",
        ),
        (
            listed(entry("mail", 8081), entry("crm", 8081)),
            "integrations[crm].listen.port: 127.0.0.1:8081 is integrations[mail]'s address already",
        ),
        (
            listed(entry("mail", 8081), entry("crm", 70000)),
            "integrations[crm].listen.port: must be a TCP port 0-65535 (got 70000)",
        ),
        (
            listed(entry("mail", 8081), entry("crm", "eighty")),
            "integrations[1].listen.port: must be a number (got 'eighty')",
        ),
        (
            listed(entry("mail", 8081), top="listen: {port: 8080}\n"),
            "listen: a section of each integration, not of the process, when integrations: "
            "is given; move it into the entries (integrations[N].listen)",
        ),
        ("integrations: []\n", "integrations: must be a list of integrations"),
        ("integrations: {name: x}\n", "integrations: must be a list of integrations"),
        (
            listed(
                entry("mail", 8081, jobs="{store: /tmp/j.db}"),
                entry("crm", 8082, jobs="{store: /tmp/j.db}"),
            ),
            "integrations[crm].jobs.store: integrations[mail] uses '/tmp/j.db' already; "
            "give each integration its own",
        ),
        (
            listed(entry("mail", 8081, admin="{port: 1}")),
            "integrations[0].admin: unknown key",
        ),
    ],
)
def test_errors_name_the_entry_and_the_key(text: str, message: str) -> None:
    assert error_of(text).startswith(message)


def test_an_entrys_scheme_error_names_it_by_name() -> None:
    text = listed(entry("mail", 8081), entry("crm", 8082)).replace(
        '    auth: {token: "${T}", secret: "${S}"}\n',
        "    auth: {scheme: bearer}\n",
    )
    assert error_of(text).startswith("integrations[mail].auth.api_key:")


def test_a_reload_refuses_a_bad_entry_alone_but_never_a_broken_list() -> None:
    good = {
        "name": "mail",
        "listen": {"port": 8081},
        "upstream": {"url": "http://h:1", "allow_insecure": True},
        "auth": {"token": "t", "secret": "s"},
    }
    bad = {**good, "name": "crm", "listen": {"port": 8082}, "limits": {"per_dya": 5}}
    cfg = build({"integrations": [dict(good), dict(bad)]}, lenient=True)
    assert [e.name for e in cfg.integrations] == ["mail"]
    ((name, error),) = cfg.refused
    assert name == "crm" and error.startswith("integrations[1].limits.per_dya: unknown key")
    # Strict (start-up, check): the same list is an error.
    with pytest.raises(ConfigError, match=r"^integrations\[1\]\.limits\.per_dya"):
        build({"integrations": [dict(good), dict(bad)]})
    # What spans the list is never lenient: a duplicate address, a nameless entry.
    twin = {**good, "name": "crm"}
    with pytest.raises(ConfigError, match="address already"):
        build({"integrations": [dict(good), twin]}, lenient=True)
    with pytest.raises(ConfigError, match=r"integrations\[1\]\.name"):
        build({"integrations": [dict(good), {"listen": {"port": 1}}]}, lenient=True)
    # All refused: nothing would be left, so the reload is refused whole.
    with pytest.raises(ConfigError, match="per_dya"):
        build({"integrations": [dict(bad)]}, lenient=True)


def test_secrets_of_entries_come_from_files_and_literals_are_warned_about(
    tmp_path: Path,
) -> None:
    (tmp_path / "secret").write_text("from-a-file-secret\n")
    text = listed(
        entry("mail", 8081).replace('secret: "${S}"', "secret_file: secret"),
        entry("crm", 8082).replace('secret: "${S}"', "secret: literal-secret"),
    )
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    path.chmod(0o600)
    cfg = resolve(Inputs(str(path)), ENV).config
    mail, crm = integrations_of(cfg)
    assert mail.auth.secret is not None and mail.auth.secret.get() == "from-a-file-secret"
    assert crm.auth.secret is not None and crm.auth.secret.get() == "literal-secret"
    assert any(w.startswith("integrations[1].auth.secret: a literal secret") for w in cfg.warnings)


def test_the_list_can_come_from_the_environment_as_json() -> None:
    env = {
        **ENV,
        "LUXSCI_PROXY_INTEGRATIONS": '[{"name": "mail", "listen": {"port": 8081}, '
        '"upstream": {"url": "http://127.0.0.1:9", "allow_insecure": true}, '
        '"auth": {"token": "t", "secret": "s"}}]',
    }
    cfg = resolve(Inputs(None), env).config
    assert [e.name for e in cfg.integrations] == ["mail"]
    assert isinstance(cfg.integrations[0], IntegrationConfig)


def test_the_examples_commented_integrations_block_is_a_valid_config(tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / "config.example.yaml").read_text()
    block = example[example.index("# integrations:") :]
    text = "\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines())
    (tmp_path / "crm-client-secret").write_text("s3cret\n")
    text = text.replace("/run/secrets/", f"{tmp_path}/")
    cfg = parse(text, {"LUXSCI_API_TOKEN": "t", "LUXSCI_API_SECRET": "s"})
    mail, crm = integrations_of(cfg)
    assert (mail.name, mail.auth.scheme, crm.name, crm.auth.scheme) == (
        "mail",
        "luxsci",
        "crm",
        "oauth2",
    )
    assert [w.per for w in crm.limits.windows] == [1.0, 3600.0]


OAUTH_ENV = {"CS": "client-secret-0a1b2c", "RT": "refresh-token-3d4e5f", "K": "A" * 43 + "="}


def oauth_entry(name: str, port: int, state_file: str | None = None) -> str:
    """An OAuth 2.0 entry whose rotated refresh tokens are kept (grant refresh_token)."""
    where = f', state_file: "{state_file}"' if state_file is not None else ""
    return (
        f"  - name: {name}\n"
        f"    listen: {{port: {port}}}\n"
        "    upstream: {url: http://127.0.0.1:9, allow_insecure: true}\n"
        "    auth: {scheme: oauth2, token_url: http://127.0.0.1:9/oauth/token, "
        'client_id: app, client_secret: "${CS}", grant: refresh_token, '
        f'refresh_token: "${{RT}}", state_key: "${{K}}"{where}}}\n'
    )


def test_two_listed_oauth_integrations_of_one_client_keep_their_tokens_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.schemes.oauth2 import state_path
    from proxy.schemes.registry import OAUTH2

    monkeypatch.setenv("LUXSCI_PROXY_STATE_DIR", str(tmp_path))
    cfg = parse(listed(oauth_entry("crm", 8081), oauth_entry("erp", 8082)), OAUTH_ENV)
    crm, erp = (OAUTH2.state_file(v.auth, v.integration) for v in integrations_of(cfg))
    assert crm is not None and erp is not None
    assert crm.parent == erp.parent == tmp_path
    assert crm.name.startswith("oauth2-crm-") and erp.name.startswith("oauth2-erp-")
    assert crm.name.removeprefix("oauth2-crm-") == erp.name.removeprefix("oauth2-erp-")

    # The one integration of a config without the list keeps today's name (and its state).
    single = parse(
        "upstream: {url: http://127.0.0.1:9, allow_insecure: true}\n"
        "auth: {scheme: oauth2, token_url: http://127.0.0.1:9/oauth/token, client_id: app, "
        'client_secret: "${CS}", grant: refresh_token, refresh_token: "${RT}", '
        'state_key: "${K}"}\n',
        OAUTH_ENV,
    )
    path = OAUTH2.state_file(single.auth, single.integration)
    assert path is not None and path.parent == tmp_path
    assert path.name == "oauth2-" + crm.name.removeprefix("oauth2-crm-")
    assert state_path(single.auth) == path


def test_an_entry_naming_anothers_default_oauth_state_file_is_an_error_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.schemes.registry import OAUTH2

    monkeypatch.setenv("LUXSCI_PROXY_STATE_DIR", str(tmp_path))
    cfg = parse(listed(oauth_entry("crm", 8081)), OAUTH_ENV)
    (view,) = integrations_of(cfg)
    default = OAUTH2.state_file(view.auth, view.integration)
    text = listed(oauth_entry("crm", 8081), oauth_entry("erp", 8082, state_file=str(default)))
    assert error_of(text, OAUTH_ENV) == (
        f"integrations[erp].auth.state_file: {default} is integrations[crm]'s state file "
        "already; give each integration its own"
    )
    # The same file given to both by name: the check of named state files says so first.
    same = str(tmp_path / "shared.state")
    text = listed(oauth_entry("crm", 8081, same), oauth_entry("erp", 8082, same))
    assert error_of(text, OAUTH_ENV).startswith(
        f"integrations[erp].auth.state_file: integrations[crm] uses '{same}' already"
    )
