// Whether a dataset's data is ready, shown next to it on the Launch form before the user
// launches (GET /api/datasets -> data), with a Fetch button when the server allows data
// downloads (POST /api/datasets/<name>/fetch); the "fetching data" phase of a job with
// its bytes and its "downloading model" phase; and the note that the built-in models have random weights.
// Kept apart from app.js, which hooks these in with a line each.
import { api, fmtBytes, h } from "./dom.js";
import { lang } from "./i18n.js";

const TEXT = {
  en: {
    ready: "data ready", items: "items", per_job: "in a job with the defaults", by_split: "by split", missing: "data missing", fetch: "Fetch",
    fetching: "fetching data", downloading: "downloading the model from the hub", failed: "fetch failed", run: "get it with", copy: "or copy the files into",
    hub: "hub", bundled: "bundled data", folder: "folder", "hub cache": "Hugging Face cache",
    counting: "counting items…", per_task: "data per task: see each task below",
    random: "random weights: a smoke test of the harness, scores near 0 are expected",
  },
  zh: {
    ready: "数据已就绪", items: "条", per_job: "（默认参数的一次评测）", by_split: "各划分", missing: "缺少数据", fetch: "获取",
    fetching: "正在获取数据", downloading: "正在从 Hub 下载模型", failed: "获取失败", run: "获取命令", copy: "或把文件复制到",
    hub: "Hub", bundled: "内置数据", folder: "文件夹", "hub cache": "Hugging Face 缓存",
    counting: "正在统计条数…", per_task: "数据按任务检查：见下方各任务",
    random: "随机权重：仅用于检验评测流程，得分接近 0 属正常",
  },
};
const tr = (key) => (TEXT[lang] || TEXT.en)[key] ?? TEXT.en[key] ?? key;

function bytes(done, total) {
  return total ? `${fmtBytes(done)} / ${fmtBytes(total)}` : fmtBytes(done || 0);
}

function content(name, data, refresh) {
  const fetch = data.fetch;
  if (fetch && fetch.state === "running") {
    return [h("progress", { max: fetch.bytes_total || 1, value: fetch.bytes_done || 0 }),
      ` ${tr("fetching")} ${bytes(fetch.bytes_done, fetch.bytes_total)}`];
  }
  const out = [];
  if (fetch && fetch.state === "failed") out.push(h("span", { class: "error", text: `${tr("failed")}: ${fetch.error || ""} ` }));
  if (data.state === "per_task") return [`ⓘ ${tr("per_task")}`];
  if (data.state === "ready") {
    const items = data.items === null || data.items === undefined
      ? (data.parts?.length ? tr("counting") : "") : `${data.items} ${tr("items")}`;
    out.push(`✓ ${tr("ready")}`, data.source ? ` (${tr(data.source)})` : "", items ? ` · ${items}` : "");
    const splits = Object.entries(data.items_by_split || {});
    if (items && splits.length > 1) {  // say which split a job runs, and what the others hold
      out.push(h("small", { class: "data-splits", text: ` ${tr("per_job")}; ${tr("by_split")}: ${
        splits.map(([split, n]) => `${split} ${n}`).join(", ")}` }));
    }
    if (data.where) out.push(h("small", { class: "data-where", text: ` ${data.where}` }));
    return out;
  }
  const how = data.how || {};
  out.push(`✗ ${tr("missing")}`);
  if (how.downloads_allowed) {
    out.push(" ", h("button", { type: "button", class: "data-fetch", "data-dataset": name, text: tr("fetch"),
      onclick: async () => { await api("POST", `/api/datasets/${name}/fetch`, {}); refresh(); } }));
  }
  if (how.fetch_command) {
    out.push(h("small", {}, ` ${tr("run")} `, h("code", { text: how.fetch_command }),
      how.hub ? ` (${tr("hub")}: ${how.hub.repo_id})` : ""));
  }
  if (how.copy_to) out.push(h("small", {}, ` ${tr("copy")} `, h("code", { text: how.copy_to })));
  return out;
}

/** The data status of one dataset (an entry of GET /api/datasets) as an element that
 *  refreshes itself while a fetch runs or items are being counted. */
export function dataStatus(ds) {
  const el = h("span", { class: "data-status", id: `data-${ds.name}` });
  let timer = null;
  const show = (data) => {
    const fetching = data.fetch?.state === "running";
    el.dataset.state = fetching ? "fetching" : data.state;
    el.replaceChildren(...content(ds.name, data, refresh));
    const counting = data.state === "ready" && data.items === null && data.parts?.length;
    clearTimeout(timer);
    if (fetching || counting) timer = setTimeout(refresh, 1000);
  };
  async function refresh() {
    let res;
    try { res = await api("GET", "/api/datasets"); } catch { return; }  // server gone: stop
    const fresh = res.ok && res.data.datasets.find((d) => d.name === ds.name);
    if (fresh?.data && document.body.contains(el)) show(fresh.data);
  }
  if (ds.data) show(ds.data);
  return el;
}

/** Text for a job's progress cell while its worker fetches the data or downloads the
 * model, else "". */
export function fetchProgress(job) {
  if (job.phase === "downloading model") return ` ${tr("downloading")}`;
  if (job.phase !== "fetching data" || !job.data_fetch) return "";
  return ` ${tr("fetching")} ${bytes(job.data_fetch.bytes_done, job.data_fetch.bytes_total)}`;
}

/** A note next to the name or scores of a model whose weights are random (GET /api/models
 * says which: the built-in ones); `random` is the set of their names (randomModels()). */
export function randomWeightsNote(model, random) {
  if (!random.has(model)) return null;
  return h("small", { class: "builtin-note", text: ` (${tr("random")})` });
}
