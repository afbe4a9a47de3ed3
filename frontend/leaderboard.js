// The leaderboard: every model x dataset from its newest succeeded job (GET /api/leaderboard),
// score against peak memory, and peak memory against length on the datasets that declare a
// length axis (GET /api/leaderboard/memory, from the per-sample peaks every job stores; the
// axis, from GET /api/datasets, says what x is and whether a model's points form a line).
import { lineChart, scatterChart } from "./charts.js";
import { api, chartWidth, datasetsList, fmtBytes, fmtSeconds, h, randomModels, stopPolling } from "./dom.js";
import { randomWeightsNote } from "./datastatus.js";
import { t } from "./i18n.js";
import { fmtScore, fmtSpread, sortableTable } from "./tables.js";

/** A figure in MiB, shown in GiB from 1 GiB up, with `d` decimals. */
const fmtMiB = (v, d = 0) => (v >= 1024 ? `${(v / 1024).toFixed(Math.max(d, 1))} GiB` : `${v.toFixed(d)} MiB`);

function peakCell(r) {
  if (r.peak_bytes === null || r.peak_bytes === undefined) return "";
  // RAM: the job's own peak; the worker process's (which carries earlier jobs) on hover
  const title = r.peak_kind === "rss" && r.process_peak_bytes ? `${t("peak_rss_process")}: ${fmtBytes(r.process_peak_bytes)}` : null;
  return h("span", { class: "peak", title }, fmtBytes(r.peak_bytes), h("small", { class: "muted", text: ` ${t(r.peak_kind === "gpu" ? "gpu_short" : "rss_short")}` }));
}

export async function viewLeaderboard(main) {
  stopPolling();
  main.replaceChildren(h("h2", { text: t("nav_leaderboard") }), h("p", { class: "muted", text: "…" }));
  const [board, memory, described, random] = await Promise.all([api("GET", "/api/leaderboard"),
    api("GET", "/api/leaderboard/memory"), datasetsList(), randomModels()]);
  if (!board.ok) { main.replaceChildren(h("p", { class: "error", text: board.error.message })); return; }
  const rows = board.data.rows;
  if (!rows.length) {
    main.replaceChildren(h("h2", { text: t("nav_leaderboard") }),
      h("p", { id: "leaderboard-empty", class: "empty" }, t("leaderboard_empty"), " ",
        h("a", { href: "#/launch", text: t("nav_launch") })));
    return;
  }
  const datasets = [...new Set(rows.map((r) => r.benchmark))].sort();
  const picker = h("select", { id: "leaderboard-dataset", "aria-label": t("dataset") },
    h("option", { value: "", text: `${t("dataset")}: ${t("all")}` }), datasets.map((d) => h("option", { value: d, text: d })));
  const columns = [
    { key: "model", title: t("model"), cell: (r) => h("span", { title: r.names.join("\n"), class: "model-name" },
      r.model, randomWeightsNote(r.model, random), r.names.length > 1 ? h("small", { class: "muted", text: ` (${r.names.length} ${t("names")})` }) : null) },
    { key: "dataset", title: t("dataset"), value: (r) => r.benchmark, cell: (r) => h("span", {}, r.benchmark,
      Object.keys(r.distinct || {}).length ? h("small", { class: "distinct muted", title: t("distinct_help"),
        text: ` ${Object.entries(r.distinct).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ")}` }) : null) },
    { key: "score", title: t("score"), num: true, cell: (r) => h("span", {}, fmtScore(r.score),
      r.score_stderr !== null && r.score_stderr !== undefined
        ? h("small", { class: "spread", title: t("error_bars_help"), text: ` ${fmtSpread(r.score_stderr)}` }) : null,
      r.few_items ? h("small", { class: "few", title: t("few_items_help"), text: ` ${t("few_items")}` }) : null) },
    { key: "peak_bytes", title: t("peak_memory_col"), num: true, cell: peakCell },
    { key: "tokens_per_s", title: t("tokens_per_s"), num: true, cell: (r) => r.tokens_per_s?.toFixed(1) ?? "" },
    { key: "duration_s", title: t("duration"), num: true, cell: (r) => fmtSeconds(r.duration_s) },
    { key: "runs", title: t("runs"), num: true, cell: (r) => h("span", {}, String(r.runs),
      r.run_spread ? h("small", { class: "muted run-spread", title: t("runs_help"),
        text: ` (${r.runs_agree} ${t("agree")}; ${fmtScore(r.run_spread[0])}–${fmtScore(r.run_spread[1])})` }) : null) },
    { key: "job_id", title: t("job"), num: true, cell: (r) => h("a", { href: `#/job/${r.job_id}`, text: `#${r.job_id}` }) },
  ];
  const tableBox = sortableTable(columns, rows, { id: "leaderboard-table", sortBy: "score", desc: true,
    rowAttrs: (r) => ({ "data-model": r.model, "data-dataset": r.benchmark, "data-params": r.params_key }) });
  const scatterBox = h("div", { class: "chart-box" });
  const drawScatter = (shown) => {
    scatterBox.replaceChildren(scatterChart(shown.filter((r) => r.score !== null && r.peak_bytes).map((r) => ({
      x: r.peak_bytes / 2 ** 20, y: r.score, label: r.model, group: datasets.indexOf(r.benchmark),
      title: `${r.model} · ${r.benchmark}: ${fmtScore(r.score)} @ ${fmtBytes(r.peak_bytes)}` })),
    { xLabel: t("peak_memory_axis"), yLabel: t("score"), testid: "score-memory", xFmt: fmtMiB,
      yFmt: (v) => v.toFixed(2), groups: datasets, width: chartWidth() }));
  };
  picker.addEventListener("change", () => {
    const shown = rows.filter((r) => !picker.value || r.benchmark === picker.value);
    tableBox.update(shown);
    drawScatter(shown);
  });
  drawScatter(rows);
  const parts = [h("h2", { text: t("nav_leaderboard") }), h("p", { class: "hint", text: t("leaderboard_help") }),
    h("div", { class: "controls" }, picker), tableBox,
    h("h3", { text: t("score_vs_memory") }), h("p", { class: "hint", text: t("score_vs_memory_help") }), scatterBox];
  for (const [dataset, series] of Object.entries(memory.ok ? memory.data.datasets : {})) {
    if (!series.length) continue;
    // a grid of context lengths is a series (a line); prompts of any length are points
    const axis = described.find((d) => d.name === dataset)?.length_axis || { x: "prompt_tokens", series: false };
    parts.push(h("h3", { text: `${t("memory_vs_length")} · ${dataset}` }),
      h("div", { class: "chart-box", "data-dataset": dataset }, lineChart(series.map((s) => ({
        name: `${s.model} (${t(s.kind === "gpu" ? "gpu_short" : "rss_short")}, #${s.job_id})`,
        points: s.points.map(([x, y]) => [x, y / 2 ** 20]) })), {
        xLabel: t(axis.x), yLabel: t("peak_memory_axis"),
        testid: `memory-length-${dataset}`, yFmt: fmtMiB, xTicks: "nice",
        lines: axis.series, width: chartWidth() })));
  }
  main.replaceChildren(...parts);
}
