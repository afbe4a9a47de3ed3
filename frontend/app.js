// LLM Bench Shower web page: plain ES modules, no build step. Everything the model
// produced is inserted as text (textContent), never as HTML.
import { DIFFERENCE_SCALE, heatmap } from "./charts.js";
import { fetchProgress } from "./datastatus.js";
import { api, badge, datasetInfo, fmtBytes, fmtSeconds, h, poll, stopPolling } from "./dom.js";
import { lang, setLang, t, tr } from "./i18n.js";
import { cellsOf, viewJob } from "./job.js";
import { viewLaunch } from "./launch.js";
import { viewLeaderboard } from "./leaderboard.js";
import { fmtScore, sortableTable } from "./tables.js";
import { viewWorkers } from "./workers.js";

const main = document.getElementById("main");

// --- queue -------------------------------------------------------------------------

function eta(job) {
  if (job.state !== "running" || !job.progress.total || !job.progress.done || !job.started_at) return "";
  const elapsed = (Date.now() - Date.parse(job.started_at + "Z")) / 1000;
  return fmtSeconds((elapsed / job.progress.done) * (job.progress.total - job.progress.done));
}

async function viewQueue() {
  const table = h("table", { id: "queue-table" });
  main.replaceChildren(h("h2", { text: t("nav_queue") }), h("div", { class: "table-wrap" }, table));
  // state and progress first: on a phone they are what is in view, the rest scrolls
  const head = h("tr", {}, ["id", "state", "progress", "model", "dataset", "eta", "worker",
    "location", "actions"].map((k) => h("th", { "data-col": k, text: t(k) })));
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
        actions.push(h("button", { class: "delete", text: t("delete"), onclick: () => {
          if (window.confirm(t("confirm_delete").replace("{id}", job.id))) api("DELETE", `/api/jobs/${job.id}`);
        } }));
      }
      return h("tr", { "data-job": job.id, "data-state": job.state },
        h("td", { "data-col": "id" }, h("a", { href: `#/job/${job.id}`, text: `#${job.id}` })),
        h("td", { "data-col": "state" }, badge(job.state), job.error ? h("div", { class: "error", text: job.error }) : null,
          job.waiting_reason ? h("div", { class: "waiting", text: tr(job.waiting_reason) }) : null),
        h("td", { "data-col": "progress", class: "progress-cell" }, h("progress", { max: 100, value: pct }),
          ` ${job.progress.done}/${job.progress.total ?? "?"}`, fetchProgress(job)),
        h("td", { text: job.model }), h("td", { text: job.dataset }),
        h("td", { text: eta(job) }),
        h("td", { text: job.worker_id || (job.data_parallel > 1 ? `${job.data_parallel} ${t("workers_lc")}` : "") }),
        h("td", { text: where[job.model] || "" }), h("td", {}, actions));
    });
    table.replaceChildren(head, ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 9, text: t("no_jobs") }))]));
  });
}

// --- compare -----------------------------------------------------------------------

// The grid of a NIAH job: its context lengths and depths, to warn when two grids differ.
function gridOf(job) {
  const cells = job.scores.cells || [];
  return { lengths: [...new Set(cells.map((c) => c.context_length))].sort((a, b) => a - b),
           depths: [...new Set(cells.map((c) => c.depth_percent))].sort((a, b) => a - b) };
}

