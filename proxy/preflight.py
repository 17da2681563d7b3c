"""What `run` and `check` both say about a config before serving.

`run` logs each finding as a warning event at start-up; `check` prints the same
findings on stderr. Both take them from `findings()`, so what one warns about the
other cannot miss (an open listener, a plain-HTTP upstream, a literal secret, a
state directory that cannot be written...).

State the proxy keeps across restarts (the day's request count, rotated OAuth
refresh tokens) goes to files in the state directory ($LUXSCI_PROXY_STATE_DIR)
unless the config names other places. Whether those folders can be written is
judged here without writing anything (`check` must leave no trace): the folder, or
the nearest existing parent it would be made in, must be a directory this process
may write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config import Config, integrations_of, state_dir
from proxy.pipeline.admission import AccessPolicy
from proxy.schemes.registry import BUILT_IN, SchemeKind

__all__ = ["Finding", "StateUse", "findings", "state_problem", "state_uses"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One warning: the event `run` logs (with `fields`), the line `check` prints."""

    event: str
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StateUse:
    """A config key that keeps state in `folder`."""

    key: str
    folder: Path
    # Readiness depends on it: the operator asked for this state explicitly (a named
    # limits.state_file), or losing it costs a credential (rotated refresh tokens).
    required: bool


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def findings(cfg: Config, schemes: Mapping[str, SchemeKind] = BUILT_IN) -> list[Finding]:
    """Every warning the config deserves, in the order `run` logs them."""
    found = [Finding("config_warning", w, {"warning": w}) for w in cfg.warnings]
    views = integrations_of(cfg)
    for view in views:
        found += [_named(view, f) for f in _integration_findings(view)]
    if cfg.logging.log_bodies:
        note = (
            "request and response bodies go to the log; they may hold protected "
            "health information: turn logging.log_bodies off outside debugging"
        )
        found.append(Finding("log_bodies_enabled", f"logging.log_bodies: {note}", {"note": note}))
    for view in views:
        for use in state_uses(view, schemes):
            problem = state_problem(use.folder)
            if problem is not None:
                found.append(_named(view, state_finding(use, problem)))
    return found


def _named(cfg: Config, finding: Finding) -> Finding:
    """An integration's finding, naming it when the config lists several."""
    if not cfg.integration:
        return finding
    return Finding(
        finding.event,
        f"integrations[{cfg.integration}].{finding.message}",
        {"integration": cfg.integration, **finding.fields},
    )


def _integration_findings(cfg: Config) -> list[Finding]:
    found = []
    if not _loopback(cfg.listen.host) and AccessPolicy(cfg.access).open_to_anyone:
        note = (
            "anyone who can reach this port acts with the integration's full rights: "
            "set access.allow_clients and/or access.client_token, or listen on 127.0.0.1"
        )
        found.append(
            Finding(
                "proxy_open_to_the_network",
                f"listen.host: {cfg.listen.host} is open to the network; {note}",
                {"listen": cfg.listen.host, "note": note},
            )
        )
    if cfg.upstream.url.startswith("http://"):
        note = "upstream.allow_insecure: credentials and data travel in the clear"
        found.append(
            Finding(
                "upstream_not_encrypted",
                f"upstream.url: {cfg.upstream.url} is plain http; {note}",
                {"upstream": cfg.upstream.url, "note": note},
            )
        )
    return found


def state_finding(use: StateUse, problem: str) -> Finding:
    consequence = (
        "readiness fails until it can be written"
        if use.required
        else "the proxy serves, but forgets it on restart"
    )
    return Finding(
        "state_dir_not_writable",
        f"{use.key}: cannot keep state in {use.folder}: {problem}; {consequence} "
        f"(set {_STATE_DIR_HINT})",
        {"key": use.key, "dir": str(use.folder), "error": problem, "required": use.required},
    )


_STATE_DIR_HINT = "LUXSCI_PROXY_STATE_DIR to a writable folder, or the key to another path"


def state_uses(
    cfg: Config,
    schemes: Mapping[str, SchemeKind] = BUILT_IN,
    env: Mapping[str, str] | None = None,
) -> list[StateUse]:
    """Where this config keeps state across restarts."""
    uses = []
    limits = cfg.limits
    if limits.backend == "memory" and limits.state_file != "":
        # The day's count; the default place is a convenience, a named one a request.
        folder = Path(limits.state_file).parent if limits.state_file else state_dir(env)
        uses.append(StateUse("limits.state_file", folder, limits.state_file is not None))
    kind = schemes.get(cfg.auth.scheme)
    path = kind.state_file(cfg.auth, cfg.integration) if kind is not None else None
    if path is not None:
        uses.append(StateUse("auth.state_file", path.parent, True))
    return uses


def state_problem(folder: Path) -> str | None:
    """Why files cannot be written in `folder`, or None when they can (without writing:
    the folder, or the nearest parent it would be made in, is a writable directory)."""
    probe = folder
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is not a directory"
    except OSError as e:
        return f"{probe}: {e.strerror}"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            return f"{probe} is on a read-only file system"
        return f"{probe} is not writable by this user (uid {os.geteuid()})"
    return None
