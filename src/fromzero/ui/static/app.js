// fromzero ui: a one-page app over the JSON API of fromzero/ui/app.py. Plain JS, no build step;
// charts with the vendored uPlot. Routes: #/runs, #/run/NAME, #/compare/A,B, #/launch, #/chat.
"use strict";

const COLORS = ["#2f6fed", "#d6453d", "#1f9d55", "#c27c0e", "#8e44ad", "#16a2b8"];
const view = document.getElementById("view");
let timers = [];   // polling timers of the current page (cleared on navigation)
let charts = [];   // uPlot instances of the current page

// ---- helpers ---------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else if (v !== false && v != null) el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c != null) el.append(c instanceof Node ? c : String(c));
  return el;
}
async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-Fromzero": "1"}};
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function toast(message) {
  const t = document.getElementById("toast");
  t.textContent = message; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}
function fmt(x, digits = 4) {
  if (x == null) return "-";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e5 ? x.toFixed(digits) : x.toExponential(2);
}
function duration(s) {
  if (s == null) return "-";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
const badge = (status) => h("span", {class: `badge ${status}`, "data-status": status}, status);
const runLink = (name) => "#/run/" + encodeURIComponent(name);
const fileUrl = (run, path) => "/files/" + run.split("/").map(encodeURIComponent).join("/") + "/" +
  path.split("/").map(encodeURIComponent).join("/");
function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }

// ---- charts ----------------------------------------------------------------------------------
const SKIP = new Set(["step", "epoch", "elapsed_s"]);
// Which chart a metrics.jsonl key goes to.
function group(key) {
  if (key === "lr") return "learning rate";
  if (key.includes("loss")) return "loss";
  if (key.endsWith("_per_sec")) return "throughput";
  if (key === "grad_norm") return "gradient norm";
  if (key.startsWith("val_")) return "validation metrics";
  if (key.startsWith("test_")) return null;
  return "other";
}
// {chart title: {key: [[step, value], ...]}} from metrics rows.
function series(rows) {
  const out = {};
  for (const r of rows) {
    if (typeof r.step !== "number") continue;
    for (const [k, v] of Object.entries(r)) {
      if (SKIP.has(k) || typeof v !== "number") continue;
      const g = group(k); if (!g) continue;
      ((out[g] ||= {})[k] ||= []).push([r.step, v]);
    }
  }
  return out;
}
// uPlot data: one x axis (the union of steps) and each line with nulls where it has no point.
function aligned(lines) {
  const xs = [...new Set(Object.values(lines).flatMap((pts) => pts.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const ys = Object.values(lines).map((pts) => {
    const y = new Array(xs.length).fill(null);
    for (const [x, v] of pts) y[index.get(x)] = v;
    return y;
  });
  return [xs, ...ys];
}
// Whole steps on the x axis; y ticks with 3 significant digits (learning rates are small numbers).
const STEPS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p)).sort((a, b) => a - b);
function tick(v) {
  if (v == null) return "";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e5 || a < 1e-3 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}
function makeChart(el, title, labels, data, logY) {
  const width = Math.max(360, el.clientWidth || 430);
  const opts = {
    width, height: 240, title: "",
    scales: {x: {time: false}, y: logY ? {distr: 3} : {}},
    axes: [{label: "step", incrs: STEPS}, {size: 64, values: (u, splits) => splits.map(tick)}],
    series: [{label: "step"}, ...labels.map((l, i) => ({label: l, stroke: COLORS[i % COLORS.length], width: 1.6,
      spanGaps: true, points: {show: data[0].length < 60}}))],
  };
  const plot = new uPlot(opts, data, el);
  charts.push(plot);
  return plot;
}

// ---- Runs ------------------------------------------------------------------------------------
const runsState = {sort: "age_s", asc: true, filter: "", status: "", selected: new Set()};
async function pageRuns() {
  const table = h("table", {id: "runs-table"});
  const filter = h("input", {type: "text", id: "runs-filter", placeholder: "filter: name, task, model…",
    value: runsState.filter, oninput: (e) => { runsState.filter = e.target.value; render(); }});
  const status = h("select", {id: "runs-status", onchange: (e) => { runsState.status = e.target.value; render(); }},
    ["", "running", "finished", "stopped", "failed"].map((s) => h("option", {value: s, selected: s === runsState.status},
      s || "any status")));
  const compare = h("button", {id: "compare-selected", onclick: () => {
    location.hash = "#/compare/" + [...runsState.selected].map(encodeURIComponent).join(",");
  }}, "Compare selected");
  const root = h("span", {class: "muted"});
  view.replaceChildren(h("h1", {}, "Runs"), h("div", {class: "toolbar"}, filter, status, compare, root), table);
  let rows = [];
  const cols = [["", null], ["run", "name"], ["task", "task"], ["model", "model"], ["status", "status"],
    ["step", "step"], ["best", "best"], ["duration", "duration_s"], ["updated", "age_s"]];
  function render() {
    const q = runsState.filter.toLowerCase();
    const shown = rows.filter((r) => (!q || [r.name, r.task, r.model, r.status].join(" ").toLowerCase().includes(q))
      && (!runsState.status || r.status === runsState.status));
    const key = runsState.sort, sign = runsState.asc ? 1 : -1;
    shown.sort((a, b) => {
      const x = a[key], y = b[key];
      if (x == null) return 1; if (y == null) return -1;
      return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * sign;
    });
    compare.disabled = runsState.selected.size < 2 || runsState.selected.size > 6;
    table.replaceChildren(
      h("thead", {}, h("tr", {}, cols.map(([label, k]) => h("th", {
        class: k ? `sortable ${k === key ? "sorted" : ""} ${k === key && runsState.asc ? "asc" : ""}` : "",
        onclick: k ? () => { runsState.asc = runsState.sort === k ? !runsState.asc : true; runsState.sort = k; render(); } : null,
      }, label)))),
      h("tbody", {}, shown.length ? shown.map((r) => h("tr", {class: "clickable", "data-run": r.name,
        onclick: (e) => { if (e.target.type !== "checkbox") location.hash = runLink(r.name); }},
        h("td", {}, h("input", {type: "checkbox", checked: runsState.selected.has(r.name), onchange: (e) => {
          e.target.checked ? runsState.selected.add(r.name) : runsState.selected.delete(r.name); render(); }})),
        h("td", {}, h("a", {href: runLink(r.name)}, r.name)), h("td", {}, r.task), h("td", {}, r.model),
        h("td", {title: r.detail}, badge(r.status)), h("td", {class: "num"}, r.step ?? "-"),
        h("td", {class: "num"}, r.best == null ? "-" : `${r.metric} ${fmt(r.best)}`),
        h("td", {class: "num"}, duration(r.duration_s)), h("td", {class: "num"}, duration(r.age_s) + " ago"),
      )) : h("tr", {}, h("td", {colspan: cols.length, class: "muted"}, "no runs yet: launch one from the Launch page"))),
    );
  }
  every(3000, async () => {
    try { const data = await api("/api/runs"); rows = data.runs; root.textContent = `in ${data.root}`; render(); }
    catch (e) { toast(e.message); }
  });
}

// ---- Run -------------------------------------------------------------------------------------
async function pageRun(name) {
  let detail;
  try { detail = await api("/api/run?name=" + encodeURIComponent(name)); }
  catch (e) {  // a run just launched has no config.yaml yet: wait for it
    view.replaceChildren(h("h1", {}, name), h("p", {class: "muted", id: "run-waiting"}, `${e.message}; waiting for it…`));
    const hash = location.hash;
    const job = (await api("/api/jobs").catch(() => ({jobs: []}))).jobs.filter((j) => j.run === name).pop();
    if (job && job.state !== "running") {  // it ended before writing its run directory: say why
      view.append(h("p", {}, "its command ", badge(job.state), ":"), h("pre", {id: "job-log"}, job.log.join("\n")));
      return;
    }
    timers.push(setTimeout(() => { if (location.hash === hash) route(); }, 1500));
    return;
  }
  const status = h("span", {id: "run-status"}, badge(detail.status));
  const actions = h("span", {class: "toolbar"});
  const chartsEl = h("div", {class: "charts", id: "run-charts"});
  const log = h("pre", {id: "job-log", hidden: true});
  view.replaceChildren(
    h("h1", {}, name, " ", status), h("p", {class: "muted"}, `${detail.task} · ${detail.model}`), actions,
    h("h2", {}, "Curves"), chartsEl, log,
    h("div", {id: "run-static"}));
  let rows = [], offset = 0, plots = {};
  function draw() {
    const groups = series(rows);
    for (const [title, lines] of Object.entries(groups)) {
      const labels = Object.keys(lines), data = aligned(lines);
      const old = plots[title];
      if (old && old.labels.join() === labels.join()) { old.plot.setData(data); old.box.dataset.points = data[0].length; continue; }
      if (old) { old.plot.destroy(); old.box.remove(); }
      const holder = h("div"), box = h("div", {class: "card chart", "data-chart": title, "data-points": data[0].length},
        h("h3", {}, title), holder);
      chartsEl.append(box);
      plots[title] = {labels, box, plot: makeChart(holder, title, labels, data, title === "loss" && false)};
    }
  }
  function renderStatic(d) {
    const parts = [];
    if (d.test_metrics) parts.push(h("h2", {}, "Test metrics"), h("table", {id: "test-metrics"},
      Object.entries(d.test_metrics).filter(([, v]) => typeof v !== "object").map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {class: "num"}, fmt(v))))));
    if (d.plots.length) parts.push(h("h2", {}, "Plots"), h("div", {class: "plots"}, d.plots.map((p) =>
      h("figure", {}, h("img", {src: fileUrl(name, p) + "?t=" + (d.step ?? 0), alt: p}), h("figcaption", {}, p)))));
    parts.push(h("h2", {}, "Checkpoints"), d.checkpoints.length ? h("table", {}, h("tr", {}, ["name", "step", "size", "path"].map((c) => h("th", {}, c))),
      d.checkpoints.map((c) => h("tr", {}, h("td", {}, c.name), h("td", {class: "num"}, c.step ?? "-"),
        h("td", {class: "num"}, (c.size_bytes / 1e6).toFixed(1) + " MB"), h("td", {}, h("code", {}, c.path))))) : h("p", {class: "muted"}, "none yet"));
    parts.push(h("h2", {}, "Config"), h("pre", {id: "run-config"}, d.config_text));
    document.getElementById("run-static").replaceChildren(...parts);
  }
  function renderActions(d) {
    const job = d.job, items = [];
    if (job && job.state === "running") items.push(h("button", {class: "danger", id: "stop-run", onclick: async (e) => {
      e.target.disabled = true;
      try { await api("/api/stop", {job: job.id}); } catch (err) { toast(err.message); } }}, "Stop (saves)"));
    if (["stopped", "failed"].includes(d.status) && !(job && job.state === "running") && d.checkpoints.some((c) => c.name === "last"))
      items.push(h("button", {id: "resume-run", onclick: async (e) => {
        e.target.disabled = true;
        try { await api("/api/resume", {run: name}); } catch (err) { toast(err.message); } }}, "Resume"));
    if (d.detail) items.push(h("span", {class: "muted"}, d.detail + (d.duration_s != null ? ` · ${duration(d.duration_s)}` : "")));
    actions.replaceChildren(...items);
    if (job) { log.hidden = false; log.textContent = `$ ${job.argv.slice(1).join(" ")}\n` + job.log.join("\n"); }
  }
  renderStatic(detail); renderActions(detail);
  let lastKey = "";
  every(1500, async () => {
    try {
      const m = await api(`/api/metrics?name=${encodeURIComponent(name)}&offset=${offset}`);
      if (m.offset < offset) { rows = []; }
      offset = m.offset;
      if (m.rows.length) { rows.push(...m.rows); draw(); }
      const d = await api("/api/run?name=" + encodeURIComponent(name));
      status.replaceChildren(badge(d.status)); renderActions(d);
      const key = [d.status, d.step, d.plots.join(), d.checkpoints.map((c) => c.step).join(), !!d.test_metrics].join("|");
      if (key !== lastKey) { lastKey = key; renderStatic(d); }
    } catch (e) { toast(e.message); }
  });
}

