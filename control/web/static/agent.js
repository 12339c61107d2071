// killswitch dashboard: one laptop. Re-reads /api/agents/{id} when the live stream says
// this agent (or a hold) changed, and every 10 s for heartbeat counts.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const boot = JSON.parse($("boot").dataset.boot);
  const agentId = boot.agent_id;
  const REFRESH_MS = 10000;
  let version = boot.version;
  let lastRead = Date.now();
  let fetching = false;

  const { node, badge, setLive } = window.Killswitch;
  function clock(seconds) {
    return new Date(seconds * 1000).toISOString().slice(11, 23);
  }
  function fact(value) {
    if (value === null || value === undefined) return "-";
    if (value === true) return "yes";
    if (value === false) return "no";
    return String(value);
  }

  function render(data) {
    const a = data.agent;
    $("agent-state").replaceChildren(badge(a.state));
    $("agent-reason").textContent = a.reason;
    const v = $("violation");
    if (a.violation) {
      const h = node("h2", "Violation evidence");
      const p = node("p", a.violation.evidence);
      p.id = "violation-evidence";
      const at = node("p");
      const small = node("small", "flagged at " + a.violation.at +
        "; sticky until an incident commander runs killswitch ack-violation");
      at.append(small);
      v.replaceChildren(h, p, at);
      v.className = "evidence";
      v.hidden = false;
    } else {
      v.replaceChildren();
      v.hidden = true;
    }
    $("desired-mode").textContent = a.desired.mode;
    $("desired-epoch").textContent = a.desired.epoch;
    $("desired-since").textContent = a.desired.since;
    $("desired-reason").textContent = a.desired.reason;
    $("hold-ids").textContent = a.hold_ids.join(" ") || "-";
    $("agent-labels").textContent =
      Object.entries(a.labels).map(([k, val]) => k + "=" + val).join(",") || "-";
    $("agent-channels").textContent =
      Object.entries(a.channels).map(([k, on]) => k + ": " + (on ? "ACTIVE" : "stopped")).join(", ") || "-";
    for (const dd of document.querySelectorAll("#agent-facts dd")) {
      const key = dd.id.slice("fact-".length);
      if (key in a) dd.textContent = fact(a[key]);
    }
    const tbody = document.querySelector("#timeline tbody");
    const frag = document.createDocumentFragment();
    for (const ev of data.timeline) {
      const tr = node("tr", null, "ev-" + ev.kind);
      let when = clock(ev.at);
      if (ev.count > 1) when += " \u2013 " + clock(ev.last_at);
      const state = node("td");
      if (ev.state) state.append(badge(ev.state));
      tr.append(
        node("td", when, "time"), node("td", ev.kind), node("td", ev.epoch || ""),
        state, node("td", ev.text, "text"),
      );
      frag.append(tr);
    }
    if (!data.timeline.length) {
      const tr = node("tr");
      const td = node("td", "Nothing recorded since the server started.");
      td.colSpan = 5;
      tr.append(td);
      frag.append(tr);
    }
    tbody.replaceChildren(frag);
  }

  async function read() {
    if (fetching) return;
    fetching = true;
    try {
      const r = await fetch("/api/agents/" + encodeURIComponent(agentId), { credentials: "same-origin" });
      if (r.status === 401 || r.status === 404) return location.reload();
      if (r.ok) {
        render(await r.json());
        lastRead = Date.now();
      }
    } catch (err) {
      setLive(false, "cannot reach the server; retrying");
    } finally {
      fetching = false;
    }
  }

  function onMessage(msg) {
    version = msg.version;
    const changed = msg.changed;
    if (changed === null || changed.includes("") || changed.includes(agentId) ||
        Date.now() - lastRead > REFRESH_MS) {
      read();
    }
    setLive(true, "live \u00b7 updated " + new Date().toLocaleTimeString());
  }

  function connect() {
    if (!window.EventSource) {
      setInterval(read, 5000);
      return;
    }
    const events = new EventSource("/api/events?since=" + encodeURIComponent(version));
    events.onmessage = (ev) => onMessage(JSON.parse(ev.data));
    events.addEventListener("logout", () => location.reload());
    const poll = () => {
      setLive(false, "live stream unavailable; polling every 5 s");
      setInterval(read, 5000);
    };
    // A newer page of this session took the live stream: poll, don't take it back.
    events.addEventListener("replaced", () => {
      events.close();
      poll();
    });
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        poll();
      } else {
        setLive(false, "reconnecting\u2026");
      }
    };
  }

  connect();
})();
