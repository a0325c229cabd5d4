// ferry dashboard: renders the state ferry pushes as server-sent events.
// Data only ever goes in through textContent, never as HTML.
"use strict";

const token = document.querySelector('meta[name="ferry-token"]').content;
const MIB = 1048576;
let current = JSON.parse(document.getElementById("state").textContent || "{}");

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  for (const cell of cells) {
    const td = cell instanceof Node ? cell : el("td", cell);
    tr.appendChild(td.tagName === "TD" ? td : wrap(td));
  }
  return tr;
}

function wrap(node) { const td = el("td"); td.appendChild(node); return td; }

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function mib(bytes) { return bytes == null ? "" : `${(bytes / MIB).toFixed(1)} MiB`; }

function button(label, action) {
  const b = el("button", label);
  b.addEventListener("click", () => act(action));
  return b;
}

async function act(action) {
  const message = document.getElementById("message");
  try {
    const reply = await fetch("/api/action", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Ferry-Token": token },
      body: JSON.stringify(action),
    });
    const answer = await reply.json();
    message.textContent = reply.ok ? answer.message : `refused: ${answer.error}`;
  } catch (err) {
    message.textContent = `failed: ${err}`;
  }
  message.hidden = false;
}

function renderHosts(state, admin) {
  fill("hosts", (state.hosts || []).map((h) => {
    const actions = el("td");
    if (admin) {
      actions.appendChild(h.maintenance
        ? button("Activate", { op: "activate", host: h.host })
        : button("Evacuate", { op: "evacuate", host: h.host }));
    }
    const health = h.dashboard_error ? "no answer" : (h.maintenance ? `${h.health}, maintenance` : h.health);
    const memory = h.memory_mib ? `${h.free_mib} / ${h.memory_mib} MiB` : "";
    return row([h.host, el("td", health, `health-${h.health}`), h.mode, h.cpus, memory, h.domains, actions],
      { "data-host": h.host });
  }));
}

function renderDomains(state, admin) {
  const hosts = (state.hosts || []).map((h) => h.host);
  fill("domains", (state.domains || []).map((d) => {
    const actions = el("td");
    if (admin) {
      if (d.state === "running") actions.appendChild(button("Pause", { op: "pause", name: d.name }));
      if (d.state === "paused") actions.appendChild(button("Unpause", { op: "unpause", name: d.name }));
      const others = hosts.filter((h) => h !== d.host);
      if (others.length && (d.state === "running" || d.state === "paused")) {
        const pick = el("select");
        for (const h of others) pick.appendChild(el("option", h));
        const go = el("button", "Migrate");
        go.addEventListener("click", () => act({ op: "migrate", name: d.name, to: pick.value }));
        actions.append(pick, go);
      }
    }
    return row([d.name, d.host, el("td", d.state, `state-${d.state}`), `${d.mem} MiB`, d.vcpus, actions],
      { "data-domain": d.name, "data-on": d.host });
  }));
}

function renderMigrations(state) {
  const active = state.migrations || [];
  document.getElementById("no-migrations").hidden = active.length > 0;
  fill("migrations", active.map((m) => {
    const p = m.progress || {};
    const bar = el("span", null, "bar");
    const done = el("span");
    const pct = p.total ? Math.min(100, (100 * (p.transferred || 0)) / p.total) : 0;
    done.style.width = `${pct.toFixed(0)}%`;
    bar.appendChild(done);
    const sent = el("td");
    sent.append(bar, ` ${mib(p.transferred)}`);
    return row([m.name, `${m.source} → ${m.target}`, p.phase || m.phase, sent,
      p.rate_mbit != null ? `${p.rate_mbit.toFixed(0)} Mbit/s` : "", mib(p.remaining),
      p.passes ?? "", p.expected_downtime_ms != null ? `${p.expected_downtime_ms} ms` : "",
      diskCopy(p.disk)],
      { "data-migration": m.name });
  }));
}

// --copy-storage: the disks' copy, beside the memory's.
function diskCopy(disk) {
  if (!disk) return "";
  const state = disk.ready ? "caught up" : "copying";
  return `${mib(disk.copied)} of ${mib(disk.total)}, ${state}`;
}

function renderRecent(state) {
  fill("recent", (state.recent || []).map((r) => row([
    r.name, `${r.source} → ${r.target}`, el("td", r.outcome, `outcome-${r.outcome}`),
    r.total_s != null ? `${r.total_s.toFixed(2)} s` : "",
    r.switchover_ms != null ? `${r.switchover_ms.toFixed(0)} ms` : "",
    mib(r.bytes_sent),
  ], { "data-recent": r.name, title: r.error || "" })));
}

function renderPlayer(state) {
  const section = document.getElementById("player");
  const points = state.player;
  section.hidden = !points;
  if (!points || !points.length) return;
  const svg = document.getElementById("chart");
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
  const top = Math.max(...points.map((p) => p.buffer_s), 1);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((p) =>
    `${(600 * (p.t - t0)) / (t1 - t0)},${150 - (140 * p.buffer_s) / top}`).join(" "));
  const base = document.createElementNS("http://www.w3.org/2000/svg", "line");
  for (const [k, v] of Object.entries({ x1: 0, y1: 150, x2: 600, y2: 150 })) base.setAttribute(k, v);
  svg.replaceChildren(base, line);
  const last = points[points.length - 1];
  document.getElementById("player-note").textContent =
    `buffer ${last.buffer_s.toFixed(1)} s (top of the chart ${top.toFixed(1)} s), stalls ${last.stalls}`;
}

function render(state) {
  current = state;
  const admin = state.role === "admin";
  document.getElementById("role").textContent = admin ? "admin" : "viewer (read only)";
  document.getElementById("updated").textContent =
    state.at ? `updated ${new Date(state.at * 1000).toLocaleTimeString()}` : "";
  const error = document.getElementById("error");
  error.hidden = !state.error;
  error.textContent = state.error || "";
  renderHosts(state, admin);
  renderDomains(state, admin);
  renderMigrations(state);
  renderRecent(state);
  renderPlayer(state);
}

render(current);
const live = document.getElementById("live");
const events = new EventSource("/events");
events.onopen = () => { live.textContent = "live"; live.className = "badge on"; };
events.onerror = () => { live.textContent = "reconnecting"; live.className = "badge off"; };
events.onmessage = (event) => render(JSON.parse(event.data));
