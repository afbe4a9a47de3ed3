// The comparison of a job run once per inference method (params.methods): one row per
// method from `scores.methods`, figures relative to the first method, and `scores.agreement`.
import { h } from "./dom.js";
import { t } from "./i18n.js";

// [field, label key, decimals, higher is better (null: no relative figure)]
const COLUMNS = [
  ["score", "score", 4, null],
  ["prefill_tokens_per_s", "prefill_tps", 1, true],
  ["decode_tokens_per_s", "decode_tps", 1, true],
  ["latency_s_mean", "latency_mean", 3, false],
  ["peak_rss_mb", "peak_ram_mb", 1, false],
  ["peak_gpu_mb", "peak_gpu_mb", 1, false],
];

const isNum = (v) => typeof v === "number" && isFinite(v);

function ratioOf(value, base) { return isNum(value) && isNum(base) && base > 0 ? value / base : null; }

function relative(ratio, higherIsBetter) {
  if (ratio === null) return null;
  const better = Math.abs(ratio - 1) < 0.005 ? "" : (ratio > 1) === higherIsBetter ? "better" : "worse";
  return h("small", { class: `rel ${better}`, text: ` ${ratio.toFixed(ratio < 10 ? 2 : 1)}×` });
}

/** Share of 0..1 as a percentage: "100%", "87.5%". */
export function percent(share) { return `${Math.round(share * 1000) / 10}%`; }

/** The elements to add to the job view; none unless the job compared methods. */
export function methodComparison(scores) {
  const rows = scores.methods || [];
  if (!rows.length) return [];
  const base = rows[0];
  const head = h("tr", {}, h("th", { text: t("method") }), COLUMNS.map(([, key]) => h("th", { text: t(key) })));
  const body = rows.map((row, i) => h("tr", { "data-method": row.method },
    h("th", { scope: "row", text: row.method }),
    COLUMNS.map(([field, , digits, higher]) => h("td", { "data-col": field },
      isNum(row[field]) ? row[field].toFixed(digits) : "—",
      i > 0 && higher !== null ? relative(ratioOf(row[field], base[field]), higher) : null))));
  const parts = [h("h3", { text: t("method_comparison") }),
    h("table", { id: "methods-table" }, h("thead", {}, head), h("tbody", {}, body)),
    h("p", { class: "hint", text: t("relative_to").replace("{method}", base.method) })];
  if (isNum(scores.agreement)) {
    parts.push(h("p", { id: "agreement" }, `${t("agreement")}: `, h("strong", { text: percent(scores.agreement) }),
      h("small", { class: "muted", text: ` — ${t("agreement_help")}` })));
  }
  return parts;
}
