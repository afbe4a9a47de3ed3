// The launch form, built from each dataset's parameter schema (GET /api/datasets): labels
// from the schema titles, help from the descriptions, lists as comma-separated entries,
// ranges as min/max/count number fields - nobody types JSON. Before launch it shows the
// job's memory estimate against the live workers' free memory and a rough duration
// (POST /api/jobs/estimate); the API's errors appear next to their field.
import { api, datasetsList, fmtBytes, fmtSeconds, h } from "./dom.js";
import { dataStatus } from "./datastatus.js";
import { t, tr } from "./i18n.js";

function resolveRef(schema, defs) { return schema?.$ref ? defs[schema.$ref.split("/").pop()] : schema; }

// An optional field (anyOf [X, null]) takes the shape of X; a list-or-range field
// (anyOf [array, object]) becomes {kind: "listOrRange"}.
function shapeOf(schema, defs) {
  const s = resolveRef(schema, defs);
  const branches = (s.anyOf || []).filter((a) => a.type !== "null").map((a) => ({ ...resolveRef(a, defs), ref: a.$ref }));
  const list = branches.find((b) => b.type === "array"), range = branches.find((b) => b.type === "object" && b.properties);
  if (list && range) return { kind: "listOrRange", list, range, default: s.default, title: s.title, description: s.description };
  if (branches.length === 1) return { ...branches[0], default: s.default, nullable: true, title: s.title, description: s.description };
  return s;
}

const listText = (v) => (Array.isArray(v) ? v.join(", ") : "");

function listInput(id, name, items, value) {
  const numeric = items?.type === "integer" || items?.type === "number";
  const input = h("input", { id, type: "text", name, value: listText(value), "data-kind": "list",
    "data-items": numeric ? "number" : "string", inputmode: numeric ? "decimal" : null,
    placeholder: numeric ? t("list_numbers_hint") : t("list_text_hint"), autocomplete: "off" });
  if (!Array.isArray(items?.examples) || !items.examples.length) return input;
  // Known names (e.g. lm-eval's thousands of tasks): a search box whose pick joins the list.
  const known = new Set(items.examples), listId = `${id}-known`;
  const search = h("input", { type: "search", list: listId, class: "list-search", autocomplete: "off",
    placeholder: t("search_add_hint"), "aria-label": t("search_add_hint"), onchange: () => {
      const picked = search.value.trim();
      if (!known.has(picked)) return;
      const parts = readList(input);
      if (!parts.includes(picked)) input.value = [...parts, picked].join(", ");
      search.value = "";
    } });
  const box = h("span", { class: "list-with-search" }, input, search,
    h("datalist", { id: listId }, items.examples.map((v) => h("option", { value: v }))));
  box.labelTarget = input;
  return box;
}

