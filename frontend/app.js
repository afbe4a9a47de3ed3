// LLM Bench Shower web page: plain ES modules, no build step. Everything the model
// produced is inserted as text (textContent), never as HTML.
import { heatmap, lineChart } from "./charts.js";
import { api, badge, download, fmtBytes, fmtSeconds, h, mb, poll, stopPolling } from "./dom.js";
import { lang, setLang, t } from "./i18n.js";
import { methodComparison } from "./methods.js";
import { viewWorkers } from "./workers.js";

const main = document.getElementById("main");

// --- launch ------------------------------------------------------------------------

// An optional field (anyOf [X, null]) takes the shape of X.
function shapeOf(schema, defs) {
  const s = schema.$ref ? defs[schema.$ref.split("/").pop()] : schema;
  const branches = (s.anyOf || []).filter((a) => a.type !== "null");
  return branches.length === 1 && !branches[0].$ref ? { ...branches[0], default: s.default, nullable: true } : s;
}

function inputFor(name, schema, defs) {
  const s = shapeOf(schema, defs);
  const value = s.default;
  const id = `param-${name}`;
  if (s.type === "array" && s.items?.enum) {  // a set of choices, e.g. the inference methods
    return h("span", { id, class: "choices", role: "group", "aria-labelledby": `label-${name}`,
                       "data-kind": "multi", "data-name": name },
      s.items.enum.map((v) => h("label", { class: "choice" },
        h("input", { type: "checkbox", value: v, checked: (value || []).includes(v) }), ` ${v}`)));
  }
  if (s.enum) {
    return h("select", { id, name, "data-kind": "string" },
      s.nullable ? h("option", { value: "", text: "" }) : null,
      s.enum.map((v) => h("option", { value: v, text: v, selected: v === value })));
  }
  if (s.type === "integer" || s.type === "number") {
    return h("input", { id, type: "number", name, step: s.type === "integer" ? 1 : "any",
                        value: value ?? "", "data-kind": "number" });
  }
  if (s.type === "boolean") {
    return h("input", { id, type: "checkbox", name, checked: value === true, "data-kind": "bool" });
  }
  if (s.type === "string" || (s.anyOf && s.anyOf.every((a) => a.type === "string" || a.type === "null"))) {
    return h("input", { id, type: "text", name, value: value ?? "", "data-kind": "string" });
  }
  // lists and objects: JSON text
  return h("input", { id, type: "text", name, class: "json", "data-kind": "json",
                      value: value === undefined || value === null ? "" : JSON.stringify(value) });
}

function paramsForm(ds) {
  const schema = ds.params_schema, defs = schema.$defs || {};
  const rows = Object.entries(schema.properties || {}).map(([name, prop]) => {
    const control = inputFor(name, prop, defs);
    const label = control.dataset.kind === "multi" ? h("span", { class: "label", id: `label-${name}`, text: name })
      : h("label", { for: `param-${name}`, text: name });
    return h("div", { class: "field", "data-field": `params.${name}` }, label, control,
      prop.description ? h("small", { text: prop.description }) : null,
      h("div", { class: "field-error", role: "alert" }));
  });
  return h("fieldset", { class: "params", "data-dataset": ds.name },
    h("legend", { text: `${ds.name} · ${t("params")} (${ds.cache_mode})` }), rows);
}

function readParams(fieldset) {
  const params = {};
  for (const input of fieldset.querySelectorAll("[data-kind]")) {
    const kind = input.dataset.kind;
    if (kind === "bool") { params[input.name] = input.checked; continue; }
    if (kind === "multi") {  // nothing ticked: left out, the dataset's default applies
      const picked = [...input.querySelectorAll("input:checked")].map((c) => c.value);
      if (picked.length) params[input.dataset.name] = picked;
      continue;
    }
    const raw = input.value.trim();
    if (raw === "") continue;
    else if (kind === "number") params[input.name] = Number(raw);
    else if (kind === "json") {
      try { params[input.name] = JSON.parse(raw); } catch { params[input.name] = raw; }
    } else params[input.name] = raw;
  }
  return params;
}

