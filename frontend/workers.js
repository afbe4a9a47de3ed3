// The workers panel: every worker that registered (GET /api/workers), refreshed by polling.
import { api, badge, fmtSeconds, gib, h, poll } from "./dom.js";
import { t } from "./i18n.js";

function gpuCell(w) {
  if (!w.gpu_count) return t("no_gpu");
  return [h("div", { class: "gpu-count", text: `${w.gpu_count} × GPU` }),
    ...(w.gpus || []).map((g) => h("div", { class: "gpu",
      text: `#${g.index} ${g.name ?? ""}: ${gib(g.free_bytes)} / ${gib(g.total_bytes)} GiB ${t("free")}` }))];
}

function workerRow(w) {
  // lost and stopped workers stay listed, greyed out and marked, so a dead one is noticed
  return h("tr", { "data-worker": w.id, "data-state": w.state, class: `worker-${w.state}` },
    h("td", {}, h("code", { text: w.id })),
    h("td", {}, w.host, h("small", { class: "muted", text: ` pid ${w.pid} · ${w.device}` })),
    h("td", { class: "state" }, badge(w.state, t(`worker_${w.state}`))),
    h("td", {}, (w.labels || []).map((l) => h("span", { class: "tag", text: l }))),
    h("td", { class: "gpus" }, gpuCell(w)),
    h("td", { class: "current-job" },
      w.current_job_id ? h("a", { href: `#/job/${w.current_job_id}`, text: `#${w.current_job_id}` }) : ""),
    h("td", { class: "heartbeat", text: `${fmtSeconds(w.heartbeat_age_s)} ${t("ago")}` }));
}

function poolRow(d) {
  return h("tr", { "data-pool": d.pool },
    h("td", {}, h("code", { text: d.pool })), h("td", { text: d.engine }),
    h("td", { class: "queued", text: String(d.queued) }), h("td", { class: "busy", text: String(d.busy) }),
    h("td", { class: "held", text: String(d.placed) }),
    h("td", { class: "decision" }, d.message, h("small", { class: "muted", text: ` · ${new Date(d.at).toLocaleTimeString()}` })));
}

/** The cluster pools (`lbs cluster ray|slurm`): each pool's latest decision, and the
 * recent ones; hidden while no controller has run. */
function clusterSection(section, data) {
  if (!data.pools.length) { section.replaceChildren(); return; }
  const head = h("tr", {}, ["pool", "engine", "queued_for_pool", "busy", "held", "decision"]
    .map((k) => h("th", { text: t(k) })));
  const recent = h("details", {}, h("summary", { text: t("recent_decisions") }),
    h("ul", { id: "cluster-decisions" }, data.decisions.map((d) =>
      h("li", { text: `${new Date(d.at).toLocaleTimeString()} ${d.pool}: ${d.message}` }))));
  section.replaceChildren(h("h3", { text: t("cluster_pools") }),
    h("p", { class: "hint", text: t("cluster_hint") }),
    h("div", { class: "table-wrap" }, h("table", { id: "cluster-table" }, head, ...data.pools.map(poolRow))), recent);
}

/** Render the panel into `main` and keep it fresh with the page's polling. */
export function viewWorkers(main) {
  const summary = h("p", { id: "workers-summary" });
  const table = h("table", { id: "workers-table" });
  const cluster = h("section", { id: "cluster" });
  main.replaceChildren(h("h2", { text: t("nav_workers") }), summary, h("div", { class: "table-wrap" }, table), cluster);
  const head = h("tr", {}, ["id", "host", "state", "labels", "gpus", "current_job", "heartbeat"]
    .map((k) => h("th", { text: t(k) })));
  poll(async () => {
    const res = await api("GET", "/api/workers");
    if (!res.ok) { summary.textContent = res.error.message; return; }
    const workers = res.data.workers;
    summary.textContent = t("workers_alive").replace("{alive}", workers.filter((w) => w.alive).length)
      .replace("{total}", workers.length);
    table.replaceChildren(head, ...(workers.length ? workers.map(workerRow)
      : [h("tr", {}, h("td", { colspan: 7, text: t("no_workers") }))]));
    const pools = await api("GET", "/api/cluster");
    if (pools.ok) clusterSection(cluster, pools.data);
  });
}
