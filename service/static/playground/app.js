"use strict";
// The ptq4dm playground. It reads what the server serves (/readyz, /openapi.json, /v1/models: which models take a
// class or a prompt), submits jobs (POST /v1/jobs), follows them live over Server-Sent Events and, in the
// comparison, computes each image's PSNR against fp32 from the decoded pixels. Only the public API is used, nothing
// the page could not do with curl.

const $ = (selector, root = document) => root.querySelector(selector);
const FIELDS = ["model", "precision", "sampler", "steps", "seed", "n", "class_labels", "prompt", "negative_prompt",
  "guidance_scale"];
const TERMINAL = ["succeeded", "failed", "cancelled"];
const MAX_SEED = 2 ** 32 - 1;

// Paths relative to the page, so the playground also works behind a reverse proxy that adds a path prefix.
const api = (path) => new URL(path.replace(/^\//, ""), document.baseURI);

async function request(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(api(path), init);
  const text = await response.text();
  let data = text;
  try { data = JSON.parse(text); } catch { /* not JSON: keep the text for the error message */ }
  return { status: response.status, ok: response.ok, data };
}

// ---- what is served -------------------------------------------------------------------------------------------

let variants = {}; // "model/precision" -> {state, stage, progress, ...}, as /readyz lists them
let served = {}; // model -> {kind, num_classes, class_names, ...}, as /v1/models describes it
let busy = false; // one submission at a time

function integerMaximum(prop) {
  // FastAPI writes `int | None` as anyOf [{type: integer, ...}, {type: null}]; the server adds its limits there.
  const branches = prop ? (prop.anyOf || [prop]) : [];
  const branch = branches.find((b) => b.type === "integer");
  return branch && branch.maximum !== undefined ? branch.maximum : null;
}

async function loadServed() {
  const [ready, schema, described] = await Promise.all([request("GET", "readyz"), request("GET", "openapi.json"),
    request("GET", "v1/models")]);
  variants = ready.data.models || {};
  // Without it (an older server) every model gets the plain form; the API still names any missing field.
  served = described.ok ? Object.fromEntries(described.data.map((m) => [m.name, m])) : {};
  // The live limits (max_steps, max_n) are in the schema; shown as the inputs' max, enforced by the API.
  const props = schema.ok ? schema.data.components.schemas.JobRequest.properties : {};
  for (const name of ["steps", "n"]) {
    const max = integerMaximum(props[name]);
    if (max !== null) $(`#${name}`).max = max;
  }
  $("#seed").max = MAX_SEED;
  const models = [...new Set(Object.keys(variants).map((key) => key.slice(0, key.lastIndexOf("/"))))];
  fillSelect($("#model"), models.map((m) => [m, m]));
  fillModel();
  const waiting = Object.values(variants).filter((v) => v.state !== "ready").length;
  $("#served-state").textContent = waiting
    ? `${waiting} variant(s) not ready yet; their jobs wait in the queue.`
    : "Every served variant is ready.";
  if (waiting) setTimeout(refreshServed, 3000); // calibrating or compiling: refresh their labels until ready
}

function refreshServed() {
  loadServed().catch((error) => {
    $("#served-state").textContent = `Could not read what this server serves: ${error}`;
  });
}

function precisionsOf(model) {
  return Object.entries(variants)
    .filter(([key]) => key.startsWith(`${model}/`))
    .map(([key, variant]) => [key.slice(model.length + 1), variant]);
}

function fillPrecisions() {
  const options = precisionsOf($("#model").value).map(([precision, variant]) => {
    const state = variant.state === "ready" ? "" : ` (${variant.state}${variant.stage ? `: ${variant.stage}` : ""})`;
    return [precision, precision + state];
  });
  fillSelect($("#precision"), options);
  const quantized = options.some(([p]) => p !== "fp32");
  $("#compare").disabled = busy || !quantized || !options.some(([p]) => p === "fp32");
  $("#compare").title = quantized ? "" : "this server serves no quantized precision";
}

// The conditioning fields of the selected model's kind: a class (class-conditional), a prompt (text-to-image).
function fillConditioning() {
  const info = served[$("#model").value] || {};
  for (const field of document.querySelectorAll(".field[data-kind]")) field.hidden = field.dataset.kind !== info.kind;
  const classes = info.kind === "class-conditional" ? info.num_classes : 0;
  const options = [["", "random (from each image's seed)"]];
  for (let c = 0; c < classes; c += 1) options.push([String(c), className(info, c)]);
  fillSelect($("#class_labels"), options);
}

const className = (info, c) => (info.class_names ? `${c} · ${info.class_names[c]}` : `class ${c}`);

function fillModel() {
  fillPrecisions();
  fillConditioning();
}

function fillSelect(select, options) {
  const keep = select.value;
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
  if (options.some(([value]) => value === keep)) select.value = keep;
}

// ---- the request and its errors -------------------------------------------------------------------------------

function readForm() {
  const body = { model: $("#model").value, precision: $("#precision").value, sampler: $("#sampler").value };
  for (const name of ["steps", "seed", "n"]) {
    // A number input's value is "" or a valid number; 2.5 is sent as is and the API's 422 says why not.
    const text = $(`#${name}`).value.trim();
    if (text !== "") body[name] = Number(text);
  }
  // Only the fields the model takes (the visible ones); empty ones are left to the server (an empty prompt gets
  // its "required" message next to the field). One class stands for every image.
  const kind = (served[body.model] || {}).kind;
  const label = $("#class_labels").value;
  if (kind === "class-conditional" && label !== "") body.class_labels = Number(label);
  if (kind === "text-to-image") {
    for (const name of ["prompt", "negative_prompt"]) {
      if ($(`#${name}`).value.trim() !== "") body[name] = $(`#${name}`).value;
    }
    const scale = $("#guidance_scale").value.trim();
    if (scale !== "") body.guidance_scale = Number(scale);
  }
  return body;
}

function clearErrors() {
  $("#errors").hidden = true;
  $("#errors").replaceChildren();
  for (const name of FIELDS) {
    $(`#${name}-error`).textContent = "";
    $(`#${name}`).removeAttribute("aria-invalid");
  }
}

function showErrors(status, data) {
  // 422: a list of {loc: ["body", field], msg}; every other error: {detail: "text"}.
  const list = document.createElement("ul");
  const problems = Array.isArray(data && data.detail)
    ? data.detail.map((e) => ({ field: (e.loc || []).filter((part) => part !== "body").join("."), msg: e.msg }))
    : [{ field: "", msg: typeof (data && data.detail) === "string" ? data.detail : JSON.stringify(data) }];
  for (const { field, msg } of problems) {
    const item = document.createElement("li");
    item.textContent = field ? `${field}: ${msg}` : msg;
    list.append(item);
    if (FIELDS.includes(field)) {
      $(`#${field}-error`).textContent = msg;
      $(`#${field}`).setAttribute("aria-invalid", "true");
    }
  }
  const heading = document.createElement("p");
  heading.textContent = status
    ? `The server refused the request (HTTP ${status}):`
    : "The request could not be completed:";
  $("#errors").replaceChildren(heading, list);
  $("#errors").hidden = false;
  $("#errors").focus();
}

// ---- one job, shown in a panel --------------------------------------------------------------------------------

function newPanel(title) {
  const panel = $("#panel-template").content.firstElementChild.cloneNode(true);
  $(".panel-title", panel).textContent = title;
  $(".bar", panel).setAttribute("aria-label", `${title} progress`);
  return panel;
}

function logEvent(panel, type, data) {
  const item = document.createElement("li");
  const { job_id: _id, type: _type, at: _at, ...rest } = data;
  item.textContent = `${type} ${JSON.stringify(rest)}`;
  $(".events ol", panel).append(item);
}

function setProgress(panel, step, total) {
  const bar = $(".bar", panel);
  bar.max = total;
  bar.value = step;
  $(".steps", panel).textContent = `step ${step} / ${total}`;
}

// Follows the job's event stream until its terminal event, then resolves with its record (GET /v1/jobs/{id}).
function follow(jobId, panel) {
  return new Promise((resolve) => {
    const source = new EventSource(api(`v1/jobs/${jobId}/events`));
    let done = false;
    const finish = async () => {
      if (done) return;
      done = true;
      source.close();
      const job = await request("GET", `v1/jobs/${jobId}`);
      resolve(job.ok ? job.data : { status: "failed", error: `job ${jobId}: HTTP ${job.status}` });
    };
    source.addEventListener("queued", (e) => {
      const data = JSON.parse(e.data);
      logEvent(panel, "queued", data);
      $(".state", panel).textContent = `Queued: ${data.queue_position} job(s) ahead.`;
    });
    source.addEventListener("position", (e) => {
      const data = JSON.parse(e.data);
      $(".state", panel).textContent = `Queued: ${data.queue_position} job(s) ahead.`;
    });
    source.addEventListener("running", (e) => {
      const data = JSON.parse(e.data);
      logEvent(panel, "running", data);
      if (data.step === 0) $(".state", panel).textContent = "Running.";
      setProgress(panel, data.step, data.total);
    });
    for (const type of TERMINAL) {
      source.addEventListener(type, (e) => {
        logEvent(panel, type, JSON.parse(e.data));
        finish();
      });
    }
    // The browser reconnects by itself (with Last-Event-ID); CLOSED means it gave up (404, or 204: nothing left).
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) finish(); };
  });
}