// Scheduling options, the same for every job of one submission; an empty one is left
// out of the request so the server's default applies. The API checks the values.
const JOB_OPTIONS = [
  ["priority", { type: "number", step: 1, min: -1000, max: 1000, placeholder: "0" }, Number],
  ["submitter", { type: "text", maxlength: 128, placeholder: "anonymous" }, String],
  ["worker_label", { type: "text", maxlength: 255 }, String],
  ["num_gpus", { type: "number", step: 1, min: 1, max: 64, placeholder: "1" }, Number],
];

function optionsForm() {
  return h("fieldset", { id: "job-options" }, h("legend", { text: t("scheduling") }),
    JOB_OPTIONS.map(([name, attrs]) => h("div", { class: "field", "data-field": name },
      h("label", { for: `opt-${name}`, text: t(name) }),
      h("input", { id: `opt-${name}`, name, ...attrs }),
      h("small", { text: t(`${name}_help`) }),
      h("div", { class: "field-error", role: "alert" }))));
}

function readOptions(fieldset) {
  const options = {};
  for (const [name, , cast] of JOB_OPTIONS) {
    const raw = fieldset.querySelector(`[name="${name}"]`).value.trim();
    if (raw !== "") options[name] = cast(raw);
  }
  return options;
}

function markInvalid(field, message) {
  field.querySelector(".field-error").textContent = message;
  field.querySelector("[data-kind], input, select")?.classList.add("invalid");
}

async function viewLaunch() {
  const [models, datasets] = await Promise.all([api("GET", "/api/models"), api("GET", "/api/datasets")]);
  const select = h("select", { id: "model-select", name: "model" },
    (models.data?.models || []).map((m) => h("option", { value: m.name, text: m.name })));
  const custom = h("input", { id: "model-path", type: "text", placeholder: t("custom_path") });
  const paramsBox = h("div", { id: "params-box" });
  const boxes = (datasets.data?.datasets || []).map((ds) => {
    const cb = h("input", { type: "checkbox", value: ds.name, id: `ds-${ds.name}`,
      onchange: () => {
        const existing = paramsBox.querySelector(`[data-dataset="${ds.name}"]`);
        if (cb.checked && !existing) paramsBox.append(paramsForm(ds));
        if (!cb.checked && existing) existing.remove();
      } });
    return h("label", { class: "ds" }, cb, ` ${ds.name}`,
      h("small", { text: ` — ${ds.description}${ds.cost ? ` (${ds.cost})` : ""}` }));
  });
  const options = optionsForm();
  const status = h("div", { id: "launch-status", role: "status" });
  const form = h("form", { id: "launch-form", onsubmit: async (ev) => {
    ev.preventDefault();
    form.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
    form.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
    const model = custom.value.trim() || select.value;
    const sets = [...paramsBox.querySelectorAll("fieldset.params")];
    if (!sets.length) { status.textContent = t("no_dataset"); return; }
    const jobs = sets.map((fs) => ({ model, dataset: fs.dataset.dataset, params: readParams(fs),
                                     ...readOptions(options) }));
    const res = await api("POST", "/api/jobs", { jobs });
    if (res.ok) {
      status.textContent = `${t("submitted")}: ${res.data.jobs.map((j) => `#${j.id}`).join(", ")}`;
      location.hash = "#/queue";
      return;
    }
    status.textContent = res.error.message;
    for (const d of res.error.details || []) {
      const m = /^jobs\[(\d+)\]\.(.*)$/.exec(d.field || "");
      if (!m) continue;
      const fs = sets[Number(m[1])];
      const path = m[2].split(/[.[]/)[0] === "params" ? `params.${m[2].split(".")[1]}` : m[2];
      const field = fs.querySelector(`[data-field="${path}"]`) || options.querySelector(`[data-field="${path}"]`);
      if (field) markInvalid(field, d.message);
      else if (m[2] === "model") custom.classList.add("invalid");
    }
  } },
  h("div", { class: "field" }, h("label", { for: "model-select", text: t("model") }), select, custom),
  h("div", { class: "field" }, h("span", { class: "label", text: t("datasets") }), boxes),
  paramsBox, options,
  h("button", { type: "submit", id: "launch-submit", text: t("submit") }), status);
  main.replaceChildren(h("h2", { text: t("nav_launch") }), form);
}

// --- queue -------------------------------------------------------------------------

function eta(job) {
  if (job.state !== "running" || !job.progress.total || !job.progress.done || !job.started_at) return "";
  const elapsed = (Date.now() - Date.parse(job.started_at + "Z")) / 1000;
  return fmtSeconds((elapsed / job.progress.done) * (job.progress.total - job.progress.done));
}

async function viewQueue() {
  const table = h("table", { id: "queue-table" });
  main.replaceChildren(h("h2", { text: t("nav_queue") }), table);
  const head = h("tr", {}, ["id", "model", "dataset", "state", "progress", "eta", "worker",
    "location", "actions"].map((k) => h("th", { text: t(k) })));
  poll(async () => {
    const [res, mem] = await Promise.all([api("GET", "/api/jobs?per_page=100"),
                                          api("GET", "/api/v1/memory/models")]);
    if (!res.ok) return;
    const where = {};
    for (const m of mem.data?.models || []) if (!m.stale) where[m.model_name] = m.location;
    const rows = res.data.jobs.map((job) => {
      const pct = job.progress.total ? Math.round((100 * job.progress.done) / job.progress.total) : 0;
      const actions = [];
      if (job.state === "queued" || job.state === "running") {
        actions.push(h("button", { class: "cancel", text: t("cancel"),
          onclick: () => api("POST", `/api/jobs/${job.id}/cancel`) }));
      }
      if (job.state !== "running") {
        actions.push(h("button", { class: "delete", text: t("delete"),
          onclick: () => api("DELETE", `/api/jobs/${job.id}`) }));
      }
      return h("tr", { "data-job": job.id, "data-state": job.state },
        h("td", {}, h("a", { href: `#/job/${job.id}`, text: `#${job.id}` })),
        h("td", { text: job.model }), h("td", { text: job.dataset }),
        h("td", {}, badge(job.state), job.error ? h("div", { class: "error", text: job.error }) : null,
          job.waiting_reason ? h("div", { class: "waiting", text: job.waiting_reason }) : null),
        h("td", {}, h("progress", { max: 100, value: pct }),
          ` ${job.progress.done}/${job.progress.total ?? "?"}`),
        h("td", { text: eta(job) }), h("td", { text: job.worker_id || "" }),
        h("td", { text: where[job.model] || "" }), h("td", {}, actions));
    });
    table.replaceChildren(head, ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 9, text: t("no_jobs") }))]));
  });
}

