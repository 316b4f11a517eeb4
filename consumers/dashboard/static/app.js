// crd-inspect line dashboard: one EventSource per shown line; every figure drawn here (no libraries).
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
let source = null;
let current = null;
let lastSnapshot = null;

function api(path, extra) {
  const q = new URLSearchParams(extra || {});
  if (token) q.set("token", token);
  const qs = q.toString();
  return path + (qs ? "?" + qs : "");
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function setText(id, value) {
  document.getElementById(id).textContent = value;
}

const fmt = {
  num: (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits)),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %"),
  time: (t) => new Date(t * 1000).toLocaleTimeString(),
};

function showLines(lines) {
  const nav = document.getElementById("lines");
  nav.replaceChildren();
  for (const line of lines) {
    const a = el("a", { href: "#" + encodeURIComponent(line), "data-line": line }, line);
    if (line === current) a.classList.add("active");
    nav.appendChild(a);
  }
}

function connect(line, lines) {
  if (source) source.close();
  current = line;
  showLines(lines);
  const status = document.getElementById("status");
  status.textContent = "connecting…";
  status.className = "status";
  source = new EventSource(api("api/lines/" + encodeURIComponent(line) + "/events"));
  source.addEventListener("snapshot", (ev) => {
    status.textContent = "live · " + new Date().toLocaleTimeString();
    status.className = "status live";
    render(JSON.parse(ev.data));
  });
  source.onerror = () => {
    status.textContent = "reconnecting…";
    status.className = "status down";
  };
}

function render(s) {
  lastSnapshot = s;
  setText("count-total", s.counts.total);
  setText("count-ok", s.counts.ok);
  setText("count-anomalous", s.counts.anomalous);
  setText("count-error", s.counts.error);
  setText("reject-rate", fmt.pct(s.reject_rate));
  setText("window", "anomalous + error, last " + Math.round(s.window_s / 60) + " min (" + s.window_results + ")");
  setText("throughput", fmt.num(s.throughput, 2));
  setText("latency-p50", fmt.num(s.latency_p50_ms, 0));
  setText("latency-p99", fmt.num(s.latency_p99_ms, 0));
  setText("group-lag", s.group ? (s.group.lag === null ? "?" : s.group.lag) : "–");
  setText("group-pending", s.group ? s.group.pending : "–");
  setText("workers", s.group ? s.group.active : "–");
  if (s.read_error) {
    const status = document.getElementById("status");
    status.textContent = s.read_error;
    status.className = "status down";
  }
  drawPlot(s);
  renderFeed(s.feed);
  renderErrors(s);
  renderAnomalies(s.anomalies);
  renderDead(s.dead);
}

