// The status page: polls /status/data and draws it. Plain DOM and SVG, no
// libraries, so the page works offline and needs no build step.
"use strict";

const POLL_MS = 2000;
const KEY = "mlx-gateway-api-key";
const SVG = "http://www.w3.org/2000/svg";
const W = 300, H = 80;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en");
  return Number(value).toFixed(digits).replace(/\.0+$/, "");
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s / 60}m`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

// --- charts ------------------------------------------------------------------

function line(points, field, t0, span, top, cls) {
  const coords = points
    .filter((p) => p[field] !== null && p[field] !== undefined)
    .map((p) => {
      const x = ((p.t - t0) / span) * W;
      const y = H - 4 - (p[field] / top) * (H - 12);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
  const poly = document.createElementNS(SVG, "polyline");
  poly.setAttribute("points", coords.join(" "));
  poly.setAttribute("class", cls);
  return poly;
}

function drawChart(figure, points, now) {
  const field = figure.dataset.field;
  const second = figure.dataset.second;
  const svg = figure.querySelector("svg");
  // The window grows with the history, from one minute to ten.
  const first = points.length ? points[0].t : now;
  const span = Math.min(600, Math.max(60, now - first));
  const t0 = now - span;
  const values = points.flatMap((p) => [p[field], second ? p[second] : null]);
  const top = Math.max(1e-9, ...values.filter((v) => v !== null)) * 1.1;
  svg.replaceChildren();
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", "2");
  label.setAttribute("y", "9");
  label.setAttribute("class", "axis");
  label.textContent = `max ${fmt(top / 1.1)} · last ${duration(span)}`;
  svg.append(label);
  svg.append(line(points, field, t0, span, top, "series"));
  if (second) svg.append(line(points, second, t0, span, top, "series second"));
  const last = points.length ? points[points.length - 1] : {};
  figure.querySelector(".now").textContent = fmt(last[field]);
  figure.dataset.last = last[field] ?? "";
  if (second) figure.querySelector(".now2").textContent = fmt(last[second]);
}

// --- tables ------------------------------------------------------------------

function badge(state) {
  return el("span", { class: `badge state-${state}` }, state);
}

function memory(worker) {
  const mem = worker.memory_mb || {};
  if (mem.active_memory_mb === undefined) return "–";
  return `${fmt(mem.active_memory_mb)} MB (peak ${fmt(mem.peak_memory_mb)})`;
}

function workerRow(w) {
  const restarts = w.restarts ? `${w.restarts}` : "0";
  const reason = w.failure || w.last_exit || "";
  const cache = w.prompt_cache || {};
  return el(
    "tr",
    { "data-worker": w.id, "data-state": w.state, "data-pid": w.pid ?? "" },
    el("td", {}, w.id),
    el("td", {}, badge(w.state)),
    el("td", { class: "num" }, w.pid ?? "–"),
    el("td", {}, w.host ?? ""),
    el("td", { class: "num" }, w.in_flight),
    el("td", { class: "num" }, restarts),
    el("td", { class: "reason" }, reason),
    el("td", { class: "num" }, memory(w)),
    el("td", { class: "num" }, cache.entries ?? "–"),
  );
}

function modelSection(name, model) {
  const head = el(
    "tr",
    {},
    ...["worker", "state", "pid", "host", "in flight", "restarts", "last exit", "MLX memory",
      "cached prompts"].map((h) => el("th", {}, h)),
  );
  return el(
    "section",
    { class: "model", "data-model": name },
    el(
      "h2",
      {},
      name,
      " ",
      badge(model.state),
      el("span", { class: "muted" }, ` ${model.waiting} waiting`),
    ),
    model.failure ? el("p", { class: "bad" }, model.failure) : "",
    el("table", {}, el("thead", {}, head), el("tbody", {}, ...model.workers.map(workerRow))),
  );
}

// --- polling -----------------------------------------------------------------

function render(data) {
  const overall = $("overall");
  // "idle": healthy, but no model is loaded yet (they load on demand).
  const labels = { ok: "ready", idle: "idle: no model loaded" };
  overall.textContent = labels[data.status] || "unavailable";
  overall.className = `badge state-${data.status === "unavailable" ? "failed" : "ready"}`;
  $("meta").textContent =
    `v${data.version} on ${data.host}, up ${duration(data.uptime_s)}`;
  const now = Date.now() / 1000;
  for (const figure of document.querySelectorAll(".chart")) {
    drawChart(figure, data.history, now);
  }
  $("span").textContent = data.history.length
    ? `One point every ${fmt(data.sample_s)} s; charts start when the gateway did.`
    : "Collecting the first points…";
  $("models").replaceChildren(
    ...Object.entries(data.models).map(([name, model]) => modelSection(name, model)),
  );
}

function showLogin(message) {
  $("login").hidden = false;
  $("content").hidden = true;
  $("login-error").textContent = message;
  $("overall").textContent = "API key needed";
  $("overall").className = "badge state-loading";
}

let timer = null;

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  try {
    const response = await fetch("/status/data", { headers, cache: "no-store" });
    if (response.status === 401) {
      showLogin(key ? "That key was refused." : "");
      return; // wait for the form
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    $("login").hidden = true;
    $("content").hidden = false;
    render(await response.json());
  } catch (error) {
    $("overall").textContent = "unreachable";
    $("overall").className = "badge state-failed";
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    poll();
  });
  poll();
});