// --- job detail --------------------------------------------------------------------

// A comparison job stores every item once per method; its cells are the first method's.
function firstMethod(job) { return job.scores.methods?.[0]?.method; }

function cellsOf(job, samples) {
  const first = firstMethod(job), byCell = {};
  for (const s of samples) {
    if (!first || s.fields?.method === first) byCell[`${s.context_length}/${s.depth_percent}`] = s;
  }
  return (job.scores.cells || []).map((c) => ({
    ...c, tooltip: `${t("context_length")} ${c.context_length}, ${t("depth")} ${c.depth_percent}: ` +
      `${t("score")} ${c.score.toFixed(2)}\n${t("prediction")}: ` +
      `${(byCell[`${c.context_length}/${c.depth_percent}`] || {}).prediction ?? ""}`,
  }));
}

// How the job is scheduled: the fields that are set.
function jobMeta(job) {
  const rows = [["priority", job.priority], ["submitter", job.submitter], ["worker_label", job.worker_label],
    ["num_gpus", job.num_gpus], ["memory_estimate", fmtBytes(job.memory_estimate_bytes)],
    ["worker", job.worker_id]].filter(([, v]) => v !== null && v !== undefined && v !== "");
  return h("dl", { id: "job-meta", class: "meta" },
    rows.flatMap(([k, v]) => [h("dt", { text: t(k) }), h("dd", { "data-key": k, text: v })]));
}

function memorySeries(points) {
  const methods = [...new Set(points.map((s) => s.fields?.method).filter(Boolean))];
  const groups = methods.length ? methods.map((m) => [` (${m})`, points.filter((s) => s.fields?.method === m)])
    : [["", points]];
  const withGpu = points.some((s) => s.peak_gpu_mb);
  return groups.flatMap(([suffix, pts]) => [
    { name: `RSS MB${suffix}`, points: pts.map((s) => [s.context_length, s.peak_rss_mb]) },
    withGpu ? { name: `GPU MB${suffix}`, points: pts.map((s) => [s.context_length, s.peak_gpu_mb || 0]) } : null,
  ].filter(Boolean));
}

