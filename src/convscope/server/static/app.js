// convscope explorer: plain JavaScript, no build step. The whole view lives in the URL
// hash (model, image, layer, channel, settings), so reloading or sharing a URL restores it.
"use strict";

const $ = (id) => document.getElementById(id);
const DEFAULTS = { model: "", image: "sample:chelsea", layer: "", channel: "", tab: "grid",
  normalize: "channel", cmap: "viridis", sort: "", count: "64", method: "gradcam",
  target: "", alpha: "0.5", camlayer: "", layer2: "", q: "", all: "" };
// CAM methods that run many forward passes: the server runs them as jobs (its
// SCORE_METHODS); the page shows their progress and can cancel them.
const JOB_METHODS = ["scorecam", "fasterscorecam", "ablationcam"];
const state = Object.assign({}, DEFAULTS);
let layers = [];        // rows of /api/layers
let gridInfo = null;    // layout of the current feature grid (/api/grid)
let predictions = [];
let expanded = new Set(); // layer-tree nodes shown open
let camJob = null;        // id of the CAM job the page is waiting for

// ---------------------------------------------------------------- URL state
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const key of Object.keys(DEFAULTS)) {
    state[key] = params.has(key) ? params.get(key) : DEFAULTS[key];
  }
}
function writeHash() {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) {
    if (value !== "" && value !== DEFAULTS[key]) params.set(key, value);
  }
  if (state.image) params.set("image", state.image);
  history.replaceState(null, "", "#" + params.toString());
}
function query(extra) {
  const params = new URLSearchParams({ model: state.model, image: state.image });
  for (const [key, value] of Object.entries(extra || {})) {
    if (value !== "" && value !== null && value !== undefined) params.set(key, value);
  }
  return params.toString();
}

// ---------------------------------------------------------------- helpers
let pending = 0;
function busy(delta) {
  pending += delta;
  $("status").textContent = pending > 0 ? "working…" : "";
}
function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}
async function getJSON(url) {
  busy(1);
  try {
    const response = await fetch(url);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || response.statusText);
    return body;
  } finally { busy(-1); }
}
function setImage(img, url) {
  if (img.dataset.url === url) return;
  img.dataset.url = url;
  img.dataset.loaded = "0";
  busy(1);
  img.onload = () => { img.dataset.loaded = "1"; busy(-1); };
  img.onerror = async () => {
    img.dataset.loaded = "error"; busy(-1);
    try {
      const response = await fetch(url);
      const body = await response.json();
      showError(body.detail || "could not load " + url);
    } catch (e) { showError("could not load " + url); }
  };
  img.src = url;
}
function fmt(value) {
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 100 || value === 0 ? String(+value.toFixed(2)) : value.toPrecision(3);
}

