"""The admin port's status page (`/`) and the same data as JSON (`/status.json`).

What a person looks at when something is off: readiness checks, the auth session,
each rate-limit budget, the queue by lane and by app, durable jobs, and the latest
answers the proxy made itself. The page is one self-contained HTML document (inline
CSS and a little inline JavaScript, nothing fetched from elsewhere, so it works
offline and behind any egress policy); its script reads /status.json every few
seconds and draws the same sections again, and without JavaScript a <meta refresh>
reloads the whole page.

Observability is a leaf (pyproject.toml's import contracts): the service reads its
components and hands this module plain values through `StatusSources`; nothing here
reaches into the limiter, the schemes or the pipeline. The one thing kept is
`RecentErrors` (recent.py), the small ring the forwarder appends a refused request to
(one append per refusal: the hot path of a served request never touches it).

Imported when the page or its JSON is first asked for (admin.py, the service's
`status()`), not at start-up: a proxy nobody looks at never loads it.

Safety: every string of the data goes through the service's log redactor (the
same one that keeps secrets out of the logs) before it is served; paths are masked
(a user's login is `[user]`) and never carry a query string; no body, header or
credential is part of the data at all. The HTML escapes everything it writes; the
script builds the page with textContent only. The Content-Security-Policy allows
exactly the page's own inline style and script (by hash) and requests to its own
origin.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.observe.recent import RecentErrors

# Seconds between the page's reads of /status.json, and between reloads without JavaScript.
REFRESH_SECONDS = 3
NOSCRIPT_RELOAD_SECONDS = 5
# Lanes in the order requests are served.
LANES = ("high", "normal", "low", "background")
# Job states in the order of a job's life (proxy/jobs/model.py); others after them.
JOB_STATES = ("queued", "running", "succeeded", "failed", "outcome_unknown", "expired", "cancelled")


def job_order(by_state: Mapping[str, int]) -> list[str]:
    """The states as the page lists them (the page's script orders them the same way)."""
    known = len(JOB_STATES)
    return sorted(by_state, key=lambda s: (JOB_STATES.index(s) if s in JOB_STATES else known, s))


# -- what the service hands in -------------------------------------------------------------


@dataclass(frozen=True)
class AuthView:
    scheme: str
    ok: bool  # the readiness check's verdict
    message: str | None  # its error, when failing
    valid: bool  # holds a credential it would use right now
    # Seconds since the current code / token was earned; None where credentials do not age.
    credential_age: float | None
    # How long one lives (auth.code_lifetime), where the proxy knows it.
    credential_lifetime: float | None
    # Seconds until the current token expires (oauth2), where the scheme says.
    expires_in: float | None
    logins: int  # successful logins / token fetches since start
    login_failures: int  # refused or failed ones


@dataclass(frozen=True)
class BudgetView:
    """One rate-limit budget (scope) in the current window."""

    scope: str
    used: int  # permits counted in this window (as this process knows it)
    limit: int  # what the proxy holds itself to: the configured and the API's, the lower
    configured_limit: int
    api_limit: int | None  # from the API's rate-limit headers, when it sent them
    api_remaining: int | None
    window: float  # seconds
    resets_in: float  # seconds until this window ends
    held_for: float  # seconds the API told the proxy to send nothing more (0: not held)
    queued: int
    queued_by_lane: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DayView:
    used: int
    limit: int | None
    length: float  # seconds in the API's day (limits.day_seconds)
    resets_in: float


@dataclass(frozen=True)
class ClientView:
    name: str
    waiting: int
    max_queued: int | None  # its share of the queue
    max_lane: str | None  # the highest lane it may ask for


@dataclass(frozen=True)
class QueueView:
    waiting: int
    max_size: int
    max_wait: float
    inflight: int
    clients: Sequence[ClientView]


@dataclass(frozen=True)
class JobsView:
    """Durable jobs as last counted (the runner counts them; reading costs nothing)."""

    ok: bool
    by_state: Mapping[str, int]
    oldest_queued_age: float | None


@dataclass(frozen=True)
class StatusSources:
    """Callables read when the page or its JSON is asked for (no I/O in any of them)."""

    scheme: str
    backend: str
    readiness: Callable[[], tuple[bool, dict[str, Any]]]
    # Which checks /readyz requires (the others are reported only).
    required: Callable[[], Collection[str]]
    auth: Callable[[], AuthView]
    budgets: Callable[[], Sequence[BudgetView]]
    day: Callable[[], DayView]
    queue: Callable[[], QueueView]
    # None: durable jobs are not enabled in this proxy.
    jobs: Callable[[], JobsView | None]
    errors: RecentErrors
    uptime: Callable[[], float]
    # Masks every known secret in a string (the log redactor's scrub).
    scrub: Callable[[str], str] = lambda text: text


# -- the data ------------------------------------------------------------------------------


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(max(0.0, value), 1)


def _message(check: Mapping[str, Any]) -> str:
    """A readiness check in one line: its error, else what it reports besides `ok`."""
    error = check.get("error")
    if error:
        return str(error)
    parts = []
    for key, value in check.items():
        if key in ("ok", "required", "error"):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def _auth_state(auth: AuthView) -> str:
    if auth.ok:
        # ok without a usable credential: idle past its life, the next request logs in.
        return "active" if auth.valid else "expired"
    if not auth.logins and not auth.login_failures:
        return "starting"
    return "failing"


def _scrubbed(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): _scrubbed(v, scrub) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, scrub) for v in value]
    return value


