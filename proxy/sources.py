"""Where each config value comes from: the command line, the environment, the file, defaults.

Precedence, highest first: flags > environment > file > defaults. Each key takes its
value from the highest source that sets it; `check` prints which one that was.

Every name is derived from the config's dataclasses (proxy/config.py), so a key added
there can be set from the environment and the command line at once:

- `<section>.<key>` is the variable `LUXSCI_PROXY_<SECTION>_<KEY>` (top-level keys:
  `LUXSCI_PROXY_<KEY>`) and the flag `--set <section>.<key>=VALUE`;
- a secret that may come from a file (`<key>_file`) also has `..._<KEY>_FILE` and
  `--<section>-<key>-file PATH`;
- a few common keys have flags of their own (`--upstream`, `--listen`, ...: SHORTCUTS).

Values from the environment and the command line are text, read as the file's values
are: numbers, true/false, choices in any case. A list is JSON when it starts with `[`
(lists of mappings, such as access.rules, must be), otherwise comma-separated. An
empty value means what an empty value in the file means (not set; a `state_file`:
off). Nothing is expanded: `${VAR}` belongs to the file. A `*_file` path from the file
is relative to the file's folder; from the environment or a flag, to the working
directory.

Secrets are never taken from the command line, where every user of the machine can
read them (`ps`): only their `_file` forms are. From the environment they are fine.

`LUXSCI_PROXY_CONFIG`, `LUXSCI_PROXY_STATE_DIR` and `LUXSCI_PROXY_STATE_KEY` keep
their own meanings (OWN_ENV). Any other `LUXSCI_PROXY_*` variable that names no key
is a warning naming it, never a refusal to start: a typo should be seen, and a
variable meant for a newer version should not stop an older one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from proxy.config import (
    _VAR,
    CONFIG_ENV,
    INTEGRATION_SECTIONS,
    STATE_DIR_ENV,
    STATE_KEY_ENV,
    Config,
    ConfigError,
    Secret,
    build,
    check_egress_env,
    file_keys,
    file_values,
    key_fields,
    literal_secrets,
    masked,
    read_text,
    read_yaml,
    readable_warning,
    state_key_from_env,
    url_passwords,
)

if typing.TYPE_CHECKING:
    from proxy.schemes.registry import SchemeKind

ENV_PREFIX = "LUXSCI_PROXY_"
# Variables of the prefix that are not keys: what each means.
OWN_ENV: Mapping[str, str] = types.MappingProxyType(
    {
        CONFIG_ENV: "the config file (when --config names none)",
        STATE_DIR_ENV: "the folder for state kept across restarts",
        STATE_KEY_ENV: "auth.state_key, when no source sets it",
    }
)
STDIN = "-"


@dataclass(frozen=True, slots=True)
class Key:
    """One key a source may set."""

    # "auth.secret_file"; `target` is the Config key it sets ("auth.secret").
    dotted: str
    path: tuple[str, ...]
    type: Any
    target: str
    # A Secret-typed value: never from the command line.
    secret: bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + "_".join(self.path).upper()

    @property
    def flag(self) -> str:
        """The flag of a `*_file` key (--auth-secret-file); others go through --set."""
        return "--" + "-".join(self.path).replace("_", "-")


def keys(cls: type[Any] = Config, prefix: tuple[str, ...] = ()) -> Iterator[Key]:
    """Every settable key of `cls`, sections walked in declaration order."""
    hints = typing.get_type_hints(cls)
    section = ".".join(prefix)
    for f in key_fields(cls):
        tp = hints[f.name]
        path = (*prefix, f.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from keys(tp, path)
            continue
        dotted = ".".join(path)
        yield Key(dotted, path, tp, dotted, _is_secret(tp))
        if f.name in file_keys(section):
            file_path = (*prefix, f"{f.name}_file")
            yield Key(".".join(file_path), file_path, str | None, dotted, False)


def _is_secret(tp: Any) -> bool:
    """A Secret, or a list of sections holding one (a client's token): never a flag value."""
    if tp is Secret:
        return True
    for arg in typing.get_args(tp):
        if arg is Secret or _is_secret(arg):
            return True
        if isinstance(arg, type) and dataclasses.is_dataclass(arg) and _holds_secret(arg):
            return True
    return False


def _holds_secret(cls: type[Any]) -> bool:
    """A section with a secret in it, however deep (an integration's auth.secret)."""
    hints = typing.get_type_hints(cls)
    for f in key_fields(cls):
        tp = hints[f.name]
        if _is_secret(tp):
            return True
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and _holds_secret(tp):
            return True
    return False


def env_names() -> dict[str, Key]:
    """Every key's variable, LUXSCI_PROXY_LISTEN_PORT -> listen.port."""
    found: dict[str, Key] = {}
    for key in keys():
        # Two keys of one name (`a.b_c` and `a_b.c`) would make one variable ambiguous.
        assert key.env not in found and key.env not in OWN_ENV, key.env
        found[key.env] = key
    return found


# -- the command line ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shortcut:
    """A flag of its own for a common key (or two: --listen HOST:PORT)."""

    flag: str
    keys: tuple[str, ...]
    metavar: str | None
    help: str


# The keys a sidecar is usually started with, as cloud-sql-proxy and oauth2-proxy users
# pass them; every other key is `--set KEY=VALUE`, every secret file `--<key>-file`.
SHORTCUTS = (
    Shortcut("--upstream", ("upstream.url",), "URL", "the API host (upstream.url)"),
    Shortcut(
        "--listen",
        ("listen.host", "listen.port"),
        "[HOST:]PORT",
        "where apps send their requests (listen.host, listen.port)",
    ),
    Shortcut(
        "--admin",
        ("admin.host", "admin.port"),
        "[HOST:]PORT",
        "/healthz, /readyz and /metrics (admin.host, admin.port)",
    ),
    Shortcut(
        "--log-level", ("logging.level",), "LEVEL", "debug, info, warning or error (logging.level)"
    ),
    Shortcut("--log-format", ("logging.format",), "FORMAT", "json or console (logging.format)"),
    Shortcut("--auth-scheme", ("auth.scheme",), "SCHEME", "luxsci, bearer or oauth2 (auth.scheme)"),
    Shortcut(
        "--allow-insecure",
        ("upstream.allow_insecure",),
        None,
        "permit a plain http:// upstream, the sandbox's and tests' (upstream.allow_insecure)",
    ),
)


@dataclass(frozen=True, slots=True)
class Setting:
    """One value the command line gives: `flag` as typed, `value` its text."""

    flag: str
    value: str


class _Ordered(argparse.Action):
    """Collects every config flag in command-line order, so that the last one wins."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        settings = list(getattr(namespace, "settings", None) or ())
        value = "true" if self.nargs == 0 else str(values)
        settings.append(Setting(option_string or self.dest, value))
        namespace.settings = settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the shortcuts, --set and the secret files: for `run` and `check`."""
    parser.set_defaults(settings=[])
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML config file, {STDIN} for standard input (default: ${CONFIG_ENV}; "
        "without one, flags and LUXSCI_PROXY_* variables alone)",
    )
    for s in SHORTCUTS:
        if s.metavar is None:
            parser.add_argument(s.flag, action=_Ordered, nargs=0, help=s.help)
        else:
            parser.add_argument(s.flag, action=_Ordered, metavar=s.metavar, help=s.help)
    parser.add_argument(
        "--set",
        action=_Ordered,
        metavar="KEY=VALUE",
        help="any other key, e.g. --set queue.max_wait=10 (lists: JSON or a,b,c); "
        "not secrets: use their variables or files",
    )
    files = parser.add_argument_group(
        "secrets from files (never as values: the command line is visible to every user)"
    )
    for key in keys():
        if key.dotted != key.target:
            files.add_argument(key.flag, action=_Ordered, metavar="PATH", help=key.target)


def host_port(text: str, flag: str) -> tuple[str | None, str]:
    """[HOST:]PORT, HOST possibly an [IPv6] literal; HOST None when only a port is given."""
    match = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]*)):(\d+)|(\d+)", text.strip())
    if match is None:
        raise ConfigError(f"{flag}: expected [HOST:]PORT, e.g. 127.0.0.1:8080 (got {text!r})")
    v6, host, port, alone = match.groups()
    if alone is not None:
        return None, alone
    return (v6 or host or None), port