// ---- Compare ---------------------------------------------------------------------------------
async function pageCompare(arg) {
  const names = (arg || "").split(",").filter(Boolean).map(decodeURIComponent);
  if (names.length < 2) {
    view.replaceChildren(h("h1", {}, "Compare"), h("p", {class: "muted"}, "Pick 2 to 6 runs on the Runs page (the boxes), then Compare selected."));
    return;
  }
  let cmp;
  try { cmp = await api("/api/compare?names=" + names.map(encodeURIComponent).join(",")); }
  catch (e) { view.replaceChildren(h("h1", {}, "Compare"), h("p", {class: "muted"}, e.message)); return; }
  const all = {};
  await Promise.all(names.map(async (n) => {
    let rows = [], offset = 0, m;
    do { m = await api(`/api/metrics?name=${encodeURIComponent(n)}&offset=${offset}`); rows.push(...m.rows); }
    while (m.rows.length && m.offset !== (offset = m.offset));
    all[n] = rows;
  }));
  const keys = [...new Set(Object.values(all).flatMap((rows) => rows.flatMap((r) => Object.keys(r)
    .filter((k) => !SKIP.has(k) && typeof r[k] === "number" && group(k)))))].sort();
  const pick = h("select", {id: "compare-metric", onchange: () => draw()}, keys.map((k) => h("option", {value: k,
    selected: k === (keys.includes("val_loss") ? "val_loss" : "loss")}, k)));
  const holder = h("div", {class: "card chart", id: "compare-chart"});
  view.replaceChildren(h("h1", {}, `Compare ${names.length} runs`),
    h("div", {class: "toolbar"}, h("span", {}, "metric"), pick),
    holder,
    h("h2", {}, "Runs"), h("table", {}, h("tr", {}, ["", "run", "task", "model", "status", "best"].map((c) => h("th", {}, c))),
      cmp.runs.map((r, i) => h("tr", {}, h("td", {}, h("span", {class: "swatch", style: `background:${COLORS[i]}`})),
        h("td", {}, h("a", {href: runLink(r.name)}, r.name)), h("td", {}, r.task), h("td", {}, r.model), h("td", {}, badge(r.status)),
        h("td", {class: "num"}, r.best == null ? "-" : `${r.metric} ${fmt(r.best)}`)))),
    h("h2", {}, "Config differences"),
    cmp.diff.length ? h("table", {class: "diff", id: "config-diff"}, h("tr", {}, h("th", {}, "key"), names.map((n) => h("th", {}, n))),
      cmp.diff.map((d) => h("tr", {}, h("td", {}, d.key), names.map((n) => h("td", {}, JSON.stringify(d.values[n]) ?? "-")))))
      : h("p", {class: "muted"}, "the configs are identical"));
  function draw() {
    charts.forEach((c) => c.destroy()); charts = []; holder.replaceChildren();
    const k = pick.value, lines = {};
    for (const n of names) lines[n] = all[n].filter((r) => typeof r[k] === "number" && typeof r.step === "number").map((r) => [r.step, r[k]]);
    const data = aligned(lines);
    holder.dataset.series = names.length;
    makeChart(holder, k, names, data, false);
  }
  draw();
}