// ---------------------------------------------------------------- loading
async function loadModels() {
  const models = await getJSON("/api/models");
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) select.add(new Option(m.name, m.name));
  if (!state.model || !models.some((m) => m.name === state.model)) state.model = models[0].name;
  select.value = state.model;
}
async function loadImages(selectId) {
  const images = await getJSON("/api/images");
  const select = $("image");
  select.innerHTML = "";
  for (const im of images) select.add(new Option(`${im.name} (${im.kind})`, im.id));
  if (state.image && !images.some((im) => im.id === state.image)) {
    select.add(new Option(state.image, state.image));
  }
  select.value = selectId || state.image;
}
async function loadMethods() {
  const methods = await getJSON("/api/cam/methods");
  const select = $("cam-method");
  select.innerHTML = "";
  for (const m of methods) select.add(new Option(m, m));
  if (!methods.length) select.add(new Option("(CAM not installed)", ""));
  select.value = state.method;
}
async function loadLayers() {
  layers = await getJSON("/api/layers?" + new URLSearchParams({ model: state.model }));
  buildTree();
  renderLayerTable();
  await showModelWarning();
  const second = $("layer2");
  second.innerHTML = "";
  for (const row of layers.filter((r) => r.spatial)) second.add(new Option(row.name, row.name));
  if (!state.layer || !layers.some((r) => r.name === state.layer && r.spatial)) {
    const first = layers.find((r) => r.spatial);
    state.layer = first ? first.name : "";
  }
  if (!state.layer2) {
    const spatial = layers.filter((r) => r.spatial);
    state.layer2 = spatial.length ? spatial[spatial.length - 1].name : "";
  }
  second.value = state.layer2;
}
// ---------------------------------------------------------------- layer tree
// Rows are grouped under their nearest listed ancestor module; pure containers (no
// output of their own, e.g. a ModuleList) start open. Padding, identity and dropout
// modules are hidden unless asked for. A search shows the matches with their ancestors.
function buildTree() {
  const names = new Set(layers.map((r) => r.name));
  const kids = new Map(), allKids = new Map();
  for (const row of layers) {
    let parent = row.name;
    row.treeParent = "";
    while (parent.includes(".")) {
      parent = parent.slice(0, parent.lastIndexOf("."));
      if (names.has(parent)) { row.treeParent = parent; break; }
    }
    kids.set(row.treeParent, (kids.get(row.treeParent) || 0) + (row.hidden ? 0 : 1));
    allKids.set(row.treeParent, (allKids.get(row.treeParent) || 0) + 1);
  }
  expanded = new Set();
  for (const row of layers) {
    row.shownKids = kids.get(row.name) || 0;
    row.allKids = allKids.get(row.name) || 0;
    if (!row.output_shape && row.shownKids) expanded.add(row.name);
  }
  revealLayer(state.layer);
}
function childCount(row) {
  return state.all === "1" ? row.allKids : row.shownKids;
}
function ancestors(name) {
  const out = [];
  let row = layers.find((r) => r.name === name);
  while (row && row.treeParent) {
    out.push(row.treeParent);
    row = layers.find((r) => r.name === row.treeParent);
  }
  return out;
}
function revealLayer(name) {
  for (const parent of ancestors(name)) expanded.add(parent);
}
function visibleRows() {
  const needle = state.q.trim().toLowerCase();
  const shown = layers.filter((r) => state.all === "1" || !r.hidden);
  if (needle) {
    const keep = new Set();
    for (const row of shown) {
      if ((row.name + " " + row.type).toLowerCase().includes(needle)) {
        keep.add(row.name);
        for (const parent of ancestors(row.name)) keep.add(parent);
      }
    }
    return shown.filter((r) => keep.has(r.name));
  }
  return shown.filter((r) => ancestors(r.name).every((a) => expanded.has(a)));
}
function renderLayerTable() {
  const body = $("layers").tBodies[0];
  body.innerHTML = "";
  const searching = state.q.trim() !== "";
  for (const row of visibleRows()) {
    const tr = body.insertRow();
    tr.dataset.name = row.name;
    if (!row.spatial) tr.classList.add("nodraw");
    if (row.hidden) tr.classList.add("minor");
    if (row.name === state.layer) tr.classList.add("selected");
    const rf = row.receptive_field ? row.receptive_field.size[0] : "";
    const shape = row.output_shape ? row.output_shape.join("×") : "";
    const first = tr.insertCell();
    first.style.paddingLeft = (0.3 + 1.0 * ancestors(row.name).length) + "em";
    const toggle = document.createElement("span");
    toggle.className = "toggle";
    if (childCount(row) && !searching) {
      toggle.textContent = expanded.has(row.name) ? "▾" : "▸";
      toggle.dataset.toggle = row.name;
      tr.setAttribute("aria-expanded", String(expanded.has(row.name)));
    }
    first.appendChild(toggle);
    const short = row.treeParent ? row.name.slice(row.treeParent.length + 1) : row.name;
    first.appendChild(document.createTextNode(short));
    first.title = row.name;
    for (const text of [row.type, shape, rf]) tr.insertCell().textContent = text;
    tr.title = row.spatial ? (row.conv ? "conv layer: has filters" : row.name) : "no spatial map";
  }
}
function toggleNode(name, open) {
  const want = open === undefined ? !expanded.has(name) : open;
  if (want) expanded.add(name); else expanded.delete(name);
  renderLayerTable();
}
async function showModelWarning() {
  const models = await getJSON("/api/models");
  const row = models.find((m) => m.name === state.model);
  const box = $("warning");
  box.hidden = !(row && row.pretrained === false);
  box.textContent = box.hidden ? "" : `${row.name} has random weights (no pretrained weights ` +
    "were loaded): its predictions, maps and filters show no learned features.";
}