# -- reading every source ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inputs:
    """What the command line named: the config file (or the text read from standard
    input, once: a reload cannot read it again) and the flags' settings in order."""

    file: str | None = None
    text: str | None = None
    settings: tuple[Setting, ...] = ()


def inputs_from(
    args: argparse.Namespace, env: Mapping[str, str], stdin: TextIO | None = None
) -> Inputs:
    file = args.config if args.config is not None else env.get(CONFIG_ENV)
    file = file or None  # LUXSCI_PROXY_CONFIG= (empty): no file, as with none set
    text = None
    if file == STDIN:
        try:
            text = (stdin if stdin is not None else sys.stdin).read()
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {STDIN}: cannot read standard input: {e}") from None
    return Inputs(file, text, tuple(args.settings))


@dataclass(frozen=True, slots=True)
class Resolved:
    config: Config
    # Config key -> "default", "file", "file:${VAR}", "env:NAME" or "flag:--x".
    origins: Mapping[str, str]
    # The file's name, "<stdin>", or "" when there is none.
    source: str


def resolve(
    inputs: Inputs,
    env: Mapping[str, str] | None = None,
    schemes: Mapping[str, SchemeKind] | None = None,
    lenient: bool = False,
) -> Resolved:
    """One validated config from every source; ConfigError naming the key (and the
    variable or flag that set it). `lenient`: see config.build (a reload's)."""
    env = os.environ if env is None else env
    by_env = env_names()
    all_keys = list(by_env.values())
    raw: dict[str, Any] = {}
    data: dict[str, Any] = {}
    source = ""
    if inputs.file == STDIN:
        source = "<stdin>"
        raw = read_yaml(inputs.text or "", source)
        data = file_values(raw, env)  # *_file paths: from the working directory
    elif inputs.file:
        source = inputs.file
        raw = read_yaml(read_text(source), source)
        data = file_values(raw, env, Path(source).parent)
    origins = _file_origins(raw, all_keys)
    from_env = [(by_env[name], env[name], f"env:{name}") for name in sorted(env) if name in by_env]
    _overlay(data, from_env, origins)
    _overlay(data, list(_from_flags(inputs.settings, all_keys)), origins)
    if state_key_from_env(data, env):
        origins["auth.state_key"] = f"env:{STATE_KEY_ENV}"
    try:
        cfg = build(data, schemes, lenient)
        check_egress_env(cfg, env)
    except ConfigError as e:
        raise _explained(e, origins, all_keys) from None
    warnings = literal_secrets(raw)
    cfg = dataclasses.replace(cfg, warnings=tuple(warnings))
    if inputs.file and inputs.file != STDIN:
        cfg = readable_warning(inputs.file, cfg)
    unknown = unknown_env(env, by_env)
    if unknown:
        cfg = dataclasses.replace(cfg, warnings=(*cfg.warnings, *unknown))
    every = {
        k.target: origins.get(k.target, "default")
        for k in all_keys
        if k.target == k.dotted and _in_form(k.target, bool(cfg.integrations))
    }
    return Resolved(cfg, types.MappingProxyType(every), source)