def snapshot(sources: StatusSources) -> dict[str, Any]:
    """The status as plain JSON data (its shape is documented in the README)."""
    s = sources
    ready, checks = s.readiness()
    required = s.required()
    auth = s.auth()
    day = s.day()
    queue = s.queue()
    budgets = s.budgets()
    jobs = s.jobs()
    by_scope_lane = {
        b.scope: {lane: b.queued_by_lane.get(lane, 0) for lane in LANES} for b in budgets
    }
    data: dict[str, Any] = {
        "proxy": {
            "version": __version__,
            "scheme": s.scheme,
            "backend": s.backend,
            "time": round(time.time(), 3),
            "uptime_s": _seconds(s.uptime()),
        },
        "ready": ready,
        "checks": [
            {
                "name": name,
                "ok": bool(check.get("ok")),
                "required": name in required or bool(check.get("required")),
                "message": _message(check),
            }
            for name, check in checks.items()
        ],
        "auth": {
            "scheme": auth.scheme,
            "state": _auth_state(auth),
            "ok": auth.ok,
            "message": auth.message,
            "credential_age_s": _seconds(auth.credential_age),
            "credential_lifetime_s": _seconds(auth.credential_lifetime),
            "expires_in_s": _seconds(auth.expires_in),
            "logins": auth.logins,
            "login_failures": auth.login_failures,
        },
        "budgets": [
            {
                "scope": b.scope,
                "used": b.used,
                "limit": b.limit,
                "configured_limit": b.configured_limit,
                "api_limit": b.api_limit,
                "api_remaining": b.api_remaining,
                "window_s": _seconds(b.window),
                "resets_in_s": _seconds(b.resets_in),
                "held_for_s": _seconds(b.held_for),
                "queued": b.queued,
            }
            for b in budgets
        ],
        "day": {
            "used": day.used,
            "limit": day.limit,
            "window_s": _seconds(day.length),
            "resets_in_s": _seconds(day.resets_in),
        },
        "queue": {
            "waiting": queue.waiting,
            "max_size": queue.max_size,
            "max_wait_s": _seconds(queue.max_wait),
            "inflight": queue.inflight,
            "by_lane": {lane: sum(d[lane] for d in by_scope_lane.values()) for lane in LANES},
            "by_scope_lane": by_scope_lane,
            "by_client": [
                {
                    "client": c.name,
                    "waiting": c.waiting,
                    "max_queued": c.max_queued,
                    "max_lane": c.max_lane,
                }
                for c in queue.clients
            ],
        },
        "jobs": {"enabled": False}
        if jobs is None
        else {
            "enabled": True,
            "ok": jobs.ok,
            "by_state": dict(sorted(jobs.by_state.items())),
            "oldest_queued_age_s": _seconds(jobs.oldest_queued_age),
        },
        "errors": {
            "kept": s.errors.size,
            "total": s.errors.total,
            "recent": [
                {
                    "time": round(e.time, 3),
                    "status": e.status,
                    "reason": e.reason,
                    "method": e.method,
                    "path": e.path,
                    "client": e.client,
                    "request_id": e.request_id,
                }
                for e in s.errors.latest()
            ],
        },
    }
    scrubbed: dict[str, Any] = _scrubbed(data, s.scrub)
    return scrubbed