// ---- Launch ----------------------------------------------------------------------------------
async function pageLaunch() {
  const list = await api("/api/recipes");
  const select = h("select", {id: "recipe-select", onchange: () => loadForm(select.value)},
    h("option", {value: ""}, "choose a recipe…"), list.recipes.map((r) => h("option", {value: r}, r)));
  const formEl = h("div", {id: "recipe-form"});
  const jobsEl = h("div", {id: "jobs"});
  view.replaceChildren(h("h1", {}, "Launch"),
    list.root ? h("div", {class: "toolbar"}, select, h("span", {class: "muted"}, `recipes in ${list.root}`))
      : h("p", {class: "muted"}, "no recipes folder: start fromzero ui with --recipes DIR"),
    h("h2", {}, "Jobs started here"), jobsEl, formEl);
  let form = null;
  async function loadForm(name) {
    if (!name) { formEl.replaceChildren(); return; }
    form = await api("/api/recipe?name=" + encodeURIComponent(name));
    const inputs = form.fields.map((f) => {
      let input;
      const v = f.value;
      if (f.type === "bool") input = h("input", {type: "checkbox", checked: !!v});
      else if (f.type === "int" || f.type === "float") input = h("input", {type: "number", step: f.type === "int" ? "1" : "any",
        value: v == null ? "" : v, placeholder: f.optional ? "none" : ""});
      else if (f.type === "list" || f.type === "dict") input = h("input", {type: "text", value: JSON.stringify(v)});
      else input = h("input", {type: "text", value: v == null ? "" : v, placeholder: f.optional ? "none" : ""});
      input.dataset.key = f.key; input.name = f.key;
      const row = h("tr", {"data-key": f.key}, h("td", {}, f.key), h("td", {}, input), h("td", {class: "num muted"}, JSON.stringify(f.default)),
        h("td", {class: "doc"}, `${f.type}${f.optional ? " or none" : ""}. ${f.doc}`));
      input.addEventListener("input", () => row.classList.toggle("changed", JSON.stringify(read(f, input)) !== JSON.stringify(f.value)));
      input.addEventListener("change", () => row.classList.toggle("changed", JSON.stringify(read(f, input)) !== JSON.stringify(f.value)));
      return {f, input, row};
    });
    const launch = h("button", {id: "launch-run", onclick: async () => {
      const values = {};
      try {
        for (const {f, input} of inputs) { const v = read(f, input); if (JSON.stringify(v) !== JSON.stringify(f.value)) values[f.key] = v; }
        launch.disabled = true;
        const job = await api("/api/launch", {recipe: name, values});
        refreshJobs(); toast.ok = job;
      } catch (e) { toast(e.message); } finally { launch.disabled = false; }
    }}, "Launch");
    formEl.replaceChildren(
      h("p", {class: "muted"}, `task ${form.task} · runs as fromzero ${form.verb} --config ${form.recipe} plus the keys you change (bold)`),
      h("div", {class: "toolbar"}, launch),
      h("div", {class: "card"}, h("h2", {}, "Keys the recipe sets"), formTable(inputs.filter((x) => x.f.in_recipe)),
        h("details", {id: "more-keys"}, h("summary", {}, `every other key (${inputs.filter((x) => !x.f.in_recipe).length}), at its default`),
          formTable(inputs.filter((x) => !x.f.in_recipe)))));
  }
  function formTable(items) {
    return h("table", {class: "form"}, h("tr", {}, ["key", "value", "default", "what it does"].map((c) => h("th", {}, c))),
      items.map((x) => x.row));
  }
  function read(f, input) {
    if (f.type === "bool") return input.checked;
    const raw = input.value.trim();
    if (raw === "" && f.optional) return null;
    if (f.type === "int") { if (!/^-?\d+$/.test(raw)) throw new Error(`${f.key}: a whole number`); return parseInt(raw, 10); }
    if (f.type === "float") { const x = Number(raw); if (raw === "" || isNaN(x)) throw new Error(`${f.key}: a number`); return x; }
    if (f.type === "list" || f.type === "dict") { try { return JSON.parse(raw); } catch { throw new Error(`${f.key}: JSON`); } }
    return input.value;
  }
  async function refreshJobs() {
    const {jobs} = await api("/api/jobs");
    jobsEl.replaceChildren(jobs.length ? h("table", {id: "jobs-table"}, h("tr", {}, ["job", "run", "state", "", "output"].map((c) => h("th", {}, c))),
      jobs.slice().reverse().map((j) => h("tr", {"data-job": j.id, "data-state": j.state}, h("td", {}, j.id),
        h("td", {}, h("a", {href: runLink(j.run)}, j.run)), h("td", {}, badge(j.state)),
        h("td", {}, j.state === "running" ? h("button", {class: "danger", onclick: async (e) => { e.target.disabled = true;
          try { await api("/api/stop", {job: j.id}); refreshJobs(); } catch (err) { toast(err.message); } }}, "Stop") : ""),
        h("td", {}, h("pre", {style: "max-height:120px"}, j.log.slice(-6).join("\n") || "…")))))
      : h("p", {class: "muted"}, "none yet"));
  }
  every(2000, () => refreshJobs().catch((e) => toast(e.message)));
}