def _in_form(dotted: str, listed: bool) -> bool:
    """Whether the key belongs to the config's form (as `check` prints it): the list of
    integrations, or the one integration's sections."""
    if dotted == "integrations":
        return listed
    return not (listed and dotted.split(".")[0] in INTEGRATION_SECTIONS)


def _close_matches(name: str, names: Iterable[str], cutoff: float = 0.6) -> list[str]:
    """The best guess at what a misspelt `name` meant, if any is close enough."""
    # Imported here: only a mistake needs it, and a running proxy would carry its
    # ~140 kB for nothing (tests/test_light.py).
    import difflib

    return difflib.get_close_matches(name, list(names), n=1, cutoff=cutoff)


def unknown_env(env: Mapping[str, str], known: Mapping[str, Key]) -> list[str]:
    """A warning for each LUXSCI_PROXY_* variable that names nothing (with a guess)."""
    names = [*known, *OWN_ENV]
    found = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and name not in OWN_ENV:
            close = _close_matches(name, names, cutoff=0.8)
            guess = f"; did you mean {close[0]}?" if close else ""
            found.append(
                f"{name}: not a setting of luxsci-proxy, ignored (a key is "
                f"{ENV_PREFIX}<SECTION>_<KEY>, e.g. {ENV_PREFIX}LISTEN_PORT){guess}"
            )
    return found