function pairedSection(data) {
  const p = data.paired;
  const num = (v, d = 4) => (typeof v === "number" ? v.toFixed(d) : "–");
  const diff = typeof p.difference === "number"
    ? `${p.difference >= 0 ? "+" : ""}${num(p.difference)} [${num(p.ci95?.[0])}, ${num(p.ci95?.[1])}]` : "–";
  const cell = (key, value) => [h("dt", { text: t(key) }), h("dd", { "data-key": key, text: value ?? "–" })];
  const differing = Object.entries(data.differing_params || {});
  const disagreeCols = [
    { key: "a_idx", title: "#", num: true },
    { key: "reference", title: t("reference"), value: (r) => JSON.stringify(r.reference ?? ""),
      cell: (r) => h("small", { text: typeof r.reference === "string" ? r.reference : JSON.stringify(r.reference ?? "") }) },
    { key: "a", title: t("prediction_a"), value: (r) => r.a.score,
      cell: (r) => h("span", {}, h("b", { text: `${num(r.a.score, 2)} ` }), h("small", { class: "answer", text: r.a.prediction })) },
    { key: "b", title: t("prediction_b"), value: (r) => r.b.score,
      cell: (r) => h("span", {}, h("b", { text: `${num(r.b.score, 2)} ` }), h("small", { class: "answer", text: r.b.prediction })) },
  ];
  return h("section", { id: "paired", class: "breakdown" },
    h("h3", { text: t("paired_title") }),
    h("p", { class: "hint", text: t("paired_help") }),
    h("dl", { class: "meta figures", id: "paired-figures" },
      ...cell("shared_items", p.n),
      ...(p.binary ? [...cell("both_right", p.both_right), ...cell("a_only", p.a_only),
        ...cell("b_only", p.b_only), ...cell("both_wrong", p.both_wrong), ...cell("mcnemar", num(p.mcnemar_p))] : []),
      ...cell("difference", diff)),
    h("h4", { text: t("differing_params") }),
    differing.length
      ? h("table", { id: "differing-params", class: "compact" },
        h("tr", {}, h("th", { text: t("params") }), h("th", { text: `A #${data.a.id}` }), h("th", { text: `B #${data.b.id}` })),
        differing.map(([k, [va, vb]]) => h("tr", {}, h("td", { text: k }),
          h("td", { text: JSON.stringify(va) }), h("td", { text: JSON.stringify(vb) }))))
      : h("p", { class: "muted", text: t("no_differing_params") }),
    data.differing_manifest && Object.keys(data.differing_manifest).length ? [
      h("h4", { text: t("differing_manifest") }),
      h("table", { id: "differing-manifest", class: "compact" },
        h("tr", {}, h("th", { text: t("manifest") }), h("th", { text: `A #${data.a.id}` }), h("th", { text: `B #${data.b.id}` })),
        Object.entries(data.differing_manifest).map(([k, [va, vb]]) => h("tr", {}, h("td", { text: k }),
          h("td", { text: JSON.stringify(va) }), h("td", { text: JSON.stringify(vb) }))))] : null,
    data.disagreements.length ? [
      h("h4", {}, t("disagreements"), h("small", { class: "muted", text: ` (${data.disagreements_total})` })),
      sortableTable(disagreeCols, data.disagreements, { id: "disagreements", compact: true })] : null);
}

