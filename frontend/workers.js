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

/** The form that starts a controller on this server (POST /api/cluster). */
function startForm(onStarted) {
  const field = (name, label, input) => h("div", { class: "field" }, h("label", { for: `cluster-${name}`, text: label }), input,
    h("span", { class: "field-error", "data-field": name }));
  const input = (name, attrs) => h("input", { id: `cluster-${name}`, name, ...attrs });
  const engine = h("select", { id: "cluster-engine", name: "engine" }, ["slurm", "ray"].map((e) => h("option", { value: e, text: e })));
  const error = h("p", { class: "error", id: "cluster-error" });
  const form = h("form", { id: "cluster-form" },
    field("engine", t("engine"), engine),
    field("max_workers", t("max_workers"), input("max_workers", { type: "number", value: 4 })),
    field("gpus_per_worker", t("gpus_per_worker"), input("gpus_per_worker", { type: "number", value: 1 })),
    field("labels", t("labels"), input("labels", { placeholder: "h100" })),
    field("pool", t("pool"), input("pool", { placeholder: "slurm-1gpu" })),
    field("partition", t("partition"), input("partition", { placeholder: "gpu" })),
    field("address", t("ray_address"), input("address", { placeholder: "auto" })),
    h("button", { type: "submit", id: "cluster-start", text: t("start_pool") }), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const v = (name) => form.elements[name].value.trim();
    const body = { engine: v("engine"), max_workers: Number(v("max_workers")), gpus_per_worker: Number(v("gpus_per_worker")) };
    if (v("labels")) body.labels = v("labels").split(",").map((x) => x.trim()).filter(Boolean);
    for (const name of ["pool", body.engine === "slurm" ? "partition" : "address"]) if (v(name)) body[name] = v(name);
    form.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
    const res = await api("POST", "/api/cluster", body);
    error.textContent = res.ok ? "" : res.error.message;
    if (!res.ok) for (const d of res.error.details || []) {
      const at = form.querySelector(`.field-error[data-field="${d.field.split("[")[0]}"]`);
      if (at) at.textContent = `${d.field}: ${d.message}`;
    }
    if (res.ok) onStarted();
  });
  return h("details", { id: "cluster-start-box" }, h("summary", { text: t("start_pool") }), form);
}

/** The cluster pools (`lbs cluster ray|slurm`): the controllers this server runs, each
 * pool's latest decision, and the recent ones. */
function clusterLive(live, data, refresh) {
  const parts = [];
  if (data.controllers.length) {
    parts.push(h("ul", { id: "cluster-controllers" }, data.controllers.map((c) => h("li", { "data-controller": c.pool },
      h("code", { text: c.command }), " ",
      h("button", { class: "stop-pool", text: t("stop_pool"), onclick: async () => { await api("DELETE", `/api/cluster/${encodeURIComponent(c.pool)}`); refresh(); } })))));
  }
  if (data.pools.length) {
    const head = h("tr", {}, ["pool", "engine", "queued_for_pool", "busy", "held", "decision"]
      .map((k) => h("th", { text: t(k) })));
    parts.push(h("div", { class: "table-wrap" }, h("table", { id: "cluster-table" }, head, ...data.pools.map(poolRow))),
      h("details", {}, h("summary", { text: t("recent_decisions") }),
        h("ul", { id: "cluster-decisions" }, data.decisions.map((d) =>
          h("li", { text: `${new Date(d.at).toLocaleTimeString()} ${d.pool}: ${d.message}` })))));
  }
  const open = live.querySelector("details")?.open;
  live.replaceChildren(...parts);
  if (open) live.querySelector("details").open = true;  // polled: keep it as the user left it
}

/** Render the panel into `main` and keep it fresh with the page's polling. */
export function viewWorkers(main) {
  const summary = h("p", { id: "workers-summary" });
  const table = h("table", { id: "workers-table" });
  const live = h("div", { id: "cluster-live" });
  let refresh = () => {};
  const cluster = h("section", { id: "cluster" }, h("h3", { text: t("cluster_pools") }),
    h("p", { class: "hint", text: t("cluster_hint") }), startForm(() => refresh()), live);
  main.replaceChildren(h("h2", { text: t("nav_workers") }), summary, h("div", { class: "table-wrap" }, table), cluster);
  const head = h("tr", {}, ["id", "host", "state", "labels", "gpus", "current_job", "heartbeat"]
    .map((k) => h("th", { text: t(k) })));
  poll(refresh = async () => {
    const res = await api("GET", "/api/workers");
    if (!res.ok) { summary.textContent = res.error.message; return; }
    const workers = res.data.workers;
    summary.textContent = t("workers_alive").replace("{alive}", workers.filter((w) => w.alive).length)
      .replace("{total}", workers.length);
    table.replaceChildren(head, ...(workers.length ? workers.map(workerRow)
      : [h("tr", {}, h("td", { colspan: 7, text: t("no_workers") }))]));
    const pools = await api("GET", "/api/cluster");
    if (pools.ok) clusterLive(live, pools.data, refresh);
  });
}
