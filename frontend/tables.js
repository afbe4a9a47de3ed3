// A sortable table: click a header to sort by it (again to reverse). Rows stay data
// until drawn; every cell goes in as text. The table scrolls inside its own box.
import { h } from "./dom.js";
import { t } from "./i18n.js";

const collator = new Intl.Collator(undefined, { numeric: true });

function compare(a, b) {
  const na = a === null || a === undefined || a === "", nb = b === null || b === undefined || b === "";
  if (na || nb) return na - nb;  // empty cells last, whichever the direction
  return typeof a === "number" && typeof b === "number" ? a - b : collator.compare(String(a), String(b));
}

/**
 * columns: [{key, title, value(row) -> sortable value, cell(row) -> Node|string, num}]
 * options: {id, sortBy, desc, rowAttrs(row) -> attributes, empty: text when no rows,
 *           compact: a narrow table that keeps to the screen's width on a phone}
 * Returns a wrapper element; wrapper.update(rows) redraws with new rows.
 */
export function sortableTable(columns, rows, options = {}) {
  let sortKey = options.sortBy ?? null, desc = options.desc ?? false;
  const table = h("table", { id: options.id, class: options.compact ? "sortable compact" : "sortable" });
  const wrap = h("div", { class: "table-wrap" }, table);
  const valueOf = (col, row) => (col.value ? col.value(row) : row[col.key]);
  const draw = () => {
    const col = columns.find((c) => c.key === sortKey);
    const sorted = col ? [...rows].sort((a, b) => {
      const va = valueOf(col, a), vb = valueOf(col, b);
      const empty = (v) => v === null || v === undefined || v === "";
      if (empty(va) || empty(vb)) return compare(va, vb);
      return desc ? compare(vb, va) : compare(va, vb);
    }) : rows;
    const head = h("tr", {}, columns.map((c) => h("th", {
      scope: "col", "data-key": c.key, class: c.num ? "num" : null,
      "aria-sort": c.key === sortKey ? (desc ? "descending" : "ascending") : "none" },
    h("button", { type: "button", class: "sort", onclick: () => {
      desc = c.key === sortKey ? !desc : !!c.num;  // numbers sort high to low first
      sortKey = c.key;
      draw();
    } }, c.title, c.key === sortKey ? (desc ? " ▼" : " ▲") : ""))));
    const body = sorted.map((row) => h("tr", options.rowAttrs ? options.rowAttrs(row) : {},
      columns.map((c) => {
        const cell = c.cell ? c.cell(row) : valueOf(c, row);
        return h("td", { "data-col": c.key, class: c.num ? "num" : null },
          cell instanceof Node ? cell : cell === null || cell === undefined ? "" : String(cell));
      })));
    table.replaceChildren(h("thead", {}, head), h("tbody", {}, body.length ? body
      : h("tr", {}, h("td", { colspan: columns.length, class: "muted", text: options.empty || t("no_rows") }))));
  };
  wrap.update = (next) => { rows = next; draw(); };
  draw();
  return wrap;
}

/** A score 0..1 as shown in tables: 4 decimals. */
export function fmtScore(v) { return typeof v === "number" && isFinite(v) ? v.toFixed(4) : "–"; }

/** A score's error bars as text: "± 0.0123 [0.4100, 0.5200]" (standard error, 95% interval). */
export function fmtSpread(stderr, ci95) {
  if (typeof stderr !== "number") return "";
  return `± ${stderr.toFixed(4)}` + (Array.isArray(ci95) ? ` [${ci95[0].toFixed(4)}, ${ci95[1].toFixed(4)}]` : "");
}
