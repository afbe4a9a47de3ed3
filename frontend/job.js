// The job page as a record: what ran (parameters, times, worker), how it scored, broken
// down as the dataset declares (GET /api/datasets: breakdowns, sample_columns), what
// memory it took, what the model manager did, and every sample with its evidence.
import { heatmap, lineChart } from "./charts.js";
import { api, badge, chartWidth, datasetInfo, download, fmtBytes, fmtSeconds, fmtTime, h, randomModels, stopPolling } from "./dom.js";
import { t, tr } from "./i18n.js";
import { randomWeightsNote } from "./datastatus.js";
import { methodComparison } from "./methods.js";
import { fmtScore, fmtSpread, sortableTable } from "./tables.js";

// A comparison job stores every item once per method; its cells are the first method's.
function firstMethod(job) { return job.scores.methods?.[0]?.method; }

export function cellsOf(job, samples) {
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

// --- the record -------------------------------------------------------------------

function record(job) {
  const rows = [
    ["model", job.model], ["dataset", job.dataset], ["state", t(job.state)],
    ["submitted_at", fmtTime(job.created_at)], ["started_at", fmtTime(job.started_at)],
    ["finished_at", fmtTime(job.finished_at)],
    ["duration", job.duration_s !== null && job.duration_s !== undefined ? fmtSeconds(job.duration_s) : ""],
    ["worker", job.worker_id], ["attempts", job.data_parallel > 1 ? null : job.attempts],  // per shard there
    ["priority", job.priority], ["submitter", job.submitter], ["worker_label", job.worker_label],
    ["num_gpus", job.num_gpus], ["data_parallel", job.data_parallel > 1 ? job.data_parallel : null],
    ["memory_estimate", fmtBytes(job.memory_estimate_bytes)],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "");
  return h("dl", { id: "job-meta", class: "meta" },
    rows.flatMap(([k, v]) => [h("dt", { text: t(k) }), h("dd", { "data-key": k, text: v })]));
}

/** What the job runs with: every parameter, its dataset's defaults filled in, those
 * not sent marked as defaults. */
function paramsTable(job) {
  const sent = job.params || {};
  const entries = Object.entries(job.effective_params || sent);
  if (!entries.length) return h("p", { class: "muted", text: t("defaults_only") });
  return h("div", { class: "table-wrap" }, h("table", { id: "job-params" },
    entries.map(([k, v]) => h("tr", { "data-param": k, "data-default": String(!(k in sent)) },
      h("th", { scope: "row", text: k }),
      h("td", {}, h("code", { text: typeof v === "string" ? v : JSON.stringify(v) }),
        k in sent ? null : h("small", { class: "muted", text: ` ${t("param_default")}` }))))));
}

// --- a data-parallel job's shards -------------------------------------------------------

function highest(memory, key) {  // a shard's peak over its GPUs (one entry per device)
  const values = Object.values(memory?.gpu || {}).map((g) => g[key]).filter((v) => typeof v === "number");
  return values.length ? Math.max(...values) : null;
}

/** A job's own peak RAM; the process's for a job run before that was measured. */
const ownRss = (s) => s.memory?.rss_own_peak_bytes ?? s.memory?.rss_peak_bytes ?? null;

function shardsSection(job) {
  if (!job.shards?.length) return [];
  const columns = [
    { key: "shard_index", title: t("shard"), num: false },  // k, as in idx % n == k and shard<k>_ peaks
    { key: "state", title: t("state"), cell: (s) => badge(s.state) },
    { key: "worker_id", title: t("worker") },
    { key: "progress", title: t("progress"), value: (s) => s.progress.done, cell: (s) => {
      const pct = s.progress.total ? Math.round((100 * s.progress.done) / s.progress.total) : 0;
      return h("span", { class: "shard-progress" }, h("progress", { max: 100, value: pct }),
        ` ${s.progress.done}/${s.progress.total ?? "?"}`);
    } },
    { key: "attempts", title: t("attempts"), num: true },
    { key: "rss_peak", title: t("peak_rss"), num: true, value: ownRss,
      cell: (s) => fmtBytes(ownRss(s)) },
    { key: "gpu_peak", title: t("peak_gpu"), num: true, value: (s) => highest(s.memory, "max_allocated_bytes"),
      cell: (s) => fmtBytes(highest(s.memory, "max_allocated_bytes")) },
    { key: "duration_s", title: t("duration"), num: true,
      cell: (s) => (s.duration_s === null || s.duration_s === undefined ? "" : fmtSeconds(s.duration_s)) },
    { key: "note", title: t("shard_note"), value: (s) => s.error || s.waiting_reason || "",
      cell: (s) => h("small", { class: s.error ? "error" : "waiting", text: tr(s.error || s.waiting_reason || "") }) },
  ];
  return [h("h3", { text: t("shards") }),
    h("p", { class: "hint", text: t("shards_help").replaceAll("{n}", job.shards.length) }),
    sortableTable(columns, job.shards, { id: "shards-table",
      rowAttrs: (s) => ({ "data-shard": s.shard_index, "data-state": s.state }) })];
}

// --- the run manifest -------------------------------------------------------------------

/** A nested record as [dotted key, value] rows. */
export function flatRows(record, prefix = "") {
  return Object.entries(record || {}).flatMap(([k, v]) => (v && typeof v === "object" && !Array.isArray(v)
    ? flatRows(v, `${prefix}${k}.`) : [[`${prefix}${k}`, v]]));
}

function manifestSection(job) {
  if (!job.manifest) return null;
  const rows = flatRows(job.manifest).filter(([k]) => k !== "task.params" && !k.startsWith("task.params."));
  return h("details", { id: "manifest", class: "manifest" },
    h("summary", {}, h("b", { text: t("manifest") }), h("small", { class: "muted", text: ` — ${t("manifest_help")}` })),
    h("div", { class: "table-wrap" }, h("table", { class: "compact" }, rows.map(([k, v]) =>
      h("tr", { "data-key": k }, h("th", { text: k }), h("td", { text: fieldText(v) }))))));
}

// --- scores as the dataset declares them ----------------------------------------------

function figures(part, scores) {
  const rows = part.rows.filter((r) => typeof scores[r.key] === "number");
  if (!rows.length) return null;
  return h("section", { class: "breakdown", "data-breakdown": part.key },
    h("h3", { text: tr(part.title) }),
    h("dl", { class: "meta figures" }, rows.flatMap((r) => [
      h("dt", { text: tr(r.title) }),
      h("dd", { "data-key": r.key }, h("strong", { text: r.format === "count" ? String(scores[r.key]) : fmtScore(scores[r.key]) }),
        h("span", { class: "spread", text: ` ${fmtSpread(scores[`${r.key}_stderr`], scores[`${r.key}_ci95`])}` }),
        r.help ? h("small", { class: "muted", text: ` — ${tr(r.help)}` }) : null)])));
}

function table(part, scores) {
  const rows = scores[part.key];
  if (!Array.isArray(rows) || !rows.length) return null;
  const columns = [...part.columns.map((c) => ({ key: c.key, title: tr(c.title) })),
    { key: "score", title: t("score"), num: true, cell: (r) => fmtScore(r.score) },
    { key: "stderr", title: t("error_bars"), num: true, cell: (r) => h("span", { class: "spread" },
      fmtSpread(r.stderr, r.ci95), r.few_items ? h("small", { class: "few", title: t("few_items_help"), text: ` ${t("few_items")}` }) : null) },
    { key: "count", title: t("count"), num: true }];
  return h("section", { class: "breakdown", "data-breakdown": part.key },
    h("h3", {}, tr(part.title), h("small", { class: "muted", text: ` (${rows.length})` })),
    sortableTable(columns, rows, { id: `breakdown-${part.key}`, compact: true }));
}

function breakdowns(job, info, samples) {
  const out = [];
  for (const part of info?.breakdowns || []) {
    if (part.kind === "figures") out.push(figures(part, job.scores));
    else if (part.kind === "table") out.push(table(part, job.scores));
    else if (part.kind === "heatmap" && job.scores[part.key]) {
      out.push(h("section", { class: "breakdown", "data-breakdown": part.key }, h("h3", { text: t("heatmap") }),
        h("div", { class: "chart-box" }, heatmap(cellsOf(job, samples), { xLabel: t("context_length"), yLabel: t("depth"), width: chartWidth() }))));
    }
  }
  return out.filter(Boolean);
}

// --- memory -------------------------------------------------------------------------

const MEMORY_MEANING = {
  rss_before_load: "mem_rss_before_load", rss_at_load: "mem_rss_at_load", rss_after_job: "mem_rss_after_job",
  rss_peak: "mem_rss_peak", rss_baseline: "mem_rss_baseline", rss_own_peak: "mem_rss_own_peak",
  max_allocated: "mem_max_allocated", max_reserved: "mem_max_reserved",
  nvml_process_used: "mem_nvml",
};

/** What a reading means; a data-parallel job's `shard<k>_<reading>` is shard k's reading. */
function meaningOf(name) {
  const m = /^shard(\d+)_(.*)$/.exec(name);
  const key = MEMORY_MEANING[m ? m[2] : name];
  if (!key) return "";
  return m ? `${t("shard")} ${m[1]}: ${t(key)}` : t(key);
}

function memoryTable(job) {
  const rows = [];
  for (const [k, v] of Object.entries(job.memory || {})) {
    if (k.endsWith("_bytes")) rows.push([k.slice(0, -6), "RAM", v]);
  }
  for (const [device, peaks] of Object.entries(job.memory?.gpu || {})) {
    for (const [k, v] of Object.entries(peaks)) if (k.endsWith("_bytes")) rows.push([k.slice(0, -6), device, v]);
  }
  return h("div", { class: "table-wrap" }, h("table", { id: "memory-peaks" },
    h("thead", {}, h("tr", {}, [t("reading"), t("device"), t("amount"), t("meaning")].map((x) => h("th", { text: x })))),
    h("tbody", {}, rows.map(([name, device, bytes]) => h("tr", { "data-reading": name },
      h("th", { scope: "row" }, h("code", { text: name })), h("td", { text: device }),
      h("td", { class: "num", text: fmtBytes(bytes) }),
      h("td", { class: "muted", text: meaningOf(name) }))))));
}

function memorySeries(points, xOf) {
  const methods = [...new Set(points.map((s) => s.fields?.method).filter(Boolean))];
  const groups = methods.length ? methods.map((m) => [` (${m})`, points.filter((s) => s.fields?.method === m)])
    : [["", points]];
  const withGpu = points.some((s) => s.peak_gpu_mb);
  const withOwn = points.some((s) => s.peak_own_rss_mb !== null && s.peak_own_rss_mb !== undefined);
  const peak = (pts, key) => {  // highest per x: several samples can share a length
    const best = {};
    for (const s of pts) if (s[key] !== null) best[xOf(s)] = Math.max(best[xOf(s)] ?? 0, s[key]);
    return Object.entries(best).map(([x, y]) => [Number(x), y]);
  };
  return groups.flatMap(([suffix, pts]) => [
    // the job's own RAM: the process's would add the worker's baseline to every point
    withOwn ? { name: `${t("peak_rss_own")}${suffix}`, points: peak(pts, "peak_own_rss_mb") }
      : { name: `${t("peak_rss")}${suffix}`, points: peak(pts, "peak_rss_mb") },
    withGpu ? { name: `${t("peak_gpu")}${suffix}`, points: peak(pts, "peak_gpu_mb") } : null,
  ].filter(Boolean));
}

/** A figure in MiB, shown in GiB from 1 GiB up; `d` decimals (axes pass what their ticks need). */
const mib = (v, d) => (v >= 1024 ? `${(v / 1024).toFixed(Math.max(d ?? 2, 1))} GiB` : `${v.toFixed(d ?? (v < 10 ? 1 : 0))} MiB`);

/** A sample's peak as the leaderboard counts it: GPU, else the job's own RAM, else the
 * process's (a sample stored before the own figure was measured). */
const samplePeak = (s) => s.peak_gpu_mb ?? s.peak_own_rss_mb ?? s.peak_rss_mb ?? null;

function memoryChart(samples) {
  const points = samples.filter((s) => s.peak_rss_mb !== null);
  if (!points.length) return [];
  const byLength = points.some((s) => s.context_length);
  const xOf = (s) => (byLength ? s.context_length : s.prompt_tokens);
  return [h("h3", { text: t("memory_chart") }),
    h("p", { class: "hint", text: t("memory_chart_help") }),
    h("div", { class: "chart-box" }, lineChart(memorySeries(points, xOf), {
      xLabel: byLength ? t("context_length") : t("prompt_tokens"), yLabel: t("peak_memory_axis"),
      yFmt: mib, xTicks: byLength ? "data" : "nice", lines: byLength, width: chartWidth() }))];
}

// --- events in words ----------------------------------------------------------------

function eventText(e) {
  const model = e.model ? ` ${e.model}` : "";
  const secs = typeof e.seconds === "number" ? ` ${t("in")} ${e.seconds < 1 ? e.seconds.toFixed(2) : e.seconds.toFixed(1)} s` : "";
  const size = e.bytes ? ` (${fmtBytes(e.bytes)})` : "";
  const ram = e.rss_before_bytes !== undefined && e.rss_after_bytes !== undefined
    ? `; ${t("ram_went")} ${fmtBytes(e.rss_before_bytes)} → ${fmtBytes(e.rss_after_bytes)}` : "";
  const key = `event_${e.kind}`;
  const verb = t(key) === key ? e.kind : t(key);
  const note = e.note || e.message ? ` — ${e.note || e.message}` : "";
  return `${verb}${model}${size}${secs}${ram}${note}`;
}

// --- samples ------------------------------------------------------------------------

function outcomeOf(s) {
  if (s.error) return "error";
  if (s.score === null || s.score === undefined) return "";
  return s.score >= 1 ? "right" : s.score <= 0 ? "wrong" : "partly";
}

function fieldText(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "boolean") return v ? t("yes") : t("no");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function isRecord(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }

function referenceCell(ref) {
  if (ref === null || ref === undefined) return "";
  if (Array.isArray(ref)) return h("ul", { class: "refs" }, ref.map((r) => h("li", { text: fieldText(r) })));
  if (typeof ref === "object") {
    return h("dl", { class: "refs" }, Object.entries(ref).filter(([, v]) => v !== null && v !== undefined)
      .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: fieldText(v) })]));
  }
  return String(ref);
}