async function viewJob(id) {
  stopPolling();
  const [jobRes, sampleRes] = await Promise.all([api("GET", `/api/jobs/${id}`),
                                                 api("GET", `/api/jobs/${id}/samples`)]);
  if (!jobRes.ok) { main.replaceChildren(h("p", { class: "error", text: jobRes.error.message })); return; }
  const job = jobRes.data.job, samples = sampleRes.data.samples;
  const parts = [h("a", { href: "#/queue", text: `← ${t("back")}` }),
    h("h2", {}, `#${job.id} ${job.dataset} · `, h("span", { text: job.model }), " ", badge(job.state)),
    job.error ? h("p", { class: "error", text: job.error }) : null,
    job.waiting_reason ? h("p", { id: "waiting-reason", class: "waiting" },
      h("b", { text: `${t("waiting_reason")}: ` }), job.waiting_reason) : null,
    jobMeta(job),
    h("p", { class: "overall" }, `${t("overall")}${firstMethod(job) ? ` (${firstMethod(job)})` : ""}: `,
      h("strong", { id: "overall-score", text: job.scores.overall?.toFixed(4) ?? "–" })),
    h("p", {},
      h("a", { href: `/api/jobs/${id}/export?format=json`, id: "export-json", text: t("export_json"),
        onclick: (ev) => { ev.preventDefault(); download(`/api/jobs/${id}/export?format=json`, `job-${id}.json`); } }),
      " · ",
      h("a", { href: `/api/jobs/${id}/export?format=csv`, id: "export-csv", text: t("export_csv"),
        onclick: (ev) => { ev.preventDefault(); download(`/api/jobs/${id}/export?format=csv`, `job-${id}.csv`); } }))];
  if (job.scores.cells) {
    parts.push(h("h3", { text: t("heatmap") }),
      heatmap(cellsOf(job, samples), { xLabel: t("context_length"), yLabel: t("depth") }));
  }
  parts.push(...methodComparison(job.scores));
  const points = samples.filter((s) => s.context_length && s.peak_rss_mb !== null);
  if (points.length) {
    parts.push(h("h3", { text: t("memory_chart") }),
      lineChart(memorySeries(points), { xLabel: t("context_length"), yLabel: "MB" }));
  }
  const peaks = Object.entries(job.memory).filter(([k]) => k.endsWith("_mb"));
  parts.push(h("h3", { text: t("memory_peaks") }),
    h("table", { id: "memory-peaks" }, peaks.map(([k, v]) => h("tr", {}, h("th", { text: k }), h("td", { text: v })))),
    h("h3", { text: t("events") }),
    h("ul", { id: "events" }, job.events.map((e) => h("li", { text:
      `${e.kind} ${e.model ?? ""} ${e.seconds !== undefined ? e.seconds + " s" : ""} ${e.note || e.message || ""}` }))));
  const onlyFailures = h("input", { type: "checkbox", id: "failures-only" });
  const tbody = h("tbody");
  const byMethod = samples.some((s) => s.fields?.method);
  const render = () => tbody.replaceChildren(...samples
    .filter((s) => !onlyFailures.checked || (s.score ?? 0) < 1)
    .map((s) => h("tr", { "data-idx": s.idx },
      h("td", { text: s.idx }), byMethod ? h("td", { class: "method", text: s.fields.method ?? "" }) : null,
      h("td", { text: s.context_length ?? "" }), h("td", { text: s.depth_percent ?? "" }),
      h("td", {}, h("details", {}, h("summary", { text: s.prompt.slice(0, 80) + "…" }),
        h("pre", { class: "prompt", text: s.prompt }))),
      h("td", { class: "prediction", text: s.prediction }),
      h("td", { text: s.score?.toFixed(2) ?? "" }), h("td", { text: s.latency_s.toFixed(3) }))));
  onlyFailures.addEventListener("change", render);
  render();
  parts.push(h("h3", { text: t("samples") }),
    h("label", {}, onlyFailures, ` ${t("failures_only")}`),
    h("table", { id: "samples-table" }, h("thead", {}, h("tr", {},
      ["id", byMethod && "method", "context_length", "depth", "prompt", "prediction", "score", "latency"]
        .filter(Boolean).map((k) => h("th", { text: t(k) })))),
    tbody));
  main.replaceChildren(...parts.filter(Boolean));
}