async function viewCompare() {
  stopPolling();
  const res = await api("GET", "/api/jobs?state=succeeded&per_page=500");
  const jobs = res.ok ? res.data.jobs : [];
  if (!jobs.length) {
    main.replaceChildren(h("h2", { text: t("side_by_side") }),
      h("p", { id: "compare-empty", class: "empty" }, t("compare_empty"), " ",
        h("a", { href: "#/launch", text: t("nav_launch") })));
    return;
  }
  const pickers = [0, 1].map((i) => h("select", { id: `compare-${i}`, "aria-label": `${t("pick_job")} ${i + 1}` },
    h("option", { value: "", text: t("pick_job") }),
    jobs.map((j) => h("option", { value: j.id, text: `#${j.id} ${j.dataset} · ${j.model} · ${fmtScore(j.scores?.overall)}` }))));
  const warning = h("p", { id: "compare-warning", class: "waiting", role: "status" });
  const paired = h("div", { id: "compare-result" });
  const side = h("div", { class: "side-by-side" });
  const draw = async () => {
    const [a, b] = pickers.map((p) => p.value);
    warning.textContent = "";
    paired.replaceChildren();
    side.replaceChildren();
    if (!a || !b) { warning.textContent = t("compare_pick"); return; }
    const cmp = await api("GET", `/api/compare?a=${a}&b=${b}`);
    if (!cmp.ok) {
      paired.replaceChildren(h("p", { class: "error", id: "compare-error" }, h("b", { text: `${t("not_comparable")}: ` }), cmp.error.message));
      return;
    }
    paired.replaceChildren(pairedSection(cmp.data));
    // side by side and their difference only for a dataset that offers a heatmap (NIAH's grid)
    const info = await datasetInfo(cmp.data.a.dataset);
    if (!(info?.breakdowns || []).some((part) => part.kind === "heatmap")) return;
    const diff = cmp.data.heatmap_difference || [];
    if (diff.length) {
      paired.append(h("section", { id: "heatmap-difference", class: "breakdown" },
        h("h4", { text: t("heatmap_difference") }),
        h("div", { class: "chart-box" }, heatmap(diff.map((c) => ({ ...c, score: c.difference,
          tooltip: `${t("context_length")} ${c.context_length}, ${t("depth")} ${c.depth_percent}: ` +
            `A ${c.a.toFixed(2)} − B ${c.b.toFixed(2)} = ${c.difference.toFixed(2)}` })),
        { xLabel: t("context_length"), yLabel: t("depth"), width: 420, scale: DIFFERENCE_SCALE }))));
    }
    const picked = await Promise.all([a, b].map(async (id) => {
      const [jr, sr] = await Promise.all([api("GET", `/api/jobs/${id}`), api("GET", `/api/jobs/${id}/samples?per_page=5000`)]);
      return jr.ok ? { job: jr.data.job, samples: sr.ok ? sr.data.samples : [] } : null;
    }));
    side.replaceChildren(...picked.map((x) => (x ? h("div", {},
      h("h4", {}, h("a", { href: `#/job/${x.job.id}`, text: `#${x.job.id}` }), ` ${x.job.model} · ${fmtScore(x.job.scores.overall)}`),
      heatmap(cellsOf(x.job, x.samples), { xLabel: t("context_length"), yLabel: t("depth"), width: 420 })) : h("div"))));
    const [ja, jb] = picked;
    if (ja && jb) {
      const ga = gridOf(ja.job), gb = gridOf(jb.job);
      if (JSON.stringify(ga) !== JSON.stringify(gb)) {
        warning.textContent = t("grids_differ").replace("{a}", `${ga.lengths.join("/")} × ${ga.depths.join("/")}`)
          .replace("{b}", `${gb.lengths.join("/")} × ${gb.depths.join("/")}`);
      }
    }
  };
  pickers.forEach((p) => p.addEventListener("change", draw));
  main.replaceChildren(h("h2", { text: t("side_by_side") }),
    h("p", { class: "hint" }, t("compare_help"), " ", h("a", { href: "#/leaderboard", text: t("nav_leaderboard") })),
    h("div", { class: "controls" }, pickers), warning, paired, side);
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
    // in force with or without a loaded model (a worker's, the stored one, or the configured)
    if (document.activeElement !== timeoutInput && !timeoutInput.value && sd.idle_timeout_seconds) {
      timeoutInput.value = sd.idle_timeout_seconds;
    }
    // sizes from the bytes, in GiB/MiB like the rest of the page (the API's formatted_*
    // fields keep the brief's "GB" labels)
    stats.replaceChildren(
      h("div", { class: "card", id: "memory-usage" }, h("b", { text: t("usage") }), ` ${fmtBytes(sd.total_memory_usage)}`),
      h("div", { class: "card", id: "memory-limit" }, h("b", { text: t("limit") }), ` ${fmtBytes(sd.memory_limit)}`),
      h("div", { class: "card", id: "system-memory" }, h("b", { text: t("system_available") }), ` ${fmtBytes(sd.system_available)} / ${fmtBytes(sd.system_total)}`),
      h("div", { class: `card ${p.data.memory_pressure ? "warn" : ""}`, id: "pressure" },
        h("b", { text: t("pressure") }), ` ${p.data.memory_pressure ? t("yes") : t("no")}`,
        p.data.recommended_unload.length ? h("div", { text: `${t("recommended")}: ` +
          p.data.recommended_unload.map((r) => r.model_name).join(", ") }) : null));
    const gpuInfo = Object.values(g.data || {})[0];
    if (gpuInfo && Object.keys(gpuInfo.gpu_memory).length) {
      stats.append(h("div", { class: "card" }, h("b", { text: t("gpu_memory") }),
        Object.entries(gpuInfo.gpu_memory).map(([dev, v]) => h("div", { text: `${dev}: ${v.allocated_gb} / ${v.total_gb} GiB` }))));
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
  main.replaceChildren(h("h2", { text: t("nav_models") }), stats, controls, message, h("div", { class: "table-wrap" }, table));
  poll(refresh, 2000);
}

// --- shell -------------------------------------------------------------------------

function renderNav() {
  const nav = document.getElementById("nav");
  nav.replaceChildren(...[["#/launch", "nav_launch"], ["#/queue", "nav_queue"], ["#/leaderboard", "nav_leaderboard"],
    ["#/compare", "nav_compare"], ["#/workers", "nav_workers"], ["#/models", "nav_models"]].map(([href, key]) => h("a", { href, text: t(key),
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
  if (job) return viewJob(main, job[1]);
  stopPolling();
  if (hash.startsWith("#/queue")) return viewQueue();
  if (hash.startsWith("#/workers")) return viewWorkers(main);
  if (hash.startsWith("#/leaderboard")) return viewLeaderboard(main);
  if (hash.startsWith("#/compare")) return viewCompare();
  if (hash.startsWith("#/models")) return viewModels();
  return viewLaunch(main);
}

setLang(lang);
window.addEventListener("hashchange", route);
route();