function drawPlot(s) {
  const canvas = document.getElementById("score-plot");
  const ratio = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 1200;
  const cssH = canvas.clientHeight || 260;
  if (canvas.width !== Math.round(cssW * ratio)) {
    canvas.width = Math.round(cssW * ratio);
    canvas.height = Math.round(cssH * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const pad = { l: 48, r: 12, t: 10, b: 24 };
  const w = cssW - pad.l - pad.r;
  const h = cssH - pad.t - pad.b;
  const points = s.scores;
  const scored = points.filter((p) => p[1] !== null);
  let ymax = Math.max(s.threshold ? s.threshold * 1.5 : 0, ...scored.map((p) => p[1]), 1e-6) * 1.05;
  const ymin = Math.min(0, ...scored.map((p) => p[1]));
  const t1 = points.length ? points[points.length - 1][0] : s.now;
  const t0 = points.length ? Math.min(points[0][0], t1 - 10) : s.now - 60;
  const x = (t) => pad.l + ((t - t0) / Math.max(t1 - t0, 1e-3)) * w;
  const y = (v) => pad.t + h - ((v - ymin) / (ymax - ymin)) * h;
  ctx.strokeStyle = "#30363d";
  ctx.fillStyle = "#8b949e";
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = ymin + ((ymax - ymin) * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.l, y(v));
    ctx.lineTo(pad.l + w, y(v));
    ctx.stroke();
    ctx.fillText(v.toFixed(2), 4, y(v) + 4);
  }
  ctx.fillText(fmt.time(t0), pad.l, cssH - 6);
  const right = fmt.time(t1);
  ctx.fillText(right, pad.l + w - ctx.measureText(right).width, cssH - 6);
  ctx.strokeStyle = "#58a6ff55";
  ctx.beginPath();
  scored.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.stroke();
  const colours = { ok: "#3fb950", anomalous: "#f85149", error: "#a371f7" };
  for (const p of points) {
    ctx.fillStyle = colours[p[2]] || "#8b949e";
    if (p[1] === null) {
      ctx.fillRect(x(p[0]) - 1, pad.t + h - 8, 3, 8); // an error has no score: a tick on the axis
    } else {
      ctx.beginPath();
      ctx.arc(x(p[0]), y(p[1]), p[2] === "ok" ? 2.5 : 4, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  if (s.threshold !== null && s.threshold !== undefined) {
    ctx.strokeStyle = "#ffa657";
    ctx.setLineDash([6, 4]);
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(pad.l, y(s.threshold));
    ctx.lineTo(pad.l + w, y(s.threshold));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#ffa657";
    ctx.fillText("threshold " + s.threshold.toFixed(3), pad.l + 6, y(s.threshold) - 5);
  }
  // For people nothing; for the browser test: what was drawn.
  canvas.dataset.points = String(points.length);
  canvas.dataset.threshold = s.threshold === null ? "" : String(s.threshold);
}

function renderFeed(feed) {
  const body = document.querySelector("#feed tbody");
  body.replaceChildren();
  for (const r of feed) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, fmt.time(r.t)));
    tr.appendChild(el("td", { title: r.frame_id }, r.frame_id));
    tr.appendChild(el("td", { class: r.verdict }, r.verdict === "error" ? "error: " + r.error_code : r.verdict));
    tr.appendChild(el("td", {}, fmt.num(r.score, 3)));
    tr.appendChild(el("td", {}, r.latency_ms === null ? "–" : fmt.num(r.latency_ms, 0) + " ms"));
    body.appendChild(tr);
  }
}

function renderErrors(s) {
  const list = document.getElementById("errors");
  list.replaceChildren();
  const codes = Object.entries(s.error_codes);
  if (!codes.length) list.appendChild(el("li", { class: "empty" }, "none"));
  for (const [code, n] of codes) {
    const last = s.last_errors.find((e) => e.code === code);
    list.appendChild(el("li", {}, code + " × " + n + (last ? " · last " + fmt.time(last.t) + " " + last.frame_id : "")));
  }
  const groups = document.getElementById("plant-groups");
  groups.replaceChildren();
  if (!s.plant_groups.length) groups.appendChild(el("li", { class: "empty" }, "none"));
  for (const g of s.plant_groups) {
    groups.appendChild(el("li", {}, g.name + ": lag " + (g.lag === null ? "?" : g.lag) + " · pending " + g.pending));
  }
}

let shownAnomalies = "";

function renderAnomalies(items) {
  const box = document.getElementById("anomalies");
  const key = items.map((a) => a.frame_id + (a.has_image ? "+" : "")).join(",");
  if (key === shownAnomalies) return; // keep loaded images; only redraw on change
  shownAnomalies = key;
  box.replaceChildren();
  if (!items.length) box.appendChild(el("p", { class: "empty" }, "none yet"));
  for (const a of items) {
    const b = el("button", { class: "thumb", type: "button", "data-frame": a.frame_id });
    const img = el("img", {
      src: frameUrl(a.frame_id, "overlay", "thumb", a.has_image),
      alt: "overlay of " + a.frame_id,
      class: "overlay",
    });
    b.appendChild(img);
    b.appendChild(el("span", {}, "score " + fmt.num(a.score, 3) + " · " + fmt.time(a.t)));
    b.appendChild(el("span", { title: a.frame_id }, a.frame_id));
    b.addEventListener("click", () => openFrame(a.frame_id));
    box.appendChild(b);
  }
}

function frameUrl(frameId, kind, size, hasImage) {
  const path = "api/lines/" + encodeURIComponent(current) + "/frames/" + encodeURIComponent(frameId) + "/" + kind + ".png";
  return api(path, { size: size, v: hasImage ? "1" : "0" });
}

async function openFrame(frameId) {
  const resp = await fetch(api("api/lines/" + encodeURIComponent(current) + "/frames/" + encodeURIComponent(frameId)));
  if (!resp.ok) return;
  const a = await resp.json();
  setText("modal-title", a.frame_id);
  document.getElementById("modal-overlay").src = frameUrl(a.frame_id, "overlay", "full", a.has_image);
  document.getElementById("modal-image").src = frameUrl(a.frame_id, "image", "full", a.has_image);
  document.getElementById("modal-map").src = frameUrl(a.frame_id, "map", "full", a.has_image);
  setText("modal-score", fmt.num(a.score, 4));
  setText("modal-threshold", fmt.num(a.threshold, 4));
  setText("modal-model", (a.model_id || "–") + (a.model_version ? " (" + a.model_version + ")" : ""));
  setText("modal-camera", a.camera + " · " + a.seq);
  setText("modal-regions", a.regions.map((r) => r.w + "×" + r.h + " at " + r.x + "," + r.y + " peak " +
    r.peak.toFixed(3)).join("; ") || "none");
  setText("modal-meta", JSON.stringify(a.meta, null, 2));
  document.getElementById("modal").showModal();
}

function renderDead(dead) {
  const body = document.querySelector("#dead tbody");
  body.replaceChildren();
  for (const d of dead) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, fmt.time(d.t)));
    tr.appendChild(el("td", { title: d.frame_id }, d.frame_id));
    tr.appendChild(el("td", { class: "error" }, d.reason));
    tr.appendChild(el("td", { title: d.message }, d.message));
    body.appendChild(tr);
  }
}

async function start() {
  const resp = await fetch(api("api/lines"));
  const info = await resp.json();
  const pick = () => {
    const wanted = decodeURIComponent(location.hash.slice(1));
    return info.lines.includes(wanted) ? wanted : info.lines[0];
  };
  window.addEventListener("hashchange", () => connect(pick(), info.lines));
  window.addEventListener("resize", () => lastSnapshot && drawPlot(lastSnapshot));
  connect(pick(), info.lines);
}

start();