// --- compare -----------------------------------------------------------------------

async function viewCompare() {
  stopPolling();
  const res = await api("GET", "/api/jobs?state=succeeded&per_page=500");
  const jobs = res.ok ? res.data.jobs : [];
  const latest = {};
  for (const j of jobs) {
    const key = `${j.model}\u0000${j.dataset}`;
    if (!latest[key]) latest[key] = j;
  }
  const rows = Object.values(latest).map((j) => h("tr", {},
    h("td", { text: j.model }), h("td", { text: j.dataset }),
    h("td", { text: j.scores.overall?.toFixed(4) ?? "" }),
    h("td", { text: mb(j.memory.rss_peak_bytes) }),
    h("td", { text: j.duration_s ? (j.progress.done / j.duration_s).toFixed(2) : "" }),
    h("td", {}, h("a", { href: `#/job/${j.id}`, text: `#${j.id}` }))));
  const pickers = [0, 1].map((i) => h("select", { id: `compare-${i}` }, h("option", { value: "", text: t("pick_job") }),
    jobs.filter((j) => j.scores.cells).map((j) => h("option", { value: j.id, text: `#${j.id} ${j.model} ${j.dataset}` }))));
  const side = h("div", { class: "side-by-side" });
  const draw = async () => {
    const boxes = await Promise.all(pickers.map(async (p) => {
      if (!p.value) return h("div");
      const [jr, sr] = await Promise.all([api("GET", `/api/jobs/${p.value}`), api("GET", `/api/jobs/${p.value}/samples`)]);
      return h("div", {}, h("h4", { text: `#${jr.data.job.id} ${jr.data.job.model}` }),
        heatmap(cellsOf(jr.data.job, sr.data.samples), { xLabel: t("context_length"), yLabel: t("depth"), width: 420 }));
    }));
    side.replaceChildren(...boxes);
  };
  pickers.forEach((p) => p.addEventListener("change", draw));
  main.replaceChildren(h("h2", { text: t("compare_table") }),
    h("table", { id: "compare-table" }, h("tr", {}, ["model", "dataset", "overall", "peak_memory", "throughput", "id"]
      .map((k) => h("th", { text: t(k) }))), rows),
    h("h3", { text: t("side_by_side") }), h("div", {}, pickers), side);
}

// --- models & memory ---------------------------------------------------------------