async function updatePredictions() {
  // Naming the shown layer lets a new image's forward pass capture it first.
  predictions = await getJSON("/api/predict?" + query({ k: 5, layer: state.layer }));
  const list = $("predictions");
  list.innerHTML = "";
  const target = $("cam-target");
  target.innerHTML = "";
  for (const p of predictions) {
    const li = document.createElement("li");
    li.textContent = `${p.label} — ${(100 * p.probability).toFixed(1)}%`;
    li.title = "show the CAM for this class";
    li.onclick = () => { state.target = String(p.index); state.tab = "cam"; render(); };
    list.appendChild(li);
    target.add(new Option(`${p.label} (${(100 * p.probability).toFixed(1)}%)`, String(p.index)));
  }
  if (!state.target || !predictions.some((p) => String(p.index) === state.target)) {
    if (state.target) target.add(new Option("class " + state.target, state.target));
    else state.target = String(predictions[0].index);
  }
  target.value = state.target;
  setImage($("input-img"), "/api/input.png?" + query());
}

function gridQuery(layer) {
  return query({ layer, normalize: state.normalize, cmap: state.cmap, sort: state.sort,
    count: state.count });
}
async function updateGrid() {
  if (!state.layer) return;
  // The picture must match the layout: both URLs from one snapshot of the view, and a
  // layout that arrives after the view moved on (another model, image or layer) is dropped.
  const params = gridQuery(state.layer);
  const info = await getJSON("/api/grid?" + params);
  if (params !== gridQuery(state.layer)) return;
  gridInfo = info;
  const s = info.stats;
  $("layer-stats").textContent =
    `${state.layer}: ${info.total_channels} channels of ${info.map_size.join("×")}; ` +
    `showing ${info.channels.length}; zero activations ${(100 * s.frac_zero).toFixed(1)}%; ` +
    `inactive on this image: ${s.dead_count}` + (s.dead_count ?
      ` (${s.dead_channels.slice(0, 12).join(", ")}` + (s.dead_count > 12 ? ", …)" : ")") : "") +
    " (dead channels are a dataset question: see the atlas)";
  setImage($("grid-img"), "/api/grid.png?" + params);
}
async function updateChannel() {
  const title = $("channel-title");
  const hasChannel = state.channel !== "" && state.layer !== "";
  $("channel-img").hidden = $("channel-over").hidden = !hasChannel;
  if (!hasChannel) {
    title.textContent = "Channel (click the grid)";
    $("channel-stats").innerHTML = "";
    $("filter-title").hidden = $("filter-img").hidden = true;
    return;
  }
  const params = query({ layer: state.layer, channel: state.channel });
  const info = await getJSON("/api/channel?" + params);
  // The view moved on while this loaded (as in updateGrid): the newer call draws it.
  if (params !== query({ layer: state.layer, channel: state.channel })) return;
  title.textContent = `${state.layer} · channel ${state.channel}`;
  setImage($("channel-img"), "/api/channel.png?" +
    query({ layer: state.layer, channel: state.channel, cmap: state.cmap }));
  setImage($("channel-over"), "/api/channel.png?" +
    query({ layer: state.layer, channel: state.channel, cmap: "jet", over: "true" }));
  const table = $("channel-stats");
  table.innerHTML = "";
  const rows = [["mean", info.stats.mean], ["std", info.stats.std], ["min", info.stats.min],
    ["max", info.stats.max], ["positive", info.stats.frac_positive],
    ["zero", info.stats.frac_zero], ["rank by mean", info.rank_by_mean]];
  for (const [name, value] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = typeof value === "number" ? fmt(value) : value;
  }
  if (info.inactive) {
    table.insertRow().insertCell().textContent = "inactive on this image (never positive here)";
  }
  showVisualization();
  const filterImg = $("filter-img");
  $("filter-title").hidden = filterImg.hidden = !info.conv;
  if (info.conv) {
    setImage(filterImg, "/api/filters.png?" + new URLSearchParams({
      model: state.model, layer: state.layer, channel: state.channel }));
  }
  const atlas = $("atlas");
  atlas.innerHTML = "";
  if (info.atlas) {
    const h = document.createElement("h3");
    h.textContent = "Dataset atlas";
    atlas.appendChild(h);
    const p = document.createElement("p");
    p.className = "stats";
    atlas.appendChild(p);
    if (!info.atlas.available) {
      p.textContent = info.atlas.reason;
    } else {
      const a = info.atlas;
      p.textContent = `over ${a.images} images: mean ${fmt(a.stats.mean)}, max ${fmt(a.stats.max)}, ` +
        `positive ${(100 * a.stats.frac_positive).toFixed(1)}%` +
        (a.stats.dead ? ", dead across the dataset" : ", alive across the dataset") +
        (a.layer_dead_count !== undefined ? `; ${a.layer_dead_count} dead channels in this layer` : "") +
        (a.top_classes.length ? "; top-k classes: " +
          a.top_classes.map(([name, n]) => `${name} (${n})`).join(", ") : "");
      if (a.crops) {
        const img = document.createElement("img");
        img.id = "atlas-img";
        img.alt = "top dataset examples of this channel";
        img.src = "/api/atlas/crops.jpg?" + new URLSearchParams({ layer: state.layer,
          channel: state.channel });
        atlas.appendChild(img);
      }
      const list = document.createElement("ol");
      for (const row of a.topk) {
        const li = document.createElement("li");
        li.textContent = `${row.image}: ${fmt(row.value)}`;
        list.appendChild(li);
      }
      atlas.appendChild(list);
    }
  }
}
function updateFilters() {
  const row = layers.find((r) => r.name === state.layer);
  const img = $("filters-img");
  if (row && row.conv) {
    $("filters-note").textContent = `filters of ${state.layer}`;
    img.hidden = false;
    setImage(img, "/api/filters.png?" + new URLSearchParams({ model: state.model,
      layer: state.layer, count: state.count, tile: 48 }));
  } else {
    $("filters-note").textContent = `${state.layer || "this layer"} is not a conv layer: pick one with filters`;
    img.hidden = true;
  }
}
function camQuery() {
  return query({ method: state.method, target: state.target, alpha: state.alpha,
    layer: state.camlayer });
}
async function updateCam() {
  if (!state.method) return;
  if (!JOB_METHODS.includes(state.method)) {
    camJob = null;
    $("cam-job").hidden = true;
    setImage($("cam-img"), "/api/cam.png?" + camQuery());
    return;
  }
  await runCamJob(camQuery());
}
// Expensive CAMs: start a job, show its state until done, then draw the (now cached) map.
async function runCamJob(camParams) {
  const box = $("cam-job"), text = $("cam-job-text");
  const params = new URLSearchParams(camParams);
  params.delete("alpha");
  box.hidden = false;
  text.textContent = `${state.method}: starting…`;
  const response = await fetch("/api/jobs?" + params.toString(), { method: "POST" });
  const body = await response.json().catch(() => ({}));
  if (response.status === 429) {
    const wait = Number(response.headers.get("Retry-After") || 5);
    text.textContent = `busy: ${body.detail || "too many jobs"}; retrying in ${wait} s`;
    setTimeout(() => { if (camQuery() === camParams) guarded(updateCam); }, wait * 1000);
    return;
  }
  if (!response.ok) throw new Error(body.detail || response.statusText);
  camJob = body.id;
  let job = body;
  while (camJob === body.id && job.id && !["done", "failed", "cancelled"].includes(job.status)) {
    if (!job.cancel_requested) {
      text.textContent = job.status === "queued"
        ? `${state.method}: waiting (${job.position || 0} ahead)`
        : `${state.method}: running ${job.running_s.toFixed(1)} s` + (job.progress && job.progress.total
          ? ` (${Math.round(100 * job.progress.done / job.progress.total)}%)` : "");
    }
    await new Promise((resolve) => setTimeout(resolve, 400));
    job = await getJSON("/api/jobs/" + encodeURIComponent(body.id));
  }
  if (job.id && camJob !== job.id) return;  // the view moved on
  camJob = null;
  if (job.status === "failed") throw new Error(job.error || "the job failed");
  if (job.status === "cancelled") { text.textContent = `${state.method}: cancelled`; return; }
  box.hidden = true;
  setImage($("cam-img"), "/api/cam.png?" + camParams);
}
// Feature visualisation of the selected channel: a job the first time (progress shown),
// then the cached PNG. The button starts it; a channel already visualised shows at once.
let visJob = null;
function visURL() {
  return "/api/visualization.png?" + new URLSearchParams({
    model: state.model, layer: state.layer, channel: state.channel }).toString();
}
async function showVisualization() {
  const url = visURL(), img = $("vis-img"), text = $("vis-text");
  $("vis-title").hidden = $("vis-box").hidden = false;
  img.hidden = true;
  text.textContent = "";
  const known = await fetch(url + "&start=false").catch(() => null);
  if (known && known.status === 200 && visURL() === url) { img.hidden = false; setImage(img, url); }
}
async function runVisualization() {
  const url = visURL(), img = $("vis-img"), text = $("vis-text");
  text.textContent = "starting…";
  let response = await fetch(url);
  if (response.status === 429) {
    text.textContent = "busy: try again in " + (response.headers.get("Retry-After") || 5) + " s";
    return;
  }
  if (response.status === 202) {
    const job = (await response.json()).job;
    visJob = job.id;
    let now = job;
    while (visJob === job.id && !["done", "failed", "cancelled"].includes(now.status)) {
      text.textContent = now.status === "queued" ? `waiting (${now.position || 0} ahead)`
        : "optimising" + (now.progress && now.progress.total
          ? ` ${Math.round(100 * now.progress.done / now.progress.total)}%` : "…");
      await new Promise((resolve) => setTimeout(resolve, 400));
      now = await getJSON("/api/jobs/" + encodeURIComponent(job.id));
    }
    if (visJob !== job.id) return;
    visJob = null;
    if (now.status !== "done") { text.textContent = now.error || now.status; return; }
  } else if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    text.textContent = body.detail || response.statusText;
    return;
  }
  if (visURL() !== url) return;  // the view moved on
  text.textContent = "";
  img.hidden = false;
  setImage(img, url);
}
$("vis-run").addEventListener("click", () => guarded(runVisualization));
async function cancelCamJob() {
  if (!camJob) return;
  const id = camJob;
  $("cam-job-text").textContent = `${state.method}: cancelling…`;
  await fetch("/api/jobs/" + encodeURIComponent(id), { method: "DELETE" });
}
function updateCompare() {
  $("cmp1-cap").textContent = state.layer;
  $("cmp2-cap").textContent = state.layer2;
  if (state.layer) setImage($("cmp1-img"), "/api/grid.png?" + gridQuery(state.layer));
  if (state.layer2) setImage($("cmp2-img"), "/api/grid.png?" + gridQuery(state.layer2));
}