def _file_origins(raw: dict[str, Any], all_keys: list[Key]) -> dict[str, str]:
    origins = {}
    for key in all_keys:
        node: Any = raw
        for name in key.path:
            node = node.get(name, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            continue
        label = "file"
        if key.dotted != key.target:
            label = f"file:{key.path[-1]}"
        elif isinstance(node, str) and (names := _VAR.findall(node)):
            label = "file:" + ",".join("${" + name + "}" for name, _ in names)
        origins[key.target] = label
    return origins


_ABSENT = object()


def _from_flags(settings: Sequence[Setting], all_keys: list[Key]) -> Iterator[tuple[Key, str, str]]:
    by_dotted = {key.dotted: key for key in all_keys}
    by_flag = {key.flag: key for key in all_keys if key.dotted != key.target}
    shortcuts = {s.flag: s for s in SHORTCUTS}
    for setting in settings:
        label = f"flag:{setting.flag}"
        if setting.flag == "--set":
            name, eq, value = setting.value.partition("=")
            name = name.strip()
            if not eq:
                raise ConfigError(
                    f"--set: expected KEY=VALUE, e.g. queue.max_wait=10 (got {name!r})"
                )
            key = by_dotted.get(name)
            if key is None:
                close = _close_matches(name, by_dotted)
                guess = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{name}: unknown key (--set){guess}")
            yield _no_secret(key, value, "--set"), value, label
        elif setting.flag in by_flag:
            yield by_flag[setting.flag], setting.value, label
        else:
            shortcut = shortcuts[setting.flag]
            if len(shortcut.keys) == 2:  # --listen / --admin: [HOST:]PORT
                host, port = host_port(setting.value, setting.flag)
                host_key, port_key = (by_dotted[k] for k in shortcut.keys)
                if host is not None:
                    yield host_key, host, label
                yield port_key, port, label
            else:
                key = by_dotted[shortcut.keys[0]]
                yield _no_secret(key, setting.value, setting.flag), setting.value, label


def _no_secret(key: Key, value: str, flag: str) -> Key:
    """Refuses a secret as a command-line value (visible to every user in `ps`)."""
    if key.secret:
        alternative = key.env
        if key.path[-1] in file_keys(".".join(key.path[:-1])):
            alternative += f", or its file: {key.flag}-file PATH"
        raise ConfigError(
            f"{key.dotted}: a secret is never taken from the command line, where every "
            f"user of the machine can read it; use {alternative}"
        )
    if "://" in value and url_passwords(value):
        raise ConfigError(
            f"{key.dotted}: a URL with a password is never taken from the command line, "
            f"where every user of the machine can read it; use {key.env}"
        )
    return key


def _overlay(
    data: dict[str, Any], values: list[tuple[Key, str, str]], origins: dict[str, str]
) -> None:
    """Set each key's value over what lower sources gave. A key and its `_file` form are
    one setting: the higher source's replaces both; one source giving both is an error."""
    given: dict[str, Key] = {}
    for key, text, label in values:
        other = given.setdefault(key.target, key)
        if other.dotted != key.dotted:
            raise ConfigError(
                f"{key.target}: give either {other.dotted} or {key.dotted}, not both ({label})"
            )
        node = data
        for name in key.path[:-1]:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: must be a mapping of keys to values")
            node = child
        name = key.path[-1]
        for form in (key.target.rsplit(".", 1)[-1], f"{key.target.rsplit('.', 1)[-1]}_file"):
            node.pop(form, None)
        node[name] = _from_text(text, key, label)
        origins[key.target] = label


def _from_text(text: str, key: Key, label: str) -> Any:
    """A value as the file would hold it: lists parsed, the rest left to the config's
    own coercion (numbers, booleans, choices), which names the key when it fails."""
    tp = key.type
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (types.UnionType, typing.Union) and len(args) == 1:
        tp = args[0]
    origin = typing.get_origin(tp)
    if origin not in (tuple, list, dict):
        return text
    stripped = text.strip()
    where = label.partition(":")[2]
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except ValueError as e:
            raise ConfigError(f"{key.dotted}: not valid JSON ({e}; set by {where})") from None
    items = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if origin is dict or any(dataclasses.is_dataclass(a) for a in items):
        raise ConfigError(f'{key.dotted}: give JSON, e.g. [{{"path": "/x/**"}}] (set by {where})')
    return [item.strip() for item in stripped.split(",") if item.strip()]


def _explained(error: ConfigError, origins: Mapping[str, str], all_keys: list[Key]) -> ConfigError:
    """The error, saying which variable or flag set the key it names, or how to set it."""
    text = str(error)
    dotted = re.sub(r"\[\d+\].*", "", text.partition(":")[0])
    origin = origins.get(dotted)
    if origin is not None and origin.startswith(("env:", "flag:")):
        return ConfigError(f"{text} (set by {origin.partition(':')[2]})")
    if origin is None:
        names = [k.env for k in all_keys if k.target == dotted]
        if names:  # a required key nobody set: the file is not the only way
            return ConfigError(f"{text}; from the environment: {' or '.join(names)}")
    return error


# -- check's view --------------------------------------------------------------------------

# Where the origin comments start, unless a line is longer.
_COMMENT_COLUMN = 36


def annotated_yaml(resolved: Resolved) -> str:
    """The config as YAML, every secret masked, each key followed by a comment saying
    where its value came from. Comments only: the whole text is still YAML."""
    entries: list[tuple[list[str], str | None]] = []

    def walk(node: Mapping[str, Any], prefix: str, indent: str) -> None:
        for name, value in node.items():
            dotted = f"{prefix}{name}"
            origin = resolved.origins.get(dotted)
            if origin is None and isinstance(value, dict):  # a section
                entries.append(([f"{indent}{name}:"], None))
                walk(value, f"{dotted}.", indent + "  ")
                continue
            dumped = yaml.safe_dump(
                {name: value}, sort_keys=False, default_flow_style=False, width=1 << 30
            )
            entries.append(([indent + line for line in dumped.splitlines()], origin))

    walk(masked(resolved.config), "", "")
    out = []
    for lines, origin in entries:
        if origin is None:
            out += lines
        elif len(lines) == 1 or lines[0].endswith(":"):
            # One line, or a key whose value starts below it (a block list): the
            # comment goes after the key.
            out.append(f"{lines[0].ljust(_COMMENT_COLUMN)}  # {origin}")
            out += lines[1:]
        else:
            # A value that runs over several lines: a comment inside it would be text.
            indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
            out += [f"{indent}# {origin}", *lines]
    return "\n".join(out)
