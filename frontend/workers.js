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

/** Render the panel into `main` and keep it fresh with the page's polling. */
export function viewWorkers(main) {
  const summary = h("p", { id: "workers-summary" });
  const table = h("table", { id: "workers-table" });
  main.replaceChildren(h("h2", { text: t("nav_workers") }), summary, h("div", { class: "table-wrap" }, table));
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
  });
}