function logprobCell(lp, prediction) {
  if (!lp || typeof lp !== "object") return "";
  return h("span", { class: "logprobs" }, Object.entries(lp).map(([label, v]) =>
    h("span", { class: label === prediction ? "chosen" : null, text: `${label} ${Number(v).toFixed(2)}` })));
}

function samplesSection(job, info, samples, total) {
  const own = (info?.sample_columns || []).filter((c) => samples.some((s) => s.fields?.[c.key] !== undefined));
  const byMethod = samples.some((s) => s.fields?.method);
  const filters = own.filter((c) => c.filter).map((c) => {
    const values = [...new Set(samples.map((s) => fieldText(s.fields?.[c.key])))].filter((v) => v !== "")
      .sort(new Intl.Collator(undefined, { numeric: true }).compare);
    return [c, h("select", { "data-filter": c.key, "aria-label": tr(c.title) },
      h("option", { value: "", text: `${tr(c.title)}: ${t("all")}` }),
      values.map((v) => h("option", { value: v, text: v })))];
  });
  const outcome = h("select", { id: "outcome-filter", "aria-label": t("outcome") },
    ["", "right", "partly", "wrong", "error"].map((v) => h("option", { value: v, text: v ? t(`outcome_${v}`) : `${t("outcome")}: ${t("all")}` })));
  const columns = [
    { key: "idx", title: t("id"), num: false },
    byMethod ? { key: "method", title: t("method"), value: (s) => s.fields.method ?? "" } : null,
    ...own.map((c) => ({ key: c.key, title: tr(c.title), value: (s) => {
      const v = s.fields?.[c.key];
      return typeof v === "number" ? v : fieldText(v);
    }, cell: c.key === "logprobs" ? (s) => logprobCell(s.fields.logprobs, s.prediction)
      : samples.some((s) => isRecord(s.fields?.[c.key])) ? (s) => referenceCell(s.fields?.[c.key]) : undefined })),
    { key: "prompt", title: t("prompt"), value: (s) => s.prompt_tokens, cell: (s) => h("details", {},
      h("summary", { text: `${s.prompt_tokens} ${t("tokens")}` }), h("pre", { class: "prompt", text: s.prompt })) },
    { key: "reference", title: t("reference"), value: (s) => fieldText(s.fields?.reference),
      cell: (s) => h("div", { class: "reference" }, referenceCell(s.fields?.reference)) },
    { key: "prediction", title: t("prediction"), value: (s) => s.prediction,
      cell: (s) => h("div", { class: "prediction", text: s.prediction }) },
    { key: "score", title: t("score"), num: true, cell: (s) => h("span", { class: `outcome ${outcomeOf(s)}`,
      text: s.score === null || s.score === undefined ? "" : s.score.toFixed(2) }) },
    { key: "why", title: t("why"), value: (s) => s.error || s.fields?.why || "",
      cell: (s) => h("small", { class: s.error ? "error" : "muted", text: s.error || tr(s.fields?.why || "") }) },
    { key: "latency_s", title: t("latency"), num: true, cell: (s) => s.latency_s.toFixed(3) },
    { key: "peak", title: t("peak_memory_short"), num: true, value: samplePeak,
      cell: (s) => (samplePeak(s) !== null ? mib(samplePeak(s)) : "") },
  ].filter(Boolean);
  const tableBox = sortableTable(columns, samples, { id: "samples-table",
    rowAttrs: (s) => ({ "data-idx": s.idx, "data-outcome": outcomeOf(s) }), empty: t("no_samples_match") });
  const shown = h("span", { id: "samples-shown", class: "muted" });
  const apply = () => {
    const rows = samples.filter((s) => (!outcome.value || outcomeOf(s) === outcome.value) &&
      filters.every(([c, sel]) => !sel.value || fieldText(s.fields?.[c.key]) === sel.value));
    tableBox.update(rows);
    shown.textContent = `${rows.length} / ${total}`;
  };
  [outcome, ...filters.map(([, sel]) => sel)].forEach((el) => el.addEventListener("change", apply));
  apply();
  return [h("h3", { text: t("samples") }),
    h("div", { class: "controls", id: "sample-filters" }, outcome, filters.map(([, sel]) => sel), shown),
    total > samples.length ? h("p", { class: "hint", text: t("samples_first").replace("{n}", samples.length) }) : null,
    tableBox];
}