// ---- Chat ------------------------------------------------------------------------------------
const chatState = {messages: [], model: ""};
async function pageChat() {
  const {models, loaded} = await api("/api/chat/models");
  const model = h("select", {id: "chat-model"}, models.length ? models.map((m) => h("option", {value: m, selected: m === (chatState.model || loaded)}, m))
    : h("option", {value: ""}, "no chat checkpoints"));
  const info = h("p", {class: "muted", id: "chat-info"});
  const system = h("textarea", {id: "chat-system", rows: 3, placeholder: "system prompt (optional)"});
  const temperature = h("input", {type: "number", id: "chat-temperature", value: 0.8, step: 0.1, min: 0, max: 5});
  const topP = h("input", {type: "number", id: "chat-top-p", value: 0.95, step: 0.05, min: 0.05, max: 1});
  const maxTokens = h("input", {type: "number", id: "chat-max-tokens", value: 128, step: 1, min: 1});
  const showPrompt = h("input", {type: "checkbox", id: "chat-show-prompt"});
  const promptEl = h("pre", {id: "chat-prompt", hidden: true});
  const messagesEl = h("div", {class: "card", id: "messages"});
  const input = h("textarea", {id: "chat-input", placeholder: "your message (Enter sends, Shift+Enter: new line)"});
  const send = h("button", {id: "chat-send", onclick: () => say()}, "Send");
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); say(); } });
  view.replaceChildren(h("h1", {}, "Chat"), h("div", {class: "chat-layout"},
    h("div", {class: "card settings"},
      h("label", {}, "checkpoint"), model, info,
      h("label", {}, "system prompt"), system,
      h("label", {}, "temperature"), temperature, h("label", {}, "top-p"), topP, h("label", {}, "max new tokens"), maxTokens,
      h("label", {}, h("span", {}, showPrompt, " show the rendered prompt")),
      h("p", {}, h("button", {class: "secondary", id: "chat-new", onclick: () => { chatState.messages = []; renderMessages(); }}, "New chat"))),
    h("div", {}, messagesEl, h("div", {class: "composer"}, input, send), promptEl)));
  function conversation() {
    const sys = system.value.trim();
    return [...(sys ? [{role: "system", content: sys}] : []), ...chatState.messages];
  }
  function renderMessages() {
    messagesEl.replaceChildren(...chatState.messages.map((m) => h("div", {class: `msg ${m.role}`}, h("span", {class: "role"}, m.role), m.content)));
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }
  async function updatePrompt() {
    promptEl.hidden = !showPrompt.checked;
    if (!showPrompt.checked || !model.value) return;
    try { promptEl.textContent = (await api("/api/chat/prompt", {model: model.value, messages: conversation()})).prompt; }
    catch (e) { promptEl.textContent = e.message; }
  }
  showPrompt.addEventListener("change", updatePrompt);
  async function load() {
    chatState.model = model.value;
    if (!model.value) return;
    info.textContent = "loading…";
    try { const r = await api("/api/chat/load", {model: model.value}); info.textContent = `${r.description}; context ${r.context} tokens`; }
    catch (e) { info.textContent = e.message; }
  }
  model.addEventListener("change", () => { chatState.messages = []; renderMessages(); load(); });
  async function say() {
    const text = input.value.trim();
    if (!text || !model.value) return;
    input.value = ""; send.disabled = true;
    chatState.messages.push({role: "user", content: text});
    const reply = {role: "assistant", content: ""};
    const body = {model: model.value, messages: conversation(), temperature: Number(temperature.value),
      top_p: Number(topP.value), max_tokens: Number(maxTokens.value)};
    chatState.messages.push(reply); renderMessages();
    const bubble = messagesEl.lastChild;
    try {
      const r = await fetch("/api/chat", {method: "POST", body: JSON.stringify(body),
        headers: {"Content-Type": "application/json", "X-Fromzero": "1"}});
      if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data: ")) continue;
          const ev = JSON.parse(line.slice(6));
          if (ev.text) { reply.content += ev.text; bubble.lastChild.textContent = reply.content; bubble.dataset.chunks = (+bubble.dataset.chunks || 0) + 1; }
          if (ev.error) toast(ev.error);
          if (ev.finish_reason) bubble.dataset.finish = ev.finish_reason;
        }
      }
    } catch (e) { toast(e.message); chatState.messages.pop(); chatState.messages.pop(); renderMessages(); }
    finally { send.disabled = false; updatePrompt(); }
  }
  renderMessages();
  await load();
}