async function viewModels() {
  const stats = h("div", { id: "memory-stats", class: "cards" });
  const table = h("table", { id: "models-table" });
  const message = h("div", { id: "models-message", role: "status" });
  const limitInput = h("input", { id: "limit-gb", type: "number", step: "any", min: 0 });
  const timeoutInput = h("input", { id: "idle-timeout", type: "number", step: 1, min: 1 });
  const act = async (method, path, body) => {
    const res = await api(method, path, body);
    message.textContent = res.ok ? "" : res.error.message;
    refresh();
  };
  const controls = h("div", { class: "controls" },
    h("label", {}, `${t("set_limit")} `, limitInput),
    h("button", { id: "apply-limit", text: t("apply"), onclick: () =>
      act("POST", `/api/v1/memory/limit?limit_gb=${encodeURIComponent(limitInput.value)}`) }),
    h("label", {}, ` ${t("set_timeout")} `, timeoutInput),
    h("button", { id: "apply-timeout", text: t("apply"), onclick: () =>
      act("POST", "/api/gpu/timeout", { timeout: Number(timeoutInput.value) }) }));
  const refresh = async () => {
    const [s, p, m, g] = await Promise.all([api("GET", "/api/v1/memory/stats"), api("GET", "/api/v1/memory/pressure"),
      api("GET", "/api/v1/memory/models"), api("GET", "/api/gpu/status")]);
    if (!s.ok) return;
    const sd = s.data;
    // show the values in force, unless the user is typing a new one
    if (document.activeElement !== limitInput && !limitInput.value && sd.memory_limit) {
      limitInput.value = (sd.memory_limit / 2 ** 30).toFixed(2);
    }
    const anyModel = Object.values(g.data || {})[0];
    if (document.activeElement !== timeoutInput && !timeoutInput.value && anyModel) {
      timeoutInput.value = anyModel.idle_timeout_seconds;
    }
    stats.replaceChildren(
      h("div", { class: "card" }, h("b", { text: t("usage") }), ` ${sd.formatted_usage}`),
      h("div", { class: "card" }, h("b", { text: t("limit") }), ` ${sd.formatted_limit}`),
      h("div", { class: "card" }, h("b", { text: t("system_available") }), ` ${sd.formatted_system_available} / ${sd.formatted_system_total}`),
      h("div", { class: `card ${p.data.memory_pressure ? "warn" : ""}`, id: "pressure" },
        h("b", { text: t("pressure") }), ` ${p.data.memory_pressure ? t("yes") : t("no")}`,
        p.data.recommended_unload.length ? h("div", { text: `${t("recommended")}: ` +
          p.data.recommended_unload.map((r) => r.model_name).join(", ") }) : null));
    const gpuInfo = Object.values(g.data || {})[0];
    if (gpuInfo && Object.keys(gpuInfo.gpu_memory).length) {
      stats.append(h("div", { class: "card" }, h("b", { text: t("gpu_memory") }),
        Object.entries(gpuInfo.gpu_memory).map(([dev, v]) => h("div", { text: `${dev}: ${v.allocated_gb} / ${v.total_gb} GB` }))));
    }
    const head = h("tr", {}, ["model", "worker", "location", "size", "idle", "loads", "pinned", "actions"]
      .map((k) => h("th", { text: t(k) })));
    const rows = (m.data?.models || []).map((x) => h("tr", { "data-model": x.model_name, "data-location": x.location,
      // a worker whose heartbeat stopped: what it last said, which may no longer be true
      class: x.stale ? "stale" : null },
      h("td", { text: x.model_name }), h("td", { text: x.stale ? `${x.worker_id} (${t("worker_lost")})` : x.worker_id }),
      h("td", { class: "location", text: x.location }),
      h("td", { text: x.formatted_size }), h("td", { text: x.idle_time_seconds }), h("td", { text: x.load_count }),
      h("td", { text: x.pinned ? t("yes") : t("no") }),
      h("td", {},
        h("button", { class: "offload", text: t("offload"), onclick: () => act("POST", "/api/gpu/offload", { model: x.model_name, worker: x.worker_id }) }),
        h("button", { class: "release", text: t("release"), onclick: () => act("POST", "/api/gpu/release", { model: x.model_name, worker: x.worker_id }) }),
        h("button", { class: "pin", text: x.pinned ? t("unpin") : t("pin"), onclick: () =>
          act("POST", x.pinned ? "/api/v1/memory/unpin" : "/api/v1/memory/pin", { model: x.model_name, worker: x.worker_id }) }))));
    table.replaceChildren(head, ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 8, text: t("no_models") }))]));
  };
  main.replaceChildren(h("h2", { text: t("nav_models") }), stats, controls, message, table);
  poll(refresh, 2000);
}

// --- shell -------------------------------------------------------------------------

function renderNav() {
  const nav = document.getElementById("nav");
  nav.replaceChildren(...[["#/launch", "nav_launch"], ["#/queue", "nav_queue"], ["#/workers", "nav_workers"],
    ["#/compare", "nav_compare"], ["#/models", "nav_models"]].map(([href, key]) => h("a", { href, text: t(key),
      class: location.hash.startsWith(href) ? "active" : "" })),
    h("button", { id: "lang-toggle", type: "button", text: t("language"), onclick: () => {
      setLang(lang === "en" ? "zh" : "en");
      route();
    } }));
  document.getElementById("title").textContent = t("title");
}

function route() {
  renderNav();
  const hash = location.hash || "#/launch";
  const job = /^#\/job\/(\d+)/.exec(hash);
  if (job) return viewJob(job[1]);
  stopPolling();
  if (hash.startsWith("#/queue")) return viewQueue();
  if (hash.startsWith("#/workers")) return viewWorkers(main);
  if (hash.startsWith("#/compare")) return viewCompare();
  if (hash.startsWith("#/models")) return viewModels();
  return viewLaunch();
}

setLang(lang);
window.addEventListener("hashchange", route);
route();