// --- the page -----------------------------------------------------------------------

export async function viewJob(main, id) {
  stopPolling();
  const [jobRes, sampleRes] = await Promise.all([api("GET", `/api/jobs/${id}`),
                                                 api("GET", `/api/jobs/${id}/samples?per_page=5000`)]);
  if (!jobRes.ok) { main.replaceChildren(h("p", { class: "error", text: jobRes.error.message })); return; }
  const job = jobRes.data.job, samples = sampleRes.ok ? sampleRes.data.samples : [];
  const [info, random] = await Promise.all([datasetInfo(job.dataset), randomModels()]);
  const exportLink = (fmt) => h("a", { href: `/api/jobs/${id}/export?format=${fmt}`, id: `export-${fmt}`,
    text: t(`export_${fmt}`), onclick: (ev) => { ev.preventDefault(); download(`/api/jobs/${id}/export?format=${fmt}`, `job-${id}.${fmt}`); } });
  const parts = [h("a", { href: "#/queue", text: `← ${t("back")}` }),
    h("h2", {}, `#${job.id} ${job.dataset} · `, h("span", { text: job.model }), " ", badge(job.state)),
    job.error ? h("p", { class: "error", text: job.error }) : null,
    job.waiting_reason ? h("p", { id: "waiting-reason", class: "waiting" },
      h("b", { text: `${t("waiting_reason")}: ` }), job.waiting_reason) : null,
    h("div", { class: "record" },
      h("section", {}, h("h3", { text: t("record") }), record(job)),
      h("section", {}, h("h3", { text: t("params") }), paramsTable(job))),
    manifestSection(job),
    ...shardsSection(job),
    h("p", { class: "overall" }, `${t("overall")}${firstMethod(job) ? ` (${firstMethod(job)})` : ""}: `,
      h("strong", { id: "overall-score", text: job.scores.overall?.toFixed(4) ?? "–" }),
      h("span", { id: "overall-spread", class: "spread", title: t("error_bars_help"),
        text: ` ${fmtSpread(job.scores.overall_stderr, job.scores.overall_ci95)}` }), randomWeightsNote(job.model, random),
      job.scores.count !== undefined ? h("small", { class: "muted", text: ` (${job.scores.count} ${t("samples_lc")})` }) : null,
      job.scores.few_items ? h("small", { id: "few-items", class: "few", title: t("few_items_help"), text: ` ${t("few_items")}` }) : null,
      " · ", exportLink("json"), " · ", exportLink("csv")),
    ...breakdowns(job, info, samples),
    ...methodComparison(job.scores),
    ...memoryChart(samples),
    h("h3", { text: t("memory_peaks") }), memoryTable(job),
    h("h3", { text: t("events") }),
    (job.events || []).length ? h("ul", { id: "events" }, job.events.map((e) => h("li", { text: eventText(e) })))
      : h("p", { class: "muted", id: "events", text: t("no_events") }),
    ...samplesSection(job, info, samples, sampleRes.ok ? sampleRes.data.total : 0)];
  main.replaceChildren(...parts.filter(Boolean));
}