// A list of names searched on the server (lm-eval's ~15k tasks: GET /api/lm_eval/tasks):
// suggestions as the user types, and under the box whether each chosen name's data is
// here (or how to get it), so a job whose data is missing is seen before it is sent.
function searchedList(id, name, url, value) {
  const input = listInput(id, name, { type: "string" }, value);
  const listId = `${id}-known`, options = h("datalist", { id: listId });
  const state = h("div", { class: "task-data", "aria-live": "polite" });
  let known = new Set(), typing = null, checking = null;
  const query = async (params) => {
    const res = await api("GET", `${url}?${new URLSearchParams(params)}`);
    return res.ok ? res.data : null;
  };
  const suggest = async () => {
    const data = await query({ q: search.value.trim(), limit: 20 });
    if (!data) return;
    if (data.status === "indexing") {
      state.replaceChildren(h("span", { class: "hint", text: t("tasks_indexing") }));
      setTimeout(suggest, 2000);
      return;
    }
    known = new Set(data.tasks.map((x) => x.name));
    options.replaceChildren(...data.tasks.map((x) => h("option", { value: x.name,
      label: `${x.kind}${x.data?.state === "missing" ? ` · ${t("data_missing_short")}` : ""}` })));
  };
  const check = async () => {
    const names = readList(input);
    if (!names.length) { state.replaceChildren(); return; }
    const data = await query({ names: names.join(","), limit: 500 });
    if (!data) return;
    if (data.status === "indexing") { setTimeout(check, 2000); return; }
    const found = new Map(data.tasks.map((x) => [x.name, x]));
    state.replaceChildren(...names.map((n) => {
      const row = found.get(n);
      if (!row) return h("div", { class: "task-state unknown", "data-task": n, text: `? ${n}: ${t("task_unknown")}` });
      const d = row.data || {};
      const runs = row.runs ? ` · ${row.runs.count} ${t("tasks_word")}` : "";
      if (d.state !== "missing") {
        const where = d.source === "hub" ? `${d.hub}${d.config ? ` (${d.config})` : ""}` : d.source || "";
        return h("div", { class: "task-state ready", "data-task": n, text: `✓ ${n}${runs} ${where}` });
      }
      return h("div", { class: "task-state missing", "data-task": n },
        `✗ ${n}${runs}: ${t("data_missing_short")}`,
        d.hub ? ` (${d.hub}${d.config ? `, ${d.config}` : ""})` : "",
        d.how?.fetch_command ? h("small", {}, ` ${t("get_it_with")} `, h("code", { text: d.how.fetch_command })) : "");
    }));
  };
  const search = h("input", { type: "search", list: listId, class: "list-search", autocomplete: "off",
    placeholder: t("search_add_hint"), "aria-label": t("search_add_hint"),
    oninput: () => { clearTimeout(typing); typing = setTimeout(suggest, 250); },
    onchange: () => {
      const picked = search.value.trim();
      if (!known.has(picked)) return;
      const parts = readList(input);
      if (!parts.includes(picked)) input.value = [...parts, picked].join(", ");
      search.value = "";
      check();
    } });
  input.addEventListener("input", () => { clearTimeout(checking); checking = setTimeout(check, 400); });
  const box = h("span", { class: "list-with-search" }, input, search, options, state);
  box.labelTarget = input;
  suggest();
  check();
  return box;
}

function listOrRange(name, s) {
  const isRange = s.default && !Array.isArray(s.default) && typeof s.default === "object";
  const mode = (m) => h("label", { class: "choice" }, h("input", { type: "radio", name: `${name}-mode`, value: m,
    checked: (m === "range") === !!isRange, onchange: () => {
      box.querySelector(".range-inputs").hidden = m !== "range";
      box.querySelector(".list-input").hidden = m === "range";
    } }), ` ${t(m === "range" ? "mode_range" : "mode_list")}`);
  const rangeInputs = Object.entries(s.range.properties).map(([key, prop]) => h("label", { class: "sub" },
    h("span", { text: tr(prop.title || key) }),
    h("input", { type: "number", name: `${name}.${key}`, step: prop.type === "integer" ? 1 : "any",
      min: prop.minimum, max: prop.maximum, value: (isRange ? s.default[key] : undefined) ?? prop.default ?? "" })));
  const box = h("span", { class: "list-or-range", id: `param-${name}`, "data-kind": "listOrRange", "data-name": name,
                          role: "group", "aria-labelledby": `label-${name}` },
    h("span", { class: "modes" }, mode("range"), mode("list")),
    h("span", { class: "range-inputs", hidden: !isRange }, rangeInputs),
    h("span", { class: "list-input", hidden: !!isRange }, listInput(`param-${name}-list`, name, s.list.items,
      Array.isArray(s.default) ? s.default : [])));
  return box;
}

function inputFor(name, schema, defs) {
  const s = shapeOf(schema, defs);
  const value = s.default;
  const id = `param-${name}`;
  if (s.kind === "listOrRange") return listOrRange(name, s);
  if (s.type === "array" && s.items?.enum) {  // a set of choices, e.g. the inference methods
    return h("span", { id, class: "choices", role: "group", "aria-labelledby": `label-${name}`,
                       "data-kind": "multi", "data-name": name },
      s.items.enum.map((v) => h("label", { class: "choice" },
        h("input", { type: "checkbox", value: v, checked: (value || []).includes(v) }), ` ${v}`)));
  }
  if (s.type === "array" && s["x-search"]) return searchedList(id, name, s["x-search"], value);
  if (s.type === "array") return listInput(id, name, s.items, value);
  if (s.enum) {
    return h("select", { id, name, "data-kind": "string" },
      s.nullable ? h("option", { value: "", text: t("default_choice") }) : null,
      s.enum.map((v) => h("option", { value: v, text: v, selected: v === value })));
  }
  if (s.type === "integer" || s.type === "number") {
    return h("input", { id, type: "number", name, step: s.type === "integer" ? 1 : "any", min: s.minimum,
                        max: s.maximum, value: value ?? "", placeholder: value === null ? t("default_choice") : null,
                        "data-kind": "number" });
  }
  if (s.type === "boolean") {
    return h("input", { id, type: "checkbox", name, checked: value === true, "data-kind": "bool" });
  }
  // A number or a word (batch_size: 8 or "auto"): a typed number goes as a number.
  const numberOrWord = (s.anyOf || []).some((a) => a.type === "integer" || a.type === "number");
  return h("input", { id, type: "text", name, value: value ?? "", "data-kind": numberOrWord ? "numberOrWord" : "string",
                      placeholder: value === null ? t("default_choice") : null });
}

