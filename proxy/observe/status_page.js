// The status page's refresh: read status.json every few seconds and draw the sections
// again, exactly as proxy/observe/status.py draws them the first time (same elements,
// same data-k names). Text goes in through textContent only: nothing from the data is
// ever parsed as HTML.
"use strict";
(function () {
  var LANES = ["high", "normal", "low", "background"];
  var NOUN = {luxsci: "auth code", oauth2: "access token", bearer: "API key"};
  var JOB_STATES = ["queued", "running", "succeeded", "failed", "outcome_unknown", "expired",
    "cancelled"];
  var DASH = "\u2014";
  var DOT = " \u00b7 ";

  // The order of a job's life, then any other state by name (status.job_order).
  function jobOrder(byState) {
    function rank(s) { var i = JOB_STATES.indexOf(s); return i < 0 ? JOB_STATES.length : i; }
    return Object.keys(byState).sort(function (a, b) {
      return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
    });
  }

  function two(n) { return (n < 10 ? "0" : "") + n; }

  // 12s, 3m 04s, 2h 05m, 1d 02h (status.duration).
  function dur(s) {
    if (s === null || s === undefined) return DASH;
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + two(Math.floor((s % 3600) / 60)) + "m";
    return Math.floor(s / 86400) + "d " + two(Math.floor((s % 86400) / 3600)) + "h";
  }

  // HH:MM:SS in UTC (status.clock).
  function clock(t) { return new Date(Math.floor(t) * 1000).toISOString().substr(11, 8); }

  function num(v) { return v === null || v === undefined ? DASH : String(v); }

  function el(tag, text, cls, key) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    if (key) e.setAttribute("data-k", key);
    return e;
  }

  function text(t) { return document.createTextNode(t); }

  function badge(ok, yes, no, key) {
    return el("span", ok ? yes : no, "badge " + (ok ? "ok" : "bad"), key);
  }

  function td(t, cls, key) { return el("td", t, cls, key); }

  function tdOf(node, cls) {
    var cell = el("td", null, cls);
    cell.appendChild(node);
    return cell;
  }

  function row(cells, cls) {
    var tr = el("tr", null, cls);
    cells.forEach(function (c) { tr.appendChild(c); });
    return tr;
  }

  function table(heads, rows) {
    var t = el("table"), head = el("tr"), thead = el("thead"), body = el("tbody");
    heads.forEach(function (h) { head.appendChild(el("th", h[0], h[1])); });
    thead.appendChild(head);
    rows.forEach(function (r) { body.appendChild(r); });
    t.appendChild(thead);
    t.appendChild(body);
    return t;
  }

  function note(parts) {
    var p = el("p", null, "note");
    parts.forEach(function (x) { p.appendChild(typeof x === "string" ? text(x) : x); });
    return p;
  }

  function fill(id, title, nodes) {
    var section = document.getElementById(id);
    section.replaceChildren(el("h2", title));
    nodes.forEach(function (n) { section.appendChild(n); });
  }

  function usedOf(used, limit, key) {
    var frag = document.createDocumentFragment();
    if (limit) {
      var bar = el("progress");
      bar.max = limit;
      bar.value = Math.min(used, limit);
      frag.appendChild(bar);
    }
    frag.appendChild(el("span", String(used), null, key + ".used"));
    frag.appendChild(text(" / "));
    frag.appendChild(el("span", num(limit), null, key + ".limit"));
    return frag;
  }

  function header(d) {
    var p = d.proxy, ready = document.getElementById("ready");
    ready.textContent = d.ready ? "ready" : "not ready";
    ready.className = "badge " + (d.ready ? "ok" : "bad");
    document.getElementById("meta").textContent = "v" + p.version + DOT + "scheme " + p.scheme +
      DOT + "limits " + p.backend + DOT + "up " + dur(p.uptime_s);
    document.getElementById("updated").textContent = clock(p.time);
  }

  function checks(d) {
    var rows = d.checks.map(function (c) {
      return row([
        td(c.name),
        tdOf(badge(c.ok, "ok", "failing", "check." + c.name + ".ok")),
        td(c.required ? "required" : "reported", "mute"),
        td(c.message, null, "check." + c.name + ".message"),
      ]);
    });
    fill("checks", "Readiness", [table([["check"], ["state"], ["/readyz"], ["details"]], rows)]);
  }

  function auth(d) {
    var a = d.auth;
    var tone = a.state === "active" ? "ok"
      : a.state === "expired" || a.state === "starting" ? "warn" : "bad";
    var age = document.createDocumentFragment();
    age.appendChild(el("span", dur(a.credential_age_s), null, "auth.age"));
    if (a.credential_lifetime_s !== null) age.appendChild(text(" of " + dur(a.credential_lifetime_s)));
    if (a.expires_in_s !== null) age.appendChild(text(" (expires in " + dur(a.expires_in_s) + ")"));
    var pairs = [
      ["scheme", el("span", a.scheme, null, "auth.scheme")],
      ["state", el("span", a.state, "badge " + tone, "auth.state")],
      ["age of the " + (NOUN[a.scheme] || "credential"), age],
      ["logins", el("span", String(a.logins), null, "auth.logins")],
      ["failed logins", el("span", String(a.login_failures), null, "auth.failures")],
    ];
    if (a.message) pairs.push(["message", el("span", a.message, null, "auth.message")]);
    var list = el("dl");
    pairs.forEach(function (p) {
      list.appendChild(el("dt", p[0]));
      var dd = el("dd");
      dd.appendChild(p[1]);
      list.appendChild(dd);
    });
    fill("auth", "Auth session", [list]);
  }

  function budgets(d) {
    var rows = d.budgets.map(function (b) {
      var k = "budget." + b.scope;
      var api = b.api_limit === null ? DASH : b.api_remaining + " left of " + b.api_limit;
      var held = b.held_for_s
        ? el("span", "held " + dur(b.held_for_s), "badge warn", k + ".held")
        : el("span", "no", "mute", k + ".held");
      return row([
        td(b.scope),
        tdOf(usedOf(b.used, b.limit, k), "used"),
        td(dur(b.window_s), null, k + ".window"),
        td(dur(b.resets_in_s), null, k + ".resets"),
        td(api, null, k + ".api"),
        tdOf(held),
        td(String(b.queued), "n", k + ".queued"),
      ]);
    });
    rows.push(row([
      td("day"),
      tdOf(usedOf(d.day.used, d.day.limit, "day"), "used"),
      td(dur(d.day.window_s), null, "day.window"),
      td(dur(d.day.resets_in_s), null, "day.resets"),
      td(DASH), td(""), td(""),
    ]));
    var heads = [["scope"], ["used / limit"], ["window"], ["resets in"], ["the API says"], ["held"],
      ["waiting", "n"]];
    fill("budgets", "Budgets", [table(heads, rows)]);
  }

  function queue(d) {
    var q = d.queue, scopes = Object.keys(q.by_scope_lane);
    var laneRows = LANES.map(function (lane) {
      var cells = [td(lane)];
      scopes.forEach(function (s) {
        cells.push(td(String(q.by_scope_lane[s][lane]), "n", "queue.lane." + lane + "." + s));
      });
      cells.push(td(String(q.by_lane[lane]), "n", "queue.lane." + lane + ".total"));
      return row(cells);
    });
    var laneHeads = [["lane"]].concat(scopes.map(function (s) { return [s, "n"]; }),
      [["total", "n"]]);
    var clientRows = q.by_client.map(function (c) {
      return row([
        td(c.client),
        td(String(c.waiting), "n", "queue.client." + c.client + ".waiting"),
        td(num(c.max_queued), "n"),
        td(num(c.max_lane)),
      ]);
    });
    var clientHeads = [["app (client)"], ["waiting", "n"], ["share", "n"], ["highest lane"]];
    fill("queue", "Queue", [
      table(laneHeads, laneRows),
      table(clientHeads, clientRows),
      note([el("span", String(q.waiting), null, "queue.waiting"),
        " waiting of " + q.max_size + " at most" + DOT + q.inflight + " in flight" + DOT +
        "longest wait " + dur(q.max_wait_s)]),
    ]);
  }

  function jobs(d) {
    var j = d.jobs;
    if (!j.enabled) {
      fill("jobs", "Jobs", [el("p", "jobs: not enabled", "mute", "jobs.enabled")]);
      return;
    }
    var list = el("dl", null, "jobs");
    jobOrder(j.by_state).forEach(function (s) {
      list.appendChild(el("dt", s));
      list.appendChild(el("dd", String(j.by_state[s]), null, "jobs.state." + s));
    });
    fill("jobs", "Jobs", [
      list,
      note([badge(j.ok, "store ok", "store failing", "jobs.ok"), " oldest queued: ",
        el("span", dur(j.oldest_queued_age_s), null, "jobs.oldest")]),
    ]);
  }

  // A path that may wrap after each "/" (a <wbr> there), copied as it is (status._path_cell).
  function pathCell(path) {
    var cell = el("td", null, "path", "error.path");
    path.split("/").forEach(function (piece, i) {
      if (i) {
        cell.appendChild(text("/"));
        cell.appendChild(el("wbr"));
      }
      cell.appendChild(text(piece));
    });
    return cell;
  }

  function errors(d) {
    var e = d.errors;
    var rows = e.recent.map(function (r) {
      return row([
        td(clock(r.time)),
        td(String(r.status), "n", "error.status"),
        td(r.reason, null, "error.reason"),
        td(r.method, null, "error.method"),
        pathCell(r.path),
        td(num(r.client), null, "error.client"),
        td(r.request_id, "rid", "error.request_id"),
      ], "error-row");
    });
    if (!rows.length) {
      var none = td("none since start", "mute");
      none.colSpan = 7;
      rows.push(row([none]));
    }
    var heads = [["time"], ["status", "n"], ["reason"], ["method"], ["path"], ["app"],
      ["request id"]];
    fill("errors", "Latest proxy-made errors", [
      table(heads, rows),
      note(["the latest " + e.recent.length + " of ", el("span", String(e.total), null, "errors.total"),
        " since start (the last " + e.kept + " are kept); times in UTC"]),
    ]);
  }

  function render(d) {
    header(d);
    checks(d);
    auth(d);
    budgets(d);
    queue(d);
    jobs(d);
    errors(d);
    reads += 1;
    document.body.setAttribute("data-rendered", "json");
    document.body.setAttribute("data-reads", String(reads));
  }

  var reads = 0;
  var live = document.getElementById("live");
  var every = Number(document.body.getAttribute("data-refresh")) || 3;

  function tick() {
    fetch("status.json" + location.search, {cache: "no-store", headers: {Accept: "application/json"}})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (d) {
        render(d);
        live.textContent = "live" + DOT + "every " + every + " s";
        live.className = "live";
      })
      .catch(function (err) {
        live.textContent = "stale: " + err.message;
        live.className = "live stale";
      })
      .then(function () { setTimeout(tick, every * 1000); });
  }

  tick();
})();