def to_json(data: Mapping[str, Any]) -> str:
    # ASCII only, and `<`, `>`, `&` escaped too: safe to read as text of any kind.
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# -- the page --------------------------------------------------------------------------------
#
# The page is drawn twice from the same data: here, for the first view (and for a
# browser without JavaScript), and by _SCRIPT on every refresh. Both write the same
# elements with the same `data-k` names, which is what the tests read.

_HERE = Path(__file__).parent
# The page's style and script, beside this module (package data): each is hashed into
# the Content-Security-Policy, so it must be sent exactly as read.
_STYLE = (_HERE / "status_page.css").read_text(encoding="utf-8")
_SCRIPT = (_HERE / "status_page.js").read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


# Only this page's own style and script run, it may read only its own origin, and no
# other page may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src {_csp_hash(_STYLE)}; "
    f"script-src {_csp_hash(_SCRIPT)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_NOUN = {"luxsci": "auth code", "oauth2": "access token", "bearer": "API key"}
_DASH = "\u2014"


def duration(seconds: float | None) -> str:
    """12s, 3m 04s, 2h 05m, 1d 02h (the page's script writes the same)."""
    if seconds is None:
        return _DASH
    s = int(max(0.0, seconds) // 1)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def clock(unix: float) -> str:
    """HH:MM:SS in UTC."""
    return time.strftime("%H:%M:%S", time.gmtime(int(unix // 1)))


def _num(value: object) -> str:
    return _DASH if value is None else str(value)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _el(tag: str, text: object = None, cls: str | None = None, key: str | None = None) -> str:
    attrs = ""
    if cls:
        attrs += f' class="{_e(cls)}"'
    if key:
        attrs += f' data-k="{_e(key)}"'
    return f"<{tag}{attrs}>{'' if text is None else _e(text)}</{tag}>"


def _raw(tag: str, inner: str, cls: str | None = None) -> str:
    """An element around markup already escaped."""
    attrs = f' class="{_e(cls)}"' if cls else ""
    return f"<{tag}{attrs}>{inner}</{tag}>"


def _badge(ok: bool, yes: str, no: str, key: str | None = None) -> str:
    return _el("span", yes if ok else no, "badge " + ("ok" if ok else "bad"), key)


def _table(heads: Sequence[tuple[str, str | None]], rows: Sequence[str]) -> str:
    head = "".join(_el("th", text, cls) for text, cls in heads)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _row(cells: Sequence[str], cls: str | None = None) -> str:
    return _raw("tr", "".join(cells), cls)


def _used(used: int, limit: int | None, key: str) -> str:
    bar = ""
    if limit:
        bar = f'<progress max="{int(limit)}" value="{min(int(used), int(limit))}"></progress>'
    return (
        bar
        + _el("span", used, None, key + ".used")
        + " / "
        + _el("span", _num(limit), None, key + ".limit")
    )


def _section(id_: str, title: str, inner: str, cls: str | None = None) -> str:
    attrs = f' class="{cls}"' if cls else ""
    return f'<section id="{id_}"{attrs}>{_el("h2", title)}{inner}</section>'


def _checks(d: Mapping[str, Any]) -> str:
    rows = [
        _row(
            [
                _el("td", c["name"]),
                _raw("td", _badge(c["ok"], "ok", "failing", f"check.{c['name']}.ok")),
                _el("td", "required" if c["required"] else "reported", "mute"),
                _el("td", c["message"], None, f"check.{c['name']}.message"),
            ]
        )
        for c in d["checks"]
    ]
    heads = [("check", None), ("state", None), ("/readyz", None), ("details", None)]
    return _section("checks", "Readiness", _table(heads, rows))


def _auth(d: Mapping[str, Any]) -> str:
    a = d["auth"]
    state = a["state"]
    tone = "ok" if state == "active" else "warn" if state in ("expired", "starting") else "bad"
    age = _el("span", duration(a["credential_age_s"]), None, "auth.age")
    if a["credential_lifetime_s"] is not None:
        age += _e(f" of {duration(a['credential_lifetime_s'])}")
    if a["expires_in_s"] is not None:
        age += _e(f" (expires in {duration(a['expires_in_s'])})")
    pairs = [
        ("scheme", _el("span", a["scheme"], None, "auth.scheme")),
        ("state", _el("span", state, f"badge {tone}", "auth.state")),
        (f"age of the {_NOUN.get(a['scheme'], 'credential')}", age),
        ("logins", _el("span", a["logins"], None, "auth.logins")),
        ("failed logins", _el("span", a["login_failures"], None, "auth.failures")),
    ]
    if a["message"]:
        pairs.append(("message", _el("span", a["message"], None, "auth.message")))
    inner = "".join(_el("dt", k) + _raw("dd", v) for k, v in pairs)
    return _section("auth", "Auth session", _raw("dl", inner))


def _budgets(d: Mapping[str, Any]) -> str:
    rows = []
    for b in d["budgets"]:
        k = f"budget.{b['scope']}"
        api = _DASH if b["api_limit"] is None else f"{b['api_remaining']} left of {b['api_limit']}"
        held = (
            _el("span", f"held {duration(b['held_for_s'])}", "badge warn", k + ".held")
            if b["held_for_s"]
            else _el("span", "no", "mute", k + ".held")
        )
        rows.append(
            _row(
                [
                    _el("td", b["scope"]),
                    _raw("td", _used(b["used"], b["limit"], k), "used"),
                    _el("td", duration(b["window_s"]), None, k + ".window"),
                    _el("td", duration(b["resets_in_s"]), None, k + ".resets"),
                    _el("td", api, None, k + ".api"),
                    _raw("td", held),
                    _el("td", b["queued"], "n", k + ".queued"),
                ]
            )
        )
    day = d["day"]
    rows.append(
        _row(
            [
                _el("td", "day"),
                _raw("td", _used(day["used"], day["limit"], "day"), "used"),
                _el("td", duration(day["window_s"]), None, "day.window"),
                _el("td", duration(day["resets_in_s"]), None, "day.resets"),
                _el("td", _DASH),
                _el("td", ""),
                _el("td", ""),
            ]
        )
    )
    heads = [
        ("scope", None),
        ("used / limit", None),
        ("window", None),
        ("resets in", None),
        ("the API says", None),
        ("held", None),
        ("waiting", "n"),
    ]
    return _section("budgets", "Budgets", _table(heads, rows), "span2")


def _queue(d: Mapping[str, Any]) -> str:
    q = d["queue"]
    scopes = list(q["by_scope_lane"])
    lane_rows = [
        _row(
            [
                _el("td", lane),
                *(
                    _el("td", q["by_scope_lane"][s][lane], "n", f"queue.lane.{lane}.{s}")
                    for s in scopes
                ),
                _el("td", q["by_lane"][lane], "n", f"queue.lane.{lane}.total"),
            ]
        )
        for lane in LANES
    ]
    lane_heads = [("lane", None), *((s, "n") for s in scopes), ("total", "n")]
    client_rows = [
        _row(
            [
                _el("td", c["client"]),
                _el("td", c["waiting"], "n", f"queue.client.{c['client']}.waiting"),
                _el("td", _num(c["max_queued"]), "n"),
                _el("td", _num(c["max_lane"])),
            ]
        )
        for c in q["by_client"]
    ]
    client_heads = [
        ("app (client)", None),
        ("waiting", "n"),
        ("share", "n"),
        ("highest lane", None),
    ]
    summary = _el("span", q["waiting"], None, "queue.waiting") + _e(
        f" waiting of {q['max_size']} at most \u00b7 {q['inflight']} in flight"
        f" \u00b7 longest wait {duration(q['max_wait_s'])}"
    )
    inner = _table(lane_heads, lane_rows) + _table(client_heads, client_rows)
    return _section("queue", "Queue", inner + _raw("p", summary, "note"))


def _jobs(d: Mapping[str, Any]) -> str:
    j = d["jobs"]
    if not j["enabled"]:
        return _section("jobs", "Jobs", _el("p", "jobs: not enabled", "mute", "jobs.enabled"))
    by_state = j["by_state"]
    pairs = "".join(
        _el("dt", state) + _el("dd", by_state[state], None, f"jobs.state.{state}")
        for state in job_order(by_state)
    )
    note = (
        _badge(j["ok"], "store ok", "store failing", "jobs.ok")
        + " oldest queued: "
        + _el("span", duration(j["oldest_queued_age_s"]), None, "jobs.oldest")
    )
    return _section("jobs", "Jobs", _raw("dl", pairs, "jobs") + _raw("p", note, "note"))


def _path_cell(path: str) -> str:
    """A path that may wrap after each `/` (a <wbr> there), copied as it is."""
    pieces = "/<wbr>".join(_e(piece) for piece in path.split("/"))
    return f'<td class="path" data-k="error.path">{pieces}</td>'


def _errors(d: Mapping[str, Any]) -> str:
    e = d["errors"]
    rows = [
        _row(
            [
                _el("td", clock(r["time"])),
                _el("td", r["status"], "n", "error.status"),
                _el("td", r["reason"], None, "error.reason"),
                _el("td", r["method"], None, "error.method"),
                _path_cell(r["path"]),
                _el("td", _num(r["client"]), None, "error.client"),
                _el("td", r["request_id"], "rid", "error.request_id"),
            ],
            "error-row",
        )
        for r in e["recent"]
    ] or ['<tr><td class="mute" colspan="7">none since start</td></tr>']
    heads = [
        ("time", None),
        ("status", "n"),
        ("reason", None),
        ("method", None),
        ("path", None),
        ("app", None),
        ("request id", None),
    ]
    note = (
        _e(f"the latest {len(e['recent'])} of ")
        + _el("span", e["total"], None, "errors.total")
        + _e(f" since start (the last {e['kept']} are kept); times in UTC")
    )
    inner = _table(heads, rows) + _raw("p", note, "note")
    return _section("errors", "Latest proxy-made errors", inner, "wide")


def _integration_links(data: Mapping[str, Any]) -> str:
    """With several integrations: which one the page shows, and links to the others."""
    names = data.get("integrations")
    if not names:
        return ""
    links = " ".join(
        _el("strong", name, None, "integration")
        if name == data.get("integration")
        else f'<a href="?integration={_e(name)}">{_e(name)}</a>'
        for name in names
    )
    return f'<nav class="meta" id="integrations">integrations: {links}</nav>'


def render_html(data: Mapping[str, Any]) -> str:
    """The whole page for `data` (a snapshot): readable as it is, kept fresh by its script."""
    p = data["proxy"]
    ready = data["ready"]
    meta = (
        f"v{p['version']} \u00b7 scheme {p['scheme']} \u00b7 limits {p['backend']}"
        f" \u00b7 up {duration(p['uptime_s'])}"
    )
    sections = "".join(part(data) for part in (_checks, _auth, _jobs, _budgets, _queue, _errors))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f'<noscript><meta http-equiv="refresh" content="{NOSCRIPT_RELOAD_SECONDS}"></noscript>'
        "<title>luxsci-proxy status</title>"
        f"<style>{_STYLE}</style></head>"
        f'<body data-rendered="html" data-refresh="{REFRESH_SECONDS}">'
        "<header><h1>luxsci-proxy</h1>"
        + f'<span id="ready" class="badge {"ok" if ready else "bad"}">'
        + ("ready" if ready else "not ready")
        + "</span>"
        + f'<span class="meta" id="meta">{_e(meta)}</span>'
        + f'<span class="meta">data of <span id="updated">{_e(clock(p["time"]))}</span> UTC</span>'
        + f'<span class="live" id="live">reloads every {NOSCRIPT_RELOAD_SECONDS} s</span>'
        + _integration_links(data)
        + "</header>"
        + f"<main>{sections}</main>"
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )
