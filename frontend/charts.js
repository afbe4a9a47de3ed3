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

/** Nice ticks whose first is at or below `lo` and last at or above `hi`. */
export function snappedTicks(lo, hi, n = 5) {
  const inner = niceTicks(lo, hi, n);
  if (inner.length < 2) return inner;
  const step = inner[1] - inner[0], out = [];
  for (let v = Math.floor(lo / step + 1e-9) * step; v < hi + step - step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out.length > 1 ? out : inner;
}

/** The decimals that tell ticks `step` apart: 0 for steps of 1 and more, else enough. */
function decimalsFor(step) { return step >= 1 || !(step > 0) ? 0 : Math.min(3, Math.ceil(-Math.log10(step))); }

/** The width of `text` at the 11 px tick font, estimated (the chart is built before it
 * is in the page, so nothing can be measured): CJK characters are about a full em wide. */
export function textWidth(text, px = 11) {
  let w = 0;
  for (const ch of String(text)) w += /[\u2e80-\u9fff\uff00-\uffef]/.test(ch) ? px : px * 0.6;
  return w;
}

/** Legend entries laid out left to right, wrapping to a new line of 16 px when the next
 * does not fit in `width`: [{x, y}] per name, and the height they take. */
function legendLayout(names, left, width, mark = 14, gap = 16) {
  let x = left, y = 14;
  const at = names.map((name) => {
    const w = mark + textWidth(name) + gap;
    if (x > left && x + w > width) { x = left; y += 16; }
    const pos = { x, y };
    x += w;
    return pos;
  });
  return { at, height: names.length ? y + 6 : 0 };
}

const overlaps = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;

/** Where each point's label goes: beside its dot, right or left, else above or below,
 * else further up, so that no label covers another or a dot. points: [{px, py, label}];
 * box: {left, right, top, bottom} the labels stay in. Returns [{x, y, anchor}]. */
export function placeLabels(points, box) {
  const h = 12, taken = points.map((p) => ({ x: p.px - 5, y: p.py - 5, w: 10, h: 10 }));
  return points.map((p) => {
    const w = textWidth(p.label);
    const tries = [[7, -6, "start"], [-7, -6, "end"], [7, 10, "start"], [-7, 10, "end"]];
    for (let up = 1; up <= 12; up++) tries.push([7, -6 - up * h, "start"], [-7, -6 - up * h, "end"], [7, 10 + up * h, "start"]);
    for (const [dx, dy, anchor] of tries) {
      const x = p.px + dx, y = p.py + dy;
      const rect = { x: anchor === "start" ? x : x - w, y: y - h + 2, w, h };
      if (rect.x < box.left || rect.x + rect.w > box.right || rect.y < box.top || rect.y + rect.h > box.bottom) continue;
      if (taken.some((r) => overlaps(r, rect))) continue;
      taken.push(rect);
      return { x, y, anchor };
    }
    return null;  // no free place: the dot's title still names it
  });
}

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
  const left = 84, right = 20, bottom = 40;
  const legend = legendLayout(series.map((s) => s.name), left, width - right);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height + legend.height}`, width: "100%", role: "img",
                            class: "linechart", "data-testid": testid });
  if (!all.length) return root;
  const top = 10 + legend.height;
  height += legend.height;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  // the axis runs from tick to tick, so its top and bottom are labelled
  const yTicks = snappedTicks(...yRange(ys), 4), y0 = yTicks[0], y1 = yTicks[yTicks.length - 1];
  const sx = (x) => left + ((x - x0) / (x1 - x0 || 1)) * (width - left - right) + (x1 === x0 ? (width - left - right) / 2 : 0);
  const sy = (y) => height - bottom - ((y - y0) / (y1 - y0 || 1)) * (height - top - bottom);
  const distinct = [...new Set(xs)].sort((a, b) => a - b);
  axes(root, { width, height, left, right, top, bottom, sx, sy, xFmt, yFmt, xLabel, yLabel,
               xTicks: xTicks === "data" && distinct.length <= 12 ? distinct : niceTicks(x0, x1, 6),
               yTicks });
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
    const { x: lx, y: ly } = legend.at[i];
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
  const left = 84, right = 30, bottom = 40;
  const legend = legendLayout(groups, left, width - right);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height + legend.height}`, width: "100%", role: "img",
                            class: "linechart scatter", "data-testid": testid });
  points = points.filter((p) => isFinite(p.x) && isFinite(p.y));
  if (!points.length) return root;
  height += legend.height;
  const top = 14 + legend.height;
  groups.forEach((name, i) => {
    const { x: lx, y: ly } = legend.at[i];
    root.append(svg("circle", { cx: lx + 5, cy: ly - 4, r: 5, fill: COLOURS[i % COLOURS.length] }),
                svg("text", { x: lx + 14, y: ly, class: "tick legend-label" }, name));
  });
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const xTicks = snappedTicks(0, Math.max(...xs) * 1.05 || 1, 5), yTicks = niceTicks(0, Math.max(1, Math.max(...ys)), 4);
  const xMax = xTicks[xTicks.length - 1], yMax = yTicks[yTicks.length - 1];
  const sx = (x) => left + (x / xMax) * (width - left - right);
  const sy = (y) => height - bottom - (y / yMax) * (height - top - bottom);
  axes(root, { width, height, left, right, top, bottom, sx, sy, xFmt, yFmt, xLabel, yLabel, xTicks, yTicks });
  // dots first, then one label per dot where it covers no other label or dot
  const placed = placeLabels(points.map((p) => ({ px: sx(p.x), py: sy(p.y), label: p.label })),
    { left: left + 2, right: width - 2, top: top - 12, bottom: height - bottom - 2 });
  points.forEach((p, i) => {
    const colour = COLOURS[(p.group ?? i) % COLOURS.length];
    const dot = svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 5, fill: colour, class: "dot",
                                "fill-opacity": 0.85 });
    dot.append(svg("title", {}, p.title || p.label));
    root.append(dot);
  });
  points.forEach((p, i) => {
    if (!placed[i]) return;
    if (Math.abs(placed[i].y - sy(p.y)) > 12) {  // moved away from its dot: a line back to it
      root.append(svg("line", { x1: sx(p.x), y1: sy(p.y), x2: placed[i].x, y2: placed[i].y - 4, class: "leader" }));
    }
    root.append(svg("text", { x: placed[i].x, y: placed[i].y, class: "tick point-label",
                              "text-anchor": placed[i].anchor }, p.label));
  });
  return root;
}
