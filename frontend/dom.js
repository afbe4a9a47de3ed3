// Helpers every view shares: building elements, calling the API, formatting, polling.
import { t } from "./i18n.js";

let timer = null;

/** An element with attributes (`on*` are listeners, `text` is textContent) and children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// With LBS_API_TOKEN set on the server, the page asks for the token once and keeps it.
function authHeaders() {
  const token = localStorage.getItem("lbs-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function authedFetch(path, opts = {}) {
  const send = () => fetch(path, { ...opts, headers: { ...(opts.headers || {}), ...authHeaders() } });
  const sent = localStorage.getItem("lbs-token");
  let res = await send();
  if (res.status === 401) {
    // another request may have asked already: only ask if the token is still the one we sent
    if (localStorage.getItem("lbs-token") === sent) {
      const token = window.prompt(t("token_prompt"));
      if (!token) return res;
      localStorage.setItem("lbs-token", token.trim());
    }
    res = await send();
  }
  return res;
}

export async function download(path, filename) {
  const res = await authedFetch(path);
  if (!res.ok) return;
  const url = URL.createObjectURL(await res.blob());
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  URL.revokeObjectURL(url);
}

/** {ok: true, status, data} or {ok: false, status, error: {message, details}}; never throws on 4xx/5xx. */
export async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await authedFetch(path, opts);
  let json = null;
  try { json = await res.json(); } catch { json = null; }
  if (!res.ok) {
    const err = (json && json.error) || { message: res.statusText, details: [] };
    return { ok: false, status: res.status, error: err };
  }
  return { ok: true, status: res.status, data: json.data };
}

/** "45 s", "2 min 5 s", "1 h 3 min": whole seconds first, so 119.6 s is "2 min 0 s", never "1 min 60 s". */
export function fmtSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  const total = Math.max(0, Math.round(s));
  if (total < 60) return `${total} s`;
  const m = Math.floor(total / 60);
  return m < 60 ? `${m} min ${total % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** A stored UTC time ("2026-12-01T16:00:00.123") in the browser's time zone. */
export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
  return isNaN(d) ? iso : d.toLocaleString();
}

/** The width to draw a chart at: the window's, between 340 and 640 px, so that a chart
 * on a phone is drawn for the phone (whole and readable) instead of shrunk. */
export function chartWidth() { return Math.max(340, Math.min(640, window.innerWidth - 32)); }

let datasetsPromise = null;

/** Every dataset's description (GET /api/datasets), fetched once per page load. */
export function datasetsList() {
  if (!datasetsPromise) {
    datasetsPromise = api("GET", "/api/datasets").then((res) => {
      if (!res.ok) { datasetsPromise = null; return []; }
      return res.data.datasets;
    });
  }
  return datasetsPromise;
}

/** One dataset's description, or null for a dataset the server no longer has. */
export async function datasetInfo(name) {
  return (await datasetsList()).find((d) => d.name === name) || null;
}

let randomPromise = null;

/** The names of the models whose weights are random (GET /api/models: the built-in ones),
 * fetched once per page load. */
export function randomModels() {
  if (!randomPromise) {
    randomPromise = api("GET", "/api/models").then((res) => {
      if (!res.ok) { randomPromise = null; return new Set(); }
      return new Set(res.data.models.filter((m) => m.random_weights).map((m) => m.name));
    });
  }
  return randomPromise;
}

export function mb(bytes) { return bytes === undefined || bytes === null ? "" : (bytes / 2 ** 20).toFixed(1); }

export function gib(bytes) { return bytes === undefined || bytes === null ? "?" : (bytes / 2 ** 30).toFixed(1); }

/** "1.50 GiB" from one GiB up, "12.3 MiB" below; "" for no value. */
export function fmtBytes(bytes) {
  if (bytes === undefined || bytes === null) return "";
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${mb(bytes)} MiB`;
}

export function badge(state, label = t(state)) { return h("span", { class: `badge ${state}`, text: label }); }

/** Run `fn` now and every `ms` until the next view starts polling or stopPolling(). */
export function poll(fn, ms = 1500) {
  clearInterval(timer);
  fn();
  timer = setInterval(fn, ms);
}

export function stopPolling() { clearInterval(timer); }