function paramsForm(ds) {
  const schema = ds.params_schema, defs = schema.$defs || {};
  const rows = Object.entries(schema.properties || {}).map(([name, prop]) => {
    const control = inputFor(name, prop, defs);
    const title = tr(prop.title || name);
    const grouped = ["multi", "listOrRange"].includes(control.dataset.kind);
    const label = grouped ? h("span", { class: "label", id: `label-${name}`, text: title })
      : h("label", { for: (control.labelTarget || control).id, text: title });
    return h("div", { class: "field", "data-field": `params.${name}`, "data-title": title,
                      "data-required": (schema.required || []).includes(name) ? "1" : null }, label, control,
      prop.description ? h("small", { text: tr(prop.description) }) : null,
      h("div", { class: "field-error", role: "alert" }));
  });
  return h("fieldset", { class: "params", "data-dataset": ds.name },
    h("legend", { text: `${ds.name} · ${t("params")}` }),
    h("p", { class: "hint", text: `${tr(ds.description)} ${ds.cache_mode === "uncached" ? t("uncached_note") : ""}` }), rows);
}

function readList(input) {
  const parts = input.value.split(/[,，\s]+/).map((x) => x.trim()).filter(Boolean);
  return input.dataset.items === "number" ? parts.map((x) => (isFinite(Number(x)) ? Number(x) : x)) : parts;
}

function readParams(fieldset) {
  const params = {};
  for (const input of fieldset.querySelectorAll("[data-kind]")) {
    const kind = input.dataset.kind;
    if (input.closest(".list-or-range") && input.closest(".list-or-range") !== input) continue;  // read with its group
    if (kind === "bool") { params[input.name] = input.checked; continue; }
    if (kind === "multi") {  // nothing ticked: left out, the dataset's default applies
      const picked = [...input.querySelectorAll("input:checked")].map((c) => c.value);
      if (picked.length) params[input.dataset.name] = picked;
      continue;
    }
    if (kind === "listOrRange") {
      const name = input.dataset.name;
      if (input.querySelector(`input[name="${name}-mode"]:checked`)?.value === "range") {
        const range = {};
        for (const n of input.querySelectorAll(".range-inputs input")) {
          if (n.value.trim() !== "") range[n.name.split(".").pop()] = Number(n.value);
        }
        params[name] = range;
      } else {
        const list = readList(input.querySelector(".list-input input"));
        if (list.length) params[name] = list;
      }
      continue;
    }
    if (kind === "list") {
      const list = readList(input);
      if (list.length) params[input.name] = list;
      continue;
    }
    const raw = input.value.trim();
    if (raw === "") continue;
    const numeric = kind === "number" || (kind === "numberOrWord" && isFinite(Number(raw)));
    params[input.name] = numeric ? Number(raw) : raw;
  }
  return params;
}

// Scheduling options, the same for every job of one submission; an empty one is left
// out of the request so the server's default applies. The API checks the values.
const JOB_OPTIONS = [
  ["priority", { type: "number", step: 1, min: -1000, max: 1000, placeholder: "0" }, Number],
  ["submitter", { type: "text", maxlength: 128, placeholder: "anonymous" }, String],
  ["worker_label", { type: "text", maxlength: 255 }, String],
  ["num_gpus", { type: "number", step: 1, min: 1, max: 64, placeholder: "1" }, Number],
  // a number of workers or the word auto: a typed number goes as a number
  ["data_parallel", { type: "text", maxlength: 8, placeholder: "1", autocomplete: "off" },
    (raw) => (/^\d+$/.test(raw) ? Number(raw) : raw)],
];