const seconds = (s) => (s === null || s === undefined ? "–" : `${s.toFixed(3)} s`);

function showJob(panel, job) {
  if (job.progress) setProgress(panel, job.progress.step, job.progress.total);
  const state = $(".state", panel);
  if (job.status !== "succeeded") {
    state.textContent = job.status === "cancelled" ? "Cancelled." : `Failed: ${job.error || "unknown error"}`;
    state.classList.add("failed");
    return Promise.resolve([]);
  }
  state.textContent = `Succeeded in ${seconds(job.timings.run_s)}.`;
  const meta = [
    ["job", job.id], ["model version", job.model_version], ["seeds", job.seeds.join(", ")],
    ["queued", seconds(job.timings.wait_s)], ["ran", seconds(job.timings.run_s)],
    ["computing", seconds(job.timings.compute_s)], ["worker", job.worker],
    ["calibration", job.calibration_hash || "none (full precision)"],
  ];
  if (job.backend) meta.push(["backend", job.backend]);
  const info = served[job.model] || {};
  if (job.class_labels) meta.push(["classes", job.class_labels.map((c) => className(info, c)).join(", ")]);
  if (job.prompt !== null && job.prompt !== undefined) meta.push(["prompt", job.prompt]);
  if (job.negative_prompt) meta.push(["negative prompt", job.negative_prompt]);
  if (job.guidance_scale !== null && job.guidance_scale !== undefined) {
    meta.push(["guidance scale", job.guidance_scale]);
  }
  $(".meta", panel).replaceChildren(...meta.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value === null || value === undefined ? "–" : String(value);
    if (term === "calibration" && job.calibration_hash) dd.classList.add("hash");
    return [dt, dd];
  }));
  const figures = job.images.map((src, k) => {
    const figure = document.createElement("figure");
    const img = new Image();
    img.alt = `${job.precision}, seed ${job.seeds[k]}`;
    img.src = api(src);
    const caption = document.createElement("figcaption");
    caption.textContent = `seed ${job.seeds[k]}`;
    if (job.class_labels) { // as run: drawn from the seed where the request named none
      figure.dataset.classLabel = String(job.class_labels[k]);
      const label = document.createElement("span");
      label.className = "class-name";
      label.textContent = className(info, job.class_labels[k]);
      caption.append(label);
    }
    figure.append(img, caption);
    return figure;
  });
  $(".grid", panel).replaceChildren(...figures);
  // Resolves once every PNG is decoded, so the comparison can read their pixels.
  return Promise.all(figures.map((f) => $("img", f).decode().then(() => f)));
}