// ---- Playground ------------------------------------------------------------------------------
async function pagePlayground() {
  const {models} = await api("/api/playground/models");
  const model = h("select", {id: "pg-model"}, models.length ? models.map((m) => h("option", {value: m.name, "data-kind": m.kind}, `${m.name} (${m.kind})`))
    : h("option", {value: ""}, "no classifier or encoder checkpoints"));
  const inputs = h("div", {id: "pg-inputs"});
  const out = h("div", {id: "pg-output"});
  view.replaceChildren(h("h1", {}, "Playground"), h("p", {class: "muted"}, "Try a classifier on a text or an image (and see why it " +
    "decided so), or compare two texts with an encoder — as fromzero predict, explain and embed do."),
    h("div", {class: "toolbar"}, model), h("div", {class: "card"}, inputs), out);
  let image = null;
  function kind() { const o = model.selectedOptions[0]; return o ? o.dataset.kind : ""; }
  async function call(action, body) {
    out.replaceChildren(h("p", {class: "muted"}, "running…"));
    try { return await api(`/api/playground/${action}`, {model: model.value, ...body}); }
    catch (e) { out.replaceChildren(h("p", {class: "muted"}, e.message)); return null; }
  }
  function showLabel(r) {
    const probs = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
    out.replaceChildren(h("div", {class: "card", id: "pg-result"}, h("h2", {}, "prediction: ", h("span", {id: "pg-label"}, r.label)),
      h("table", {}, probs.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {class: "num"}, (100 * v).toFixed(1) + " %"),
        h("td", {style: "width:60%"}, h("div", {style: `background:#2f6fed;height:10px;width:${(100 * v).toFixed(1)}%`})))))));
  }
  function showExplanation(r) {
    const body = r.png ? h("img", {src: r.png, style: "max-width:100%"})
      : h("iframe", {sandbox: "", srcdoc: r.html, style: "width:100%;height:420px;border:1px solid #dde1ea;background:#fff"});
    out.replaceChildren(h("div", {class: "card", id: "pg-explanation"}, h("h2", {}, `why (${r.method})`), h("p", {class: "muted"}, r.summary), body));
  }
  function render() {
    out.replaceChildren();
    const k = kind();
    if (k === "encoder") {
      const a = h("textarea", {id: "pg-text-a", rows: 2, style: "width:100%"}), b = h("textarea", {id: "pg-text-b", rows: 2, style: "width:100%"});
      inputs.replaceChildren(h("p", {}, "text A"), a, h("p", {}, "text B"), b, h("p", {}, h("button", {id: "pg-embed", onclick: async () => {
        const r = await call("embed", {texts: [a.value, b.value].filter((t) => t.trim())});
        if (r) out.replaceChildren(h("div", {class: "card", id: "pg-result"}, h("h2", {}, r.cosine != null ? `cosine similarity ${r.cosine.toFixed(4)}` : `${r.dim} dimensions`),
          h("p", {class: "muted"}, `${r.dim}-dimensional, normalized; first values:`), h("pre", {}, r.heads.map((v) => JSON.stringify(v)).join("\n"))));
      }}, "Embed")));
    } else if (k === "image-classifier") {
      const file = h("input", {type: "file", id: "pg-image", accept: "image/*"});
      const preview = h("img", {style: "max-height:160px;display:block;margin-top:8px"});
      file.addEventListener("change", () => {
        const f = file.files[0]; if (!f) return;
        const reader = new FileReader();
        reader.onload = () => { image = reader.result; preview.src = image; };
        reader.readAsDataURL(f);
      });
      inputs.replaceChildren(file, preview, h("p", {class: "toolbar"},
        h("button", {id: "pg-classify", onclick: async () => { const r = image && await call("classify", {image}); if (r) showLabel(r); }}, "Predict"),
        h("button", {class: "secondary", id: "pg-explain", onclick: async () => { const r = image && await call("explain", {image}); if (r) showExplanation(r); }}, "Explain (Grad-CAM)")));
    } else if (k === "text-classifier") {
      const text = h("textarea", {id: "pg-text", rows: 4, style: "width:100%", placeholder: "a text to classify"});
      inputs.replaceChildren(text, h("p", {class: "toolbar"},
        h("button", {id: "pg-classify", onclick: async () => { const r = await call("classify", {text: text.value}); if (r) showLabel(r); }}, "Classify"),
        h("button", {class: "secondary", id: "pg-explain", onclick: async () => { const r = await call("explain", {text: text.value}); if (r) showExplanation(r); }}, "Explain (integrated gradients)")));
    } else inputs.replaceChildren(h("p", {class: "muted"}, "Fine-tune a classifier (a run's checkpoints appear here), or start fromzero ui with --model CHECKPOINT."));
  }
  model.addEventListener("change", render);
  render();
}

// ---- router ----------------------------------------------------------------------------------
async function route() {
  timers.forEach((t) => { clearInterval(t); clearTimeout(t); }); timers = [];
  charts.forEach((c) => c.destroy()); charts = [];
  const [page, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const arg = rest.join("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === (page === "run" ? "runs" : page || "runs"));
  try {
    if (page === "run") await pageRun(decodeURIComponent(arg));
    else if (page === "compare") await pageCompare(arg);
    else if (page === "launch") await pageLaunch();
    else if (page === "chat") await pageChat();
    else if (page === "playground") await pagePlayground();
    else await pageRuns();
  } catch (e) { toast(e.message); }
}
window.addEventListener("hashchange", route);
route();