function optionsForm() {
  return h("details", { id: "job-options-box", class: "folded" },
    h("summary", { text: t("scheduling") }),
    h("fieldset", { id: "job-options" }, h("legend", { class: "visually-hidden", text: t("scheduling") }),
      JOB_OPTIONS.map(([name, attrs]) => h("div", { class: "field", "data-field": name },
        h("label", { for: `opt-${name}`, text: t(name) }),
        h("input", { id: `opt-${name}`, name, ...attrs }),
        h("small", { text: t(`${name}_help`) }),
        h("div", { class: "field-error", role: "alert" })))));
}

function readOptions(box) {
  const options = {};
  for (const [name, , cast] of JOB_OPTIONS) {
    const raw = box.querySelector(`[name="${name}"]`).value.trim();
    if (raw !== "") options[name] = cast(raw);
  }
  return options;
}

function clearErrors(form) {
  form.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
  form.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
}

function markInvalid(field, message) {
  field.querySelector(".field-error").textContent = tr(message);
  field.querySelector("[data-kind], input, select")?.classList.add("invalid");
}

/** Put each error detail of a refused submission next to its field; the rest in `status`. */
function showErrors(error, sets, options, modelInput, status) {
  const unplaced = [];
  for (const d of error.details || []) {
    const m = /^jobs\[(\d+)\]\.(.*)$/.exec(d.field || "");
    if (!m) { unplaced.push(d); continue; }
    const fs = sets[Number(m[1])];
    const path = m[2].split(/[.[]/)[0] === "params" ? `params.${m[2].split(/[.[]/)[1]}` : m[2];
    const field = fs?.querySelector(`[data-field="${path}"]`) || options.querySelector(`[data-field="${path}"]`);
    if (field) {
      markInvalid(field, d.message);
      if (field.closest("details")) field.closest("details").open = true;
    } else if (m[2] === "model") {
      modelInput.classList.add("invalid");
      document.getElementById("model-error").textContent = d.message;
    } else unplaced.push(d);
  }
  // the whole message names every field; the ones placed are also at their field
  status.textContent = unplaced.length || !(error.details || []).length ? tr(error.message)
    : `${t("fix_fields")} (${tr(error.message)})`;
}

function estimateView(data) {
  const workers = data.workers || [];
  const free = workers.map((w) => (w.gpu_free_bytes === null ? `${w.id}: ${t("cpu_worker")}`
    : `${w.id}: ${fmtBytes(w.gpu_free_bytes)} ${t("free")}`));
  return h("div", { class: "estimate-body" },
    data.jobs.map((j) => {
      const fits = workers.some((w) => w.gpu_free_bytes === null || !j.memory_bytes || w.gpu_free_bytes >= j.memory_bytes);
      const d = j.duration;
      return h("p", { "data-dataset": j.dataset },
        h("b", { text: `${j.dataset}: ` }),
        j.memory_bytes ? `${t("needs_memory")} ${fmtBytes(j.memory_bytes)}` : t("memory_unknown"),
        workers.length ? h("span", { class: fits ? "fits" : "no-fit", text: ` — ${t(fits ? "fits" : "no_fit")}` }) : null,
        h("br"),
        d.seconds !== null ? `${t("rough_duration")} ≈ ${fmtSeconds(d.seconds)} (${d.items} × ${d.seconds_per_sample} s, ${tr(d.basis)})`
          : d.items ? `${d.items} ${t("items")}; ${t("no_history")}` : t("no_history"));
    }),
    h("p", { class: "muted" }, workers.length ? `${t("live_workers")}: ${free.join(" · ")}` : t("no_live_workers_now")));
}

export async function viewLaunch(main) {
  const [models, datasets] = await Promise.all([api("GET", "/api/models"), datasetsList()]);
  const select = h("select", { id: "model-select", name: "model" },
    (models.data?.models || []).map((m) => h("option", { value: m.name, text: m.name })));
  const custom = h("input", { id: "model-path", type: "text", placeholder: t("custom_path") });
  const paramsBox = h("div", { id: "params-box" });
  const estimate = h("div", { id: "launch-estimate", class: "card", "aria-live": "polite" },
    h("b", { text: t("before_launch") }), h("div", { class: "estimate-body muted", text: t("pick_to_estimate") }));
  const boxes = datasets.map((ds) => {
    const cb = h("input", { type: "checkbox", value: ds.name, id: `ds-${ds.name}`,
      onchange: () => {
        const existing = paramsBox.querySelector(`[data-dataset="${ds.name}"]`);
        if (cb.checked && !existing) paramsBox.append(paramsForm(ds));
        if (!cb.checked && existing) existing.remove();
        scheduleEstimate();
      } });
    // .ds-status: the data status and Fetch button (frontend/datastatus.js)
    return h("div", { class: "ds", "data-dataset": ds.name },
      h("label", { for: `ds-${ds.name}` }, cb, ` ${ds.name}`),
      h("span", { class: "ds-status", "data-dataset": ds.name }, dataStatus(ds)),
      h("small", { text: `${tr(ds.description)}${ds.cost ? ` (${tr(ds.cost)})` : ""}` }));
  });
  const options = optionsForm();
  const status = h("div", { id: "launch-status", role: "status" });
  const jobsOf = () => {
    const model = custom.value.trim() || select.value;
    return [...paramsBox.querySelectorAll("fieldset.params")].map((fs) => ({
      model, dataset: fs.dataset.dataset, params: readParams(fs), ...readOptions(options) }));
  };
  let timer = null, asked = 0;
  const runEstimate = async () => {
    const jobs = jobsOf(), body = estimate.querySelector(".estimate-body");
    if (!jobs.length) { body.replaceWith(h("div", { class: "estimate-body muted", text: t("pick_to_estimate") })); return; }
    // a required field not filled in yet (e.g. lm_eval's tasks right after ticking it)
    // is a step still to take, not an error: say what to fill, mark nothing red
    const unfilled = [...paramsBox.querySelectorAll('fieldset.params .field[data-required]')]
      .filter((f) => [...f.querySelectorAll("input[name], select[name]")].every((i) => !i.value.trim()));
    if (unfilled.length) {
      ++asked;
      clearErrors(form);
      body.replaceWith(h("div", { class: "estimate-body muted",
        text: `${t("fill_to_estimate")}: ${unfilled.map((f) => f.dataset.title).join(", ")}` }));
      return;
    }
    const mine = ++asked;
    const res = await api("POST", "/api/jobs/estimate", { jobs });
    if (mine !== asked) return;  // a newer estimate is on its way
    clearErrors(form);
    if (res.ok) {
      status.textContent = "";
      estimate.querySelector(".estimate-body").replaceWith(estimateView(res.data));
    } else {
      estimate.querySelector(".estimate-body").replaceWith(h("div", { class: "estimate-body muted", text: t("estimate_after_fix") }));
      showErrors(res.error, [...paramsBox.querySelectorAll("fieldset.params")], options, custom, status);
    }
  };
  const scheduleEstimate = () => { clearTimeout(timer); timer = setTimeout(runEstimate, 600); };
  const form = h("form", { id: "launch-form", novalidate: true, oninput: scheduleEstimate, onchange: scheduleEstimate,
    onsubmit: async (ev) => {
      ev.preventDefault();
      clearTimeout(timer);
      asked++;  // an estimate still on its way must not overwrite what the launch says
      clearErrors(form);
      document.getElementById("model-error").textContent = "";
      const jobs = jobsOf();
      if (!jobs.length) { status.textContent = t("no_dataset"); return; }
      const res = await api("POST", "/api/jobs", { jobs });
      if (res.ok) {
        status.textContent = `${t("submitted")}: ${res.data.jobs.map((j) => `#${j.id}`).join(", ")}`;
        location.hash = "#/queue";
        return;
      }
      showErrors(res.error, [...paramsBox.querySelectorAll("fieldset.params")], options, custom, status);
    } },
  h("div", { class: "field" }, h("label", { for: "model-select", text: t("model") }), select, custom,
    h("div", { class: "field-error", id: "model-error", role: "alert" })),
  h("div", { class: "field datasets" }, h("span", { class: "label", text: t("datasets") }), h("div", { class: "ds-list" }, boxes)),
  paramsBox, options, estimate,
  h("button", { type: "submit", id: "launch-submit", text: t("submit") }), status);
  main.replaceChildren(h("h2", { text: t("nav_launch") }), form);
  // for modules that add to the form (frontend/datastatus.js fills each .ds-status)
  document.dispatchEvent(new CustomEvent("lbs:launch-form", { detail: { form, datasets } }));
}