async function run(body, panel) {
  const created = await request("POST", "v1/jobs", body);
  if (!created.ok) {
    panel.remove();
    showErrors(created.status, created.data);
    return null;
  }
  $(".state", panel).textContent = "Submitted.";
  const job = await follow(created.data.id, panel);
  return { job, figures: await showJob(panel, job) };
}

// ---- generate, and compare with fp32 --------------------------------------------------------------------------

function pixels(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(img, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height).data;
}

// PSNR over the RGB channels of 8-bit pixels (alpha is always opaque here); Infinity when identical.
function psnr(a, b) {
  let squared = 0;
  let count = 0;
  for (let i = 0; i < a.length; i += 4) {
    for (let c = 0; c < 3; c += 1) {
      const d = a[i + c] - b[i + c];
      squared += d * d;
      count += 1;
    }
  }
  const mse = squared / count;
  return mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse);
}

const decibels = (value) => (value === Infinity ? "∞ dB (identical)" : `${value.toFixed(2)} dB`);

function showPsnr(panel, reference, quantized) {
  const values = quantized.map((figure, k) => {
    const value = psnr(pixels($("img", reference[k])), pixels($("img", figure)));
    figure.dataset.psnr = String(value);
    const label = document.createElement("span");
    label.className = "psnr";
    label.textContent = `PSNR ${decibels(value)}`;
    $("figcaption", figure).append(label);
    return value;
  });
  const finite = values.filter(Number.isFinite);
  const mean = finite.reduce((s, v) => s + v, 0) / finite.length;
  const some = finite.length < values.length ? ` over the ${finite.length} that differ` : "";
  $(".summary", panel).textContent = "PSNR vs fp32, same seeds: " +
    (finite.length ? `mean ${decibels(mean)}${some}.` : "identical images.");
}