// ---------------------------------------------------------------- rendering
function syncControls() {
  $("model").value = state.model;
  $("image").value = state.image;
  for (const id of ["normalize", "cmap", "sort", "count"]) $(id).value = state[id];
  $("layer-filter").value = state.q;
  $("show-hidden").checked = state.all === "1";
  for (const label of document.querySelectorAll("#controls [data-tabs]")) {
    label.hidden = !label.dataset.tabs.split(" ").includes(state.tab);
  }
  $("cam-method").value = state.method;
  $("cam-alpha").value = state.alpha;
  $("cam-layer").value = state.camlayer;
  $("layer2").value = state.layer2;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === state.tab));
    $("panel-" + button.dataset.tab).hidden = button.dataset.tab !== state.tab;
  }
  const rows = Array.from($("layers").tBodies[0].rows);
  if (state.layer && !rows.some((tr) => tr.dataset.name === state.layer) && !state.q) {
    revealLayer(state.layer);
    renderLayerTable();
  }
  for (const tr of $("layers").tBodies[0].rows) {
    tr.classList.toggle("selected", tr.dataset.name === state.layer);
  }
}
async function guarded(fn) {
  try { await fn(); } catch (error) { showError(error.message); }
}
async function render() {
  showError("");
  writeHash();
  syncControls();
  const jobs = [guarded(updateGrid), guarded(updateChannel)];
  if (state.tab === "filters") jobs.push(guarded(updateFilters));
  if (state.tab === "cam") jobs.push(guarded(updateCam));
  if (state.tab === "compare") jobs.push(guarded(updateCompare));
  await Promise.all(jobs);
}
async function imageChanged() {
  showError("");
  writeHash();
  await guarded(updatePredictions);
  await render();
}
async function modelChanged() {
  showError("");
  await guarded(loadLayers);
  await guarded(updatePredictions);
  await render();
}

