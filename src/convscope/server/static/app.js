// convscope explorer: plain JavaScript, no build step. The whole view lives in the URL
// hash (model, image, layer, channel, settings), so reloading or sharing a URL restores it.
"use strict";

const $ = (id) => document.getElementById(id);
const DEFAULTS = { model: "", image: "sample:chelsea", layer: "", channel: "", tab: "grid",
  normalize: "channel", cmap: "viridis", sort: "", count: "64", method: "gradcam",
  target: "", alpha: "0.5", camlayer: "", layer2: "" };
const state = Object.assign({}, DEFAULTS);
let layers = [];        // rows of /api/layers
let gridInfo = null;    // layout of the current feature grid (/api/grid)
let predictions = [];

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
  renderLayerTable();
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
function renderLayerTable() {
  const body = $("layers").tBodies[0];
  const needle = $("layer-filter").value.trim().toLowerCase();
  body.innerHTML = "";
  for (const row of layers) {
    if (!row.output_shape) continue;
    if (needle && !(row.name + " " + row.type).toLowerCase().includes(needle)) continue;
    const tr = body.insertRow();
    tr.dataset.name = row.name;
    if (!row.spatial) tr.classList.add("nodraw");
    if (row.name === state.layer) tr.classList.add("selected");
    const rf = row.receptive_field ? row.receptive_field.size[0] : "";
    for (const text of [row.name, row.type, row.output_shape.join("×"), rf]) {
      tr.insertCell().textContent = text;
    }
    tr.title = row.spatial ? (row.conv ? "conv layer: has filters" : "") : "no spatial map";
  }
}

async function updatePredictions() {
  predictions = await getJSON("/api/predict?" + query({ k: 5 }));
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
  const info = await getJSON("/api/grid?" + gridQuery(state.layer));
  gridInfo = info;
  const s = info.stats;
  $("layer-stats").textContent =
    `${state.layer}: ${info.total_channels} channels of ${info.map_size.join("×")}; ` +
    `showing ${info.channels.length}; zero activations ${(100 * s.frac_zero).toFixed(1)}%; ` +
    `dead channels ${s.dead_count}` + (s.dead_count ? ` (${s.dead_channels.slice(0, 12).join(", ")}` +
    (s.dead_count > 12 ? ", …)" : ")") : "");
  setImage($("grid-img"), "/api/grid.png?" + gridQuery(state.layer));
}
async function updateChannel() {
  const title = $("channel-title");
  const hasChannel = state.channel !== "" && state.layer !== "";
  $("channel-img").hidden = !hasChannel;
  if (!hasChannel) {
    title.textContent = "Channel (click the grid)";
    $("channel-stats").innerHTML = "";
    $("filter-title").hidden = $("filter-img").hidden = true;
    return;
  }
  const info = await getJSON("/api/channel?" + query({ layer: state.layer, channel: state.channel }));
  title.textContent = `${state.layer} · channel ${state.channel}`;
  setImage($("channel-img"), "/api/channel.png?" +
    query({ layer: state.layer, channel: state.channel, cmap: state.cmap }));
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
  if (info.dead) table.insertRow().insertCell().textContent = "dead: never positive here";
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
        `positive ${(100 * a.stats.frac_positive).toFixed(1)}%` + (a.stats.dead ? ", dead" : "") +
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
function updateCam() {
  if (!state.method) return;
  setImage($("cam-img"), "/api/cam.png?" + query({ method: state.method, target: state.target,
    alpha: state.alpha, layer: state.camlayer }));
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
  $("cam-method").value = state.method;
  $("cam-alpha").value = state.alpha;
  $("cam-layer").value = state.camlayer;
  $("layer2").value = state.layer2;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === state.tab));
    $("panel-" + button.dataset.tab).hidden = button.dataset.tab !== state.tab;
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
  if (row && !row.spatial) showError(`${name} has no spatial map to draw`);
  render();
  const tr = $("layers").querySelector(`tr[data-name="${CSS.escape(name)}"]`);
  if (tr) tr.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- events
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
    const response = await fetch("/api/images", { method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" } });
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
  $("layer-filter").oninput = renderLayerTable;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.onclick = () => { state.tab = button.dataset.tab; render(); };
  }
  const body = $("layers").tBodies[0];
  body.onclick = (e) => {
    const tr = e.target.closest("tr");
    if (tr) { body.focus(); selectLayer(tr.dataset.name); }
  };
  body.onkeydown = (e) => {
    if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
    e.preventDefault();
    const rows = Array.from(body.rows);
    const at = rows.findIndex((tr) => tr.dataset.name === state.layer);
    const next = rows[Math.max(0, Math.min(rows.length - 1, at + (e.key === "ArrowDown" ? 1 : -1)))];
    if (next) selectLayer(next.dataset.name);
  };
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
