// Hand-drawn SVG charts: a score heatmap and a line chart. All text goes in as text.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Score 0 -> red, 0.5 -> yellow, 1 -> green.
export function scoreColour(score) {
  const s = Math.max(0, Math.min(1, score));
  const hue = Math.round(s * 120);
  return `hsl(${hue}, 70%, 50%)`;
}

/** cells: [{context_length, depth_percent, score, tooltip}] -> SVG heatmap with legend. */
export function heatmap(cells, { xLabel, yLabel, width = 640 } = {}) {
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
                               fill: scoreColour(c.score), class: "cell", tabindex: 0,
                               "data-score": c.score });
    rect.append(svg("title", {}, c.tooltip));
    root.append(rect);
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
  const grad = svg("linearGradient", { id: "lbs-legend", x1: 0, y1: 0, x2: 0, y2: 1 });
  [[0, 1], [50, 0.5], [100, 0]].forEach(([o, s]) =>
    grad.append(svg("stop", { offset: `${o}%`, "stop-color": scoreColour(s) })));
  const defs = svg("defs");
  defs.append(grad);
  root.append(defs, svg("rect", { x: lx, y: top, width: 14, height: lh, fill: "url(#lbs-legend)",
                                  class: "legend" }),
              svg("text", { x: lx + 18, y: top + 10, class: "tick" }, "1.0"),
              svg("text", { x: lx + 18, y: top + lh, class: "tick" }, "0.0"));
  return root;
}

/** series: [{name, points: [[x, y], ...]}] -> SVG line chart with dots. */
export function lineChart(series, { xLabel, yLabel, width = 640, height = 260 } = {}) {
  series = series.map((s) => ({ ...s, points: s.points.filter((p) => p[1] !== null && p[1] !== undefined) }));
  const all = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
                            class: "linechart", "data-testid": "memory-chart" });
  if (!all.length) return root;
  const left = 60, right = 20, top = 10, bottom = 40;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1;
  const y0 = 0, y1 = Math.max(...ys) * 1.1 || 1;
  const sx = (x) => left + ((x - x0) / (x1 - x0 || 1)) * (width - left - right);
  const sy = (y) => height - bottom - ((y - y0) / (y1 - y0)) * (height - top - bottom);
  root.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom,
                            class: "axisline" }),
              svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axisline" }));
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    root.append(svg("text", { x: left - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick" },
                    v.toFixed(0)));
  }
  for (const v of [...new Set(xs)].sort((a, b) => a - b)) {
    root.append(svg("text", { x: sx(v), y: height - bottom + 14, "text-anchor": "middle",
                              class: "tick" }, String(v)));
  }
  const colours = ["#2563eb", "#db2777", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];
  series.forEach((s, i) => {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    root.append(svg("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
                                  fill: "none", stroke: colours[i % colours.length], "stroke-width": 2 }));
    for (const p of pts) {
      const dot = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: colours[i % colours.length],
                                  class: "dot" });
      dot.append(svg("title", {}, `${s.name}: ${p[1].toFixed(1)} @ ${p[0]}`));
      root.append(dot);
    }
    root.append(svg("text", { x: width - right - 4, y: top + 14 + i * 14, "text-anchor": "end",
                              fill: colours[i % colours.length], class: "tick" }, s.name));
  });
  root.append(svg("text", { x: left + (width - left - right) / 2, y: height - 6,
                            "text-anchor": "middle", class: "axis" }, xLabel || ""),
              svg("text", { x: 12, y: height / 2, class: "axis", "text-anchor": "middle",
                            transform: `rotate(-90 12 ${height / 2})` }, yLabel || ""));
  return root;
}