function selectLayer(name) {
  if (name === state.layer) return;
  const row = layers.find((r) => r.name === name);
  state.layer = name;
  state.channel = "";
  revealLayer(name);
  renderLayerTable();
  if (row && !row.spatial) showError(`${name} has no spatial map to draw`);
  render();
  const tr = $("layers").querySelector(`tr[data-name="${CSS.escape(name)}"]`);
  if (tr) tr.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- events
function moveLayer(e) {
  if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return false;
  e.preventDefault();
  const rows = Array.from($("layers").tBodies[0].rows);
  const at = rows.findIndex((tr) => tr.dataset.name === state.layer);
  const next = rows[Math.max(0, Math.min(rows.length - 1, at + (e.key === "ArrowDown" ? 1 : -1)))];
  if (next) selectLayer(next.dataset.name);
  return true;
}
function channelAt(event) {
  const img = event.currentTarget;
  if (!gridInfo || !img.naturalWidth) return null;
  const { cols, rows, pad, channels } = gridInfo;
  const scale = img.naturalWidth / img.clientWidth;
  const x = event.offsetX * scale, y = event.offsetY * scale;
  const tileW = (img.naturalWidth - pad) / cols - pad;
  const tileH = (img.naturalHeight - pad) / rows - pad;
  const col = Math.floor((x - pad) / (tileW + pad));
  const row = Math.floor((y - pad) / (tileH + pad));
  if (col < 0 || col >= cols || row < 0 || row >= rows) return null;
  const index = row * cols + col;
  return index < channels.length ? channels[index] : null;
}

async function upload(file) {
  if (!file) return;
  busy(1);
  try {
    const form = new FormData();  // multipart/form-data: the file name travels with it
    form.append("file", file, file.name);
    const response = await fetch("/api/images", { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || response.statusText);
    state.image = body.id;
    state.channel = "";
    await loadImages(body.id);
    await imageChanged();
  } catch (error) { showError("upload failed: " + error.message); }
  finally { busy(-1); }
}

function bind() {
  $("model").onchange = (e) => { state.model = e.target.value; state.layer = ""; state.layer2 = "";
    state.channel = ""; modelChanged(); };
  $("image").onchange = (e) => { state.image = e.target.value; imageChanged(); };
  $("upload").onchange = (e) => upload(e.target.files[0]);
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    upload(e.dataTransfer.files[0]);
  });
  for (const id of ["normalize", "cmap", "sort", "count"]) {
    $(id).onchange = (e) => { state[id] = e.target.value; render(); };
  }
  $("cam-method").onchange = (e) => { state.method = e.target.value; render(); };
  $("cam-target").onchange = (e) => { state.target = e.target.value; render(); };
  $("cam-alpha").onchange = (e) => { state.alpha = e.target.value; render(); };
  $("cam-layer").onchange = (e) => { state.camlayer = e.target.value.trim(); render(); };
  $("layer2").onchange = (e) => { state.layer2 = e.target.value; render(); };
  $("layer-filter").oninput = (e) => { state.q = e.target.value; writeHash(); renderLayerTable(); };
  $("show-hidden").onchange = (e) => { state.all = e.target.checked ? "1" : ""; writeHash();
    renderLayerTable(); };
  $("cam-cancel").onclick = () => guarded(cancelCamJob);
  for (const button of document.querySelectorAll("#tabs button")) {
    button.onclick = () => { state.tab = button.dataset.tab; render(); };
  }
  const body = $("layers").tBodies[0];
  body.onclick = (e) => {
    if (e.target.dataset.toggle) { toggleNode(e.target.dataset.toggle); body.focus(); return; }
    const tr = e.target.closest("tr");
    if (tr) { body.focus(); selectLayer(tr.dataset.name); }
  };
  body.onkeydown = (e) => {
    const row = layers.find((r) => r.name === state.layer);
    if ((e.key === "ArrowRight" || e.key === "ArrowLeft" || e.key === "Enter") && row) {
      e.preventDefault();
      e.stopPropagation();
      if (e.key === "ArrowLeft" && !(childCount(row) && expanded.has(row.name)) && row.treeParent) {
        selectLayer(row.treeParent);
      } else if (childCount(row)) {
        toggleNode(row.name, e.key === "Enter" ? undefined : e.key === "ArrowRight");
      }
      return;
    }
    if (moveLayer(e)) e.stopPropagation();
  };
  // Anywhere else on the page (outside form fields): arrows move between layers (up/down)
  // and between the shown channels (left/right).
  document.addEventListener("keydown", (e) => {
    if (e.target.closest && e.target.closest("input, select, textarea")) return;
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    if (moveLayer(e)) return;
    if ((e.key === "ArrowRight" || e.key === "ArrowLeft") && gridInfo && gridInfo.channels.length) {
      e.preventDefault();
      const order = gridInfo.channels.map(String);
      const at = order.indexOf(state.channel);
      const step = e.key === "ArrowRight" ? 1 : -1;
      const next = at < 0 ? 0 : Math.max(0, Math.min(order.length - 1, at + step));
      state.channel = order[next];
      render();
    }
  });
  $("grid-img").onclick = (e) => {
    const channel = channelAt(e);
    if (channel !== null) { state.channel = String(channel); render(); }
  };
  window.addEventListener("hashchange", () => { readHash(); init(); });
}

async function init() {
  try {
    await loadModels();
    await Promise.all([loadImages(), loadMethods()]);
    await loadLayers();
    await updatePredictions();
  } catch (error) { showError(error.message); }
  await render();
  document.body.dataset.ready = "1";
}

readHash();
bind();
init();