async function submit(compare) {
  if (busy) return;
  busy = true;
  $("#generate").disabled = true;
  $("#compare").disabled = true;
  clearErrors();
  try {
    const body = readForm();
    const results = $("#results");
    if (!compare) {
      const panel = newPanel(`${body.model} · ${body.precision}`);
      results.replaceChildren(panel);
      await run(body, panel);
      return;
    }
    if (body.precision === "fp32") {
      showErrors(null, { detail: [{ loc: ["body", "precision"], msg: "choose a quantized precision to compare" }] });
      return;
    }
    // The same seed and conditioning for both (the seed chosen here when the field is empty; a random class is
    // drawn from it, so the same too): only the precision differs.
    if (body.seed === undefined) body.seed = Math.floor(Math.random() * 2 ** 31);
    const reference = newPanel(`${body.model} · fp32`);
    const quantized = newPanel(`${body.model} · ${body.precision}`);
    const pair = document.createElement("div");
    pair.className = "compare";
    pair.append(reference, quantized);
    results.replaceChildren(pair);
    const [fp, q] = await Promise.all([run({ ...body, precision: "fp32" }, reference), run(body, quantized)]);
    if (fp && q && fp.figures.length && fp.figures.length === q.figures.length) {
      showPsnr(quantized, fp.figures, q.figures);
    }
  } catch (error) { // the network, or an image that no longer decodes (expired)
    showErrors(null, { detail: String(error) });
  } finally {
    busy = false;
    $("#generate").disabled = false;
    fillPrecisions();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#job-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit(false);
  });
  $("#compare").addEventListener("click", () => submit(true));
  $("#model").addEventListener("change", fillModel);
  refreshServed();
});
