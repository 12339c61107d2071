// killswitch dashboard: fleet page. Live overview from /api/events (Server-Sent Events);
// the table re-reads only its current page (/api/agents) when something on it may have
// changed. Everything is written with textContent: labels and reasons are user input.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const boot = JSON.parse($("boot").dataset.boot);
  const PROBLEMS = new Set(["VIOLATION", "FAILED", "OVERDUE", "OFFLINE_AT_RISK"]);
  const STATES = Array.from(document.querySelectorAll("#state-bar .seg")).map((s) => s.dataset.state);
  const DEFAULTS = { sort: "state", order: "asc", page: "1", per_page: "50" };
  const REFRESH_MS = 15000;

  let version = boot.version;
  let lastByState = null;
  let lastRun; // the runbook run last drawn, as JSON
  let lastRowsAt = Date.now();
  let serverSkew = 0; // server clock minus this browser's clock, seconds
  let fetching = false;
  let again = false;
  let visibleIds = new Set(
    Array.from(document.querySelectorAll("#agents-table tbody tr")).map((tr) => tr.dataset.agentId),
  );
  let params = new URLSearchParams(location.search);

  // ---------------------------------------------------------------- formatting

  function duration(s) {
    if (s === null || s === undefined) return "-";
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + "s";
    if (s < 120) return Math.round(s) + "s";
    if (s < 7200) return Math.floor(s / 60) + "m " + String(Math.round(s % 60)).padStart(2, "0") + "s";
    return (s / 3600).toFixed(1) + "h";
  }
  const nowS = () => Date.now() / 1000 + serverSkew;
  const ago = (iso) => (iso ? duration(nowS() - Date.parse(iso) / 1000) + " ago" : "-");

  const { node, badge, setLive } = window.Killswitch;
  function ttcFigure(f) {
    if (!f) return "-";
    return f.verified ? duration(f.seconds) : "\u2265 " + duration(f.seconds) + " not yet";
  }

  // ---------------------------------------------------------------- query string

  function cleanParams(p) {
    const out = new URLSearchParams();
    for (const [k, v] of p) {
      if (v && DEFAULTS[k] !== v) out.set(k, v);
    }
    return out;
  }
  function setParams(p, push) {
    params = cleanParams(p);
    const qs = params.toString();
    const url = qs ? "/?" + qs : "/";
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
    syncForm();
    fetchRows();
  }
  function syncForm() {
    $("filter-state").value = params.get("state") || "";
    $("filter-selector").value = params.get("selector") || "";
    $("filter-prefix").value = params.get("prefix") || "";
    $("filter-per-page").value = params.get("per_page") || "50";
    const form = $("filters");
    form.elements.sort.value = params.get("sort") || "state";
    form.elements.order.value = params.get("order") || "asc";
    form.elements.hold.value = params.get("hold") || "";
    const exportQs = new URLSearchParams(params);
    exportQs.delete("page");
    exportQs.delete("per_page");
    const qs = exportQs.toString();
    $("export-csv").href = "/export/agents.csv" + (qs ? "?" + qs : "");
    $("export-json").href = "/export/agents.json" + (qs ? "?" + qs : "");
  }
  function formParams() {
    const p = new URLSearchParams(new FormData($("filters")));
    p.delete("page");
    return p;
  }

  // ---------------------------------------------------------------- table

  function renderRows(data) {
    const tbody = document.querySelector("#agents-table tbody");
    const frag = document.createDocumentFragment();
    for (const r of data.rows) {
      const tr = node("tr");
      tr.dataset.agentId = r.agent_id;
      tr.className = "st-row-" + r.state + (PROBLEMS.has(r.state) ? " problem" : "");
      const idCell = node("td", null, "id");
      const a = node("a", r.agent_id);
      a.href = "/agents/" + encodeURIComponent(r.agent_id);
      idCell.append(a);
      const stateCell = node("td");
      stateCell.append(badge(r.state));
      const since = node("td", ago(r.since));
      since.title = r.since || "";
      const text = Object.entries(r.labels).map(([k, v]) => k + "=" + v).join(",");
      const labels = node("td", text, "labels");
      const claims = Object.entries(r.label_mismatch).map(([k, m]) => k + "=" + m.reported).join(",");
      if (claims) {
        const marker = node("span", " \u26a0 reports " + claims, "mismatch");
        marker.title = "the agent reports other labels; the server's labels decide its holds";
        labels.append(marker);
      }
      const seen = node("td", ago(r.last_seen));
      seen.title = r.last_seen || "";
      tr.append(
        idCell,
        stateCell,
        node("td", r.reason, "reason"),
        since,
        node("td", r.mode),
        labels,
        node("td", r.connected ? "yes" : "no"),
        seen,
        node("td", r.applied_epoch + "/" + r.desired_epoch),
        node("td", r.events_captured_total, "num"),
        node("td", r.spool_events, "num"),
        node("td", r.uploads_refused, "num"),
        node("td", r.events_accepted_after_pause, "num"),
      );
      frag.append(tr);
    }
    tbody.replaceChildren(frag);
    visibleIds = new Set(data.rows.map((r) => r.agent_id));
    $("no-rows").hidden = data.rows.length > 0;
    $("table-info").textContent = data.total + " matching";
    renderPager(data);
    renderHeader(data);
  }

  function renderPager(data) {
    const pager = $("pager");
    const link = (n, text, rel) => {
      if (n < 1 || n > data.pages || n === data.page) {
        const s = node("span", text, "disabled");
        s.dataset.rel = rel;
        return s;
      }
      const p = new URLSearchParams(params);
      p.set("page", String(n));
      const a = node("a", text);
      a.href = "/?" + cleanParams(p).toString();
      a.dataset.rel = rel;
      a.dataset.page = String(n);
      return a;
    };
    const info = node("span", "page " + data.page + " of " + data.pages);
    info.id = "page-info";
    pager.replaceChildren(
      link(1, "\u00ab first", "first"), " ",
      link(data.page - 1, "\u2039 prev", "prev"), " ", info, " ",
      link(data.page + 1, "next \u203a", "next"), " ",
      link(data.pages, "last \u00bb", "last"),
    );
  }

  function renderHeader(data) {
    for (const th of document.querySelectorAll("#agents-table thead th")) {
      const key = th.dataset.sort;
      const active = key === data.sort;
      const desc = data.order === "desc";
      const p = new URLSearchParams(params);
      p.set("sort", key);
      p.set("order", active ? (desc ? "asc" : "desc") : "asc");
      p.delete("page");
      th.querySelector("a").href = "/?" + cleanParams(p).toString();
      th.querySelector(".arrow").textContent = active ? (desc ? "\u25bc" : "\u25b2") : "";
      if (active) th.setAttribute("aria-sort", desc ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    }
  }

  async function fetchRows() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const response = await fetch("/api/agents?" + params.toString(), {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const data = await response.json();
      const error = $("filter-error");
      if (response.status === 401) {
        location.reload();
        return;
      }
      if (!response.ok) {
        error.textContent = data.error || "request failed (" + response.status + ")";
        error.hidden = false;
        return;
      }
      error.hidden = true;
      serverSkew = data.now - Date.now() / 1000;
      lastRowsAt = Date.now();
      renderRows(data);
      document.body.dataset.rowsVersion = String(data.version);
    } catch (err) {
      setLive(false, "cannot reach the server; retrying");
    } finally {
      fetching = false;
      if (again) {
        again = false;
        fetchRows();
      }
    }
  }

  // ---------------------------------------------------------------- overview

  function renderSummary(s) {
    serverSkew = s.now - Date.now() / 1000;
    $("epoch").textContent = s.epoch;
    const compliant = $("compliant");
    compliant.textContent = s.compliant ? "yes" : "NO";
    compliant.className = s.compliant ? "ok" : "bad";
    $("total").textContent = s.total;
    $("settled").textContent = s.settled;
    $("problems").textContent = s.problems;
    for (const seg of document.querySelectorAll("#state-bar .seg")) {
      const n = s.by_state[seg.dataset.state] || 0;
      const percent = s.total ? Math.round((100 * n) / s.total) : 0;
      seg.className = "seg st-" + seg.dataset.state + " p" + percent + (n ? "" : " empty");
      seg.title = seg.dataset.state + ": " + n;
    }
    for (const state of STATES) {
      const count = $("count-" + state);
      count.textContent = s.by_state[state] || 0;
      const li = count.closest("li");
      li.className = ((s.by_state[state] || 0) ? "" : "empty") + (PROBLEMS.has(state) ? " problem" : "");
    }
    const age = $("pause-age");
    if (s.pause) {
      age.dataset.since = String(s.pause.since_s);
      $("pause-at").textContent = "since " + s.pause.since;
    } else {
      delete age.dataset.since;
      age.textContent = "-";
      $("pause-at").textContent = "no incident hold";
    }
    const t = s.time_to_compliance;
    $("ttc-p50").textContent = ttcFigure(t.p50);
    $("ttc-p99").textContent = ttcFigure(t.p99);
    $("ttc-slowest").textContent = ttcFigure(t.slowest);
    const slow = $("ttc-slowest-agent");
    slow.textContent = t.slowest ? t.slowest.agent_id : "";
    if (t.slowest) slow.href = "/agents/" + encodeURIComponent(t.slowest.agent_id);
    else slow.removeAttribute("href");
    $("ttc-counts").textContent = t.verified + " of " + t.paused + " paused verified";
    renderHolds(s.holds, s.employee_view);
    renderRunbook(s.runbook);
    tickClock();
  }

  function renderRunbook(run) {
    const box = $("runbook"); // employees see no runs
    const json = JSON.stringify(run);
    if (!box || json === lastRun) return; // unchanged: a selected command stays selected
    lastRun = json;
    const title = node("h2", "Runbook ");
    if (!run) {
      const empty = node("p", "No runbook has run yet.");
      empty.id = "run-empty";
      box.replaceChildren(title, empty);
      return;
    }
    const withId = (el, id) => Object.assign(el, { id });
    let info = run.id + " \u00b7 started " + run.started_at + " by " + run.started_by;
    if (run.ended_at) info += " \u00b7 ended " + run.ended_at;
    title.append(
      withId(node("span", run.runbook), "run-name"), " ",
      withId(node("span", run.state, "badge rs-" + run.state), "run-state"), " ",
      withId(node("small", info), "run-info"),
    );
    const waves = withId(node("ol", null, "waves"), "run-waves");
    for (const w of run.waves) {
      const li = node("li", null, "ws-" + w.state + (w.index === run.current_wave ? " current" : ""));
      li.dataset.state = w.state;
      const status = w.state === "pending" ? w.state : w.state + " \u00b7 " + w.capturing + "/" + w.agents + " capturing";
      li.append(node("b", w.index + 1 + ". " + w.name), node("small", w.target), node("small", status));
      waves.append(li);
    }
    const parts = [title, waves];
    const current = run.waves[run.current_wave]; // none before the first wave starts
    if (current && current.gates.length) {
      const table = withId(node("table", null, "gates"), "run-gates");
      table.createCaption().textContent = "Gates of wave " + (current.index + 1);
      const head = table.createTHead().insertRow();
      for (const h of ["Gate", "Result", "Observed", "Limit"]) head.append(node("th", h));
      const body = table.createTBody();
      for (const g of current.gates) {
        const tr = node("tr", null, g.passed ? "pass" : "fail");
        tr.append(node("td", g.name), node("td", g.passed ? "pass" : "FAIL"), node("td", g.observed), node("td", g.limit));
        body.append(tr);
      }
      parts.push(table);
    }
    if (run.halt_reason) parts.push(withId(node("p", run.halt_reason, "error"), "run-halt"));
    if (run.next_step) {
      const next = withId(node("p", "Next step: "), "run-next");
      next.append(node("code", run.next_step));
      parts.push(next);
    }
    box.replaceChildren(...parts);
  }

  function renderHolds(holds, employee) {
    const box = $("holds");
    if (!holds.length) {
      const p = node("p", "No active holds: capture is allowed.");
      p.id = "holds-empty";
      box.replaceChildren(p);
      return;
    }
    const table = node("table", null, "holds");
    table.id = "holds-table";
    const head = employee
      ? ["Kind", "Reason", "Since"]
      : ["Hold", "Kind", "Scope", "Reason", "Ticket", "By", "Since", "Epoch"];
    const thead = node("thead");
    const hr = node("tr");
    for (const h of head) hr.append(node("th", h));
    thead.append(hr);
    const tbody = node("tbody");
    for (const h of holds) {
      const tr = node("tr");
      const since = node("td", ago(h.created_at));
      since.title = h.created_at || "";
      if (employee) tr.append(node("td", h.kind), node("td", h.reason), since);
      else
        tr.append(
          node("td", h.id, "id"), node("td", h.kind), node("td", h.scope_text),
          node("td", h.reason), node("td", h.ticket || "-"), node("td", h.created_by),
          since, node("td", h.created_epoch),
        );
      tbody.append(tr);
    }
    table.append(thead, tbody);
    box.replaceChildren(table);
  }

  function tickClock() {
    const age = $("pause-age");
    if (age.dataset.since) age.textContent = duration(nowS() - Number(age.dataset.since));
  }

  // ---------------------------------------------------------------- live updates

  function onMessage(msg) {
    version = msg.version;
    document.body.dataset.version = String(version);
    const byState = JSON.stringify(msg.summary.by_state);
    let reread = msg.changed === null || msg.changed.includes("");
    if (!reread) reread = msg.changed.some((id) => visibleIds.has(id));
    if (!reread && lastByState !== null && byState !== lastByState) reread = true;
    if (!reread && Date.now() - lastRowsAt > REFRESH_MS) reread = true;
    lastByState = byState;
    renderSummary(msg.summary);
    if (reread) fetchRows();
    setLive(true, "live \u00b7 updated " + new Date().toLocaleTimeString());
  }

  let polling = null;
  function poll() {
    if (polling) return;
    setLive(false, "live stream unavailable; polling every 5 s");
    polling = setInterval(async () => {
      try {
        const r = await fetch("/api/summary", { credentials: "same-origin" });
        if (r.status === 401) return location.reload();
        const data = await r.json();
        onMessage({ version: data.version, changed: null, summary: data.summary });
      } catch (err) {
        setLive(false, "cannot reach the server; retrying");
      }
    }, 5000);
  }

  function connect() {
    if (!window.EventSource) return poll();
    const events = new EventSource("/api/events?since=" + encodeURIComponent(version));
    events.onopen = () => setLive(true, "live");
    events.onmessage = (ev) => onMessage(JSON.parse(ev.data));
    events.addEventListener("logout", () => location.reload());
    // A newer page of this session took the live stream: poll, don't take it back.
    events.addEventListener("replaced", () => {
      events.close();
      poll();
    });
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) poll();
      else setLive(false, "reconnecting\u2026");
    };
  }

  // ---------------------------------------------------------------- wiring

  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setParams(formParams(), true);
  });
  for (const id of ["filter-state", "filter-per-page"]) {
    $(id).addEventListener("change", () => setParams(formParams(), true));
  }
  let typing = null;
  for (const id of ["filter-selector", "filter-prefix"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => setParams(formParams(), false), 350);
    });
  }
  $("filter-clear").addEventListener("click", (ev) => {
    ev.preventDefault();
    setParams(new URLSearchParams(), true);
  });
  // Sort headers, pager, and the state bar and legend are plain links: follow them here.
  document.addEventListener("click", (ev) => {
    const a = ev.target.closest("a");
    if (!a || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
    const inPage = a.closest("#agents-table thead, #pager, #state-bar, #state-legend");
    if (!inPage) return;
    const url = new URL(a.href, location.href);
    if (url.pathname !== "/") return;
    ev.preventDefault();
    if (a.closest("#state-bar, #state-legend")) {
      // A state from the overview: keep the other filters as they are now.
      const p = new URLSearchParams(params);
      p.set("state", url.searchParams.get("state") || "");
      p.delete("page");
      setParams(p, true);
    } else {
      setParams(url.searchParams, true);
    }
  });
  window.addEventListener("popstate", () => {
    params = new URLSearchParams(location.search);
    syncForm();
    fetchRows();
  });

  syncForm();
  setInterval(tickClock, 1000);
  connect();
})();
