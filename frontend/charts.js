// Hand-drawn SVG charts: a score heatmap, a line chart and a scatter chart. All text goes in as text.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Viridis (perceptually uniform, readable with every common colour-vision deficiency):
// score 0 -> dark purple, 0.5 -> teal, 1 -> yellow.
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

export function scoreColour(score) {
  const s = Math.max(0, Math.min(1, Number(score) || 0)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(s)), f = s - i;
  const [r, g, b] = VIRIDIS[i].map((c, k) => Math.round(c + (VIRIDIS[i + 1][k] - c) * f));
  return `rgb(${r}, ${g}, ${b})`;
}

/** Text colour that stays readable on scoreColour(score). */
export function inkFor(score) { return score < 0.6 ? "#fff" : "#111"; }

/** A difference in [-1, 1]: blue where A is better, orange where B is, white at 0
 * (two hues told apart with every common colour-vision deficiency). */
export function differenceColour(d) {
  const v = Math.max(-1, Math.min(1, Number(d) || 0));
  const [r, g, b] = v >= 0 ? [0, 114, 178] : [213, 94, 0];
  const mix = (c) => Math.round(255 + (c - 255) * Math.abs(v));
  return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
}

const SCORE_SCALE = { colour: scoreColour, ink: inkFor, stops: [1, 0.75, 0.5, 0.25, 0], top: "1.0", bottom: "0.0" };
export const DIFFERENCE_SCALE = { colour: differenceColour, ink: (d) => (Math.abs(d) > 0.6 ? "#fff" : "#111"),
  stops: [1, 0.5, 0, -0.5, -1], top: "+1 (A)", bottom: "−1 (B)" };

/** cells: [{context_length, depth_percent, score, tooltip}] -> SVG heatmap with legend;
 * `scale` DIFFERENCE_SCALE draws differences in [-1, 1] instead of scores. */
export function heatmap(cells, { xLabel, yLabel, width = 640, scale = SCORE_SCALE } = {}) {
  const lengths = [...new Set(cells.map((c) => c.context_length))].sort((a, b) => a - b);
  const depths = [...new Set(cells.map((c) => c.depth_percent))].sort((a, b) => a - b);
  const left = 60, top = 10, cellW = Math.max(24, (width - left - 70) / lengths.length);
  const cellH = Math.max(18, Math.min(40, 300 / depths.length));
  const w = left + cellW * lengths.length + 70, h = top + cellH * depths.length + 50;
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: "100%", role: "img",
                            class: "heatmap", "data-testid": "heatmap" });
  for (const c of cells) {
    const x = left + lengths.indexOf(c.context_length) * cellW;
    const y = top + depths.indexOf(c.depth_percent) * cellH;
    const rect = svg("rect", { x, y, width: cellW - 1, height: cellH - 1,
                               fill: scale.colour(c.score), class: "cell", tabindex: 0,
                               "data-score": c.score });
    rect.append(svg("title", {}, c.tooltip));
    root.append(rect);
    if (cellW >= 26 && cellH >= 14) {  // the score in the cell, not only its colour
      root.append(svg("text", { x: x + cellW / 2, y: y + cellH / 2 + 4, "text-anchor": "middle",
        class: "cell-label", fill: scale.ink(c.score), "pointer-events": "none" },
      c.score.toFixed(cellW >= 34 ? 2 : 1)));
    }
  }
  lengths.forEach((n, i) => root.append(svg("text", { x: left + i * cellW + cellW / 2,
    y: top + cellH * depths.length + 14, "text-anchor": "middle", class: "tick" }, String(n))));
  depths.forEach((d, i) => root.append(svg("text", { x: left - 6, y: top + i * cellH + cellH / 2 + 4,
    "text-anchor": "end", class: "tick" }, String(d))));
  root.append(svg("text", { x: left + (cellW * lengths.length) / 2, y: h - 8,
    "text-anchor": "middle", class: "axis" }, xLabel || ""));
  root.append(svg("text", { x: 12, y: top + (cellH * depths.length) / 2, class: "axis",
    transform: `rotate(-90 12 ${top + (cellH * depths.length) / 2})`, "text-anchor": "middle" },
    yLabel || ""));
  // legend: a vertical gradient from 1 (top) to 0 (bottom)
  const lx = left + cellW * lengths.length + 20, lh = cellH * depths.length;
  const gradId = scale === SCORE_SCALE ? "lbs-legend" : "lbs-legend-difference";
  const grad = svg("linearGradient", { id: gradId, x1: 0, y1: 0, x2: 0, y2: 1 });
  scale.stops.forEach((s, i) =>
    grad.append(svg("stop", { offset: `${i * 25}%`, "stop-color": scale.colour(s) })));
  const defs = svg("defs");
  defs.append(grad);
  root.append(defs, svg("rect", { x: lx, y: top, width: 14, height: lh, fill: `url(#${gradId})`,
                                  class: "legend" }),
              svg("text", { x: lx + 18, y: top + 10, class: "tick" }, scale.top),
              svg("text", { x: lx + 18, y: top + lh, class: "tick" }, scale.bottom));
  return root;
}

const COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"];
// (Okabe-Ito: told apart with every common colour-vision deficiency)

/** Round tick values spanning [lo, hi]: about `n` of them at 1/2/5 x 10^k steps. */
export function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

/** The decimals that tell ticks `step` apart: 0 for steps of 1 and more, else enough. */
function decimalsFor(step) { return step >= 1 || !(step > 0) ? 0 : Math.min(3, Math.ceil(-Math.log10(step))); }

function axes(root, { width, height, left, right, top, bottom, xTicks, yTicks, sx, sy, xFmt, yFmt, xLabel, yLabel }) {
  const yStep = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 0, xStep = xTicks.length > 1 ? xTicks[1] - xTicks[0] : 0;
  root.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axisline" }),
              svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axisline" }));
  for (const v of yTicks) {
    root.append(svg("line", { x1: left, y1: sy(v), x2: width - right, y2: sy(v), class: "gridline" }),
                svg("text", { x: left - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick" }, yFmt(v, decimalsFor(yStep))));
  }
  for (const v of xTicks) {
    root.append(svg("text", { x: sx(v), y: height - bottom + 14, "text-anchor": "middle", class: "tick" }, xFmt(v, decimalsFor(xStep))));
  }
  root.append(svg("text", { x: left + (width - left - right) / 2, y: height - 6, "text-anchor": "middle", class: "axis" }, xLabel || ""),
              svg("text", { x: 12, y: top + (height - top - bottom) / 2, class: "axis", "text-anchor": "middle",
                            transform: `rotate(-90 12 ${top + (height - top - bottom) / 2})` }, yLabel || ""));
}

/** The y range of a chart: the data's own range with a margin, so growth shows;
 * from zero only when the data comes close to it. */
function yRange(ys) {
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (hi - lo < hi * 0.02) {  // a spread under 2 % is noise: do not blow it up into a slope
    const mid = (hi + lo) / 2;
    lo = mid - hi * 0.01; hi = mid + hi * 0.01 || 1;
  }
  const pad = (hi - lo) * 0.1;
  lo = lo - pad < 0 || lo < (hi - lo) * 0.5 ? Math.max(0, lo - pad) : lo - pad;
  return [lo, hi + pad];
}

/**
 * series: [{name, points: [[x, y], ...]}] -> SVG line chart with dots.
 * options: xLabel, yLabel, width, height, testid, yFmt(v, decimals), xFmt(v, decimals),
 * xTicks: "data" | "nice", lines: false draws the dots alone (points that are no series in x)
 */
export function lineChart(series, { xLabel, yLabel, width = 640, height = 260, testid = "memory-chart",
  yFmt = (v, d = 0) => v.toFixed(d), xFmt = (v) => String(v), xTicks = "data", lines = true } = {}) {
  series = series.map((s) => ({ ...s, points: s.points.filter((p) => p[1] !== null && p[1] !== undefined) }));
  const all = series.flatMap((s) => s.points);
  const legendH = 16 * Math.ceil(series.length / 3);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height + legendH}`, width: "100%", role: "img",
                            class: "linechart", "data-testid": testid });
  if (!all.length) return root;
  const left = 84, right = 20, top = 10 + legendH, bottom = 40;
  height += legendH;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const [y0, y1] = yRange(ys);
  const sx = (x) => left + ((x - x0) / (x1 - x0 || 1)) * (width - left - right) + (x1 === x0 ? (width - left - right) / 2 : 0);
  const sy = (y) => height - bottom - ((y - y0) / (y1 - y0 || 1)) * (height - top - bottom);
  const distinct = [...new Set(xs)].sort((a, b) => a - b);
  axes(root, { width, height, left, right, top, bottom, sx, sy, xFmt, yFmt, xLabel, yLabel,
               xTicks: xTicks === "data" && distinct.length <= 12 ? distinct : niceTicks(x0, x1, 6),
               yTicks: niceTicks(y0, y1, 4) });
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    if (lines) {
      root.append(svg("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
                                    fill: "none", stroke: colour, "stroke-width": 2,
                                    "stroke-dasharray": i % 2 ? "6 3" : "none" }));
    }
    for (const p of pts) {
      const dot = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: colour, class: "dot" });
      dot.append(svg("title", {}, `${s.name}: ${yFmt(p[1], 1)} @ ${xFmt(p[0])}`));
      root.append(dot);
    }
    const lx = left + (i % 3) * ((width - left - right) / 3), ly = 14 + Math.floor(i / 3) * 16;
    root.append(svg("rect", { x: lx, y: ly - 9, width: 10, height: 10, fill: colour }),
                svg("text", { x: lx + 14, y: ly, class: "tick legend-label" }, s.name));
  });
  return root;
}

/**
 * points: [{x, y, label, title, group}] -> SVG scatter chart; each dot labelled with `label`,
 * coloured by `group` (an index into `groups`, the legend's names).
 * options: xLabel, yLabel, width, height, testid, xFmt, yFmt, groups
 */
export function scatterChart(points, { xLabel, yLabel, width = 640, height = 300, testid = "scatter",
  xFmt = (v) => String(v), yFmt = (v) => String(v), groups = [] } = {}) {
  const legendH = groups.length ? 16 * Math.ceil(groups.length / 3) : 0;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height + legendH}`, width: "100%", role: "img",
                            class: "linechart scatter", "data-testid": testid });
  points = points.filter((p) => isFinite(p.x) && isFinite(p.y));
  if (!points.length) return root;
  height += legendH;
  const left = 84, right = 30, top = 14 + legendH, bottom = 40;
  groups.forEach((name, i) => {
    const lx = left + (i % 3) * ((width - left - right) / 3), ly = 14 + Math.floor(i / 3) * 16;
    root.append(svg("circle", { cx: lx + 5, cy: ly - 4, r: 5, fill: COLOURS[i % COLOURS.length] }),
                svg("text", { x: lx + 14, y: ly, class: "tick legend-label" }, name));
  });
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const xMax = Math.max(...xs) * 1.1 || 1, yMax = Math.max(1, Math.max(...ys));
  const sx = (x) => left + (x / xMax) * (width - left - right);
  const sy = (y) => height - bottom - (y / yMax) * (height - top - bottom);
  axes(root, { width, height, left, right, top, bottom, sx, sy, xFmt, yFmt, xLabel, yLabel,
               xTicks: niceTicks(0, xMax, 5), yTicks: niceTicks(0, yMax, 4) });
  points.forEach((p, i) => {
    const colour = COLOURS[(p.group ?? i) % COLOURS.length];
    const dot = svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 5, fill: colour, class: "dot",
                                "fill-opacity": 0.85 });
    dot.append(svg("title", {}, p.title || p.label));
    const nearEdge = sx(p.x) > left + (width - left - right) * 0.7;  // label on the dot's left
    root.append(dot, svg("text", { x: sx(p.x) + (nearEdge ? -7 : 7), y: sy(p.y) - 6, class: "tick point-label",
                                   "text-anchor": nearEdge ? "end" : "start" }, p.label));
  });
  return root;
}
