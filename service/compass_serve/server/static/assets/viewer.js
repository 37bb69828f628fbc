// The viewer page: upload, layer table, progressive delivery over Range requests, srcset, browse.
import {
  ApiError, bytes, deleteImage, fetchRange, getApiKey, getJson, htmlSnippet, layerRange, percent,
  renditionUrl, setApiKey, sizesFor, srcsetFor, upload,
} from "./api.js";

const $ = (id) => document.getElementById(id);
const NAMES = "compass-serve.names"; // id -> file name of uploads made in this tab (for alt text)
const STEP_PAUSE_MS = 600; // "Play": long enough to see each layer before the next replaces it
const POLL_MS = 400;

const state = { file: null, manifest: null, costs: null, shown: -1, received: 0, busy: false,
                objectUrl: null, cursor: null, resizeTimer: 0 };

// -- small helpers -------------------------------------------------------------------------------
function say(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

function errorText(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) return `${err.message} Enter it under “Write API key”.`;
    const title = err.problem && err.problem.title ? `${err.problem.title}: ` : "";
    return `${title}${err.message}`;
  }
  return `Network error: ${err.message || err}`;
}

function names() {
  try { return JSON.parse(sessionStorage.getItem(NAMES) || "{}"); } catch { return {}; }
}

function rememberName(id, name) {
  try { sessionStorage.setItem(NAMES, JSON.stringify({ ...names(), [id]: name })); } catch { /* ignore */ }
}

function label(id) {
  const n = names()[id];
  return n ? `“${n}”` : `image ${id.slice(0, 8)}`;
}

function cell(row, text, header = false) {
  const c = document.createElement(header ? "th" : "td");
  if (header) c.scope = "row";
  c.textContent = text;
  row.append(c);
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// -- upload ----------------------------------------------------------------------------------------
function choose(file) {
  state.file = file || null;
  $("file-name").textContent = file ? `${file.name} (${bytes(file.size)})` : "No file chosen";
  $("upload-btn").disabled = !file;
}

function wireUpload() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) choose(f);
  });
  // A file dropped beside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  $("upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!state.file) return;
    const widths = $("widths").value.replace(/\s+/g, "");
    $("upload-btn").disabled = true;
    say(`Uploading ${state.file.name}…`);
    try {
      const { status, body } = await upload(state.file, { quality: $("quality").value, widths });
      rememberName(body.id, state.file.name);
      if (status === 202) say(`Encoding ${state.file.name} (status: pending)…`);
      await openImage(body.id, { focus: true });
      refreshList();
    } catch (err) {
      say(errorText(err), "error");
    } finally {
      $("upload-btn").disabled = !state.file;
    }
  });

  const key = $("api-key");
  key.value = getApiKey();
  key.addEventListener("input", () => setApiKey(key.value.trim()));
  $("key-forget").addEventListener("click", () => { key.value = ""; setApiKey(""); key.focus(); });
  if (key.value) $("key-box").open = true;
}

// -- one image ---------------------------------------------------------------------------------------
async function waitReady(id) {
  const started = performance.now();
  for (;;) {
    const m = await getJson(`/images/${encodeURIComponent(id)}/manifest`);
    if (m.status !== "pending") return m;
    $("image-info").textContent = `Encoding… ${((performance.now() - started) / 1000).toFixed(0)} s`;
    await sleep(POLL_MS);
  }
}

async function openImage(id, { focus = false } = {}) {
  let m;
  try {
    m = await getJson(`/images/${encodeURIComponent(id)}/manifest`);
    if (m.status === "pending") {
      say(`Encoding ${label(id)} (status: pending)…`);
      m = await waitReady(id);
    }
  } catch (err) {
    say(errorText(err), "error");
    return;
  }
  if (m.status === "failed") {
    say(`${label(id)} failed: ${m.reason}`, "error");
    return;
  }
  let costs = null;
  try { costs = await getJson(`/images/${encodeURIComponent(id)}/costs`); } catch { /* table stays without */ }
  state.manifest = m;
  state.costs = costs;
  history.replaceState(null, "", `#${id}`);
  renderManifest();
  resetProgressive();
  renderResponsive();
  $("image-section").hidden = false;
  say(`Ready: ${label(id)}, ${m.layers.length} layers, ${bytes(m.size)} stream.`, "ok");
  if (focus) $("image-h").focus();
}

function renderManifest() {
  const m = state.manifest;
  $("image-id").textContent = m.id.slice(0, 12);
  $("image-id").title = m.id;
  const top = m.layers[m.layers.length - 1];
  $("image-info").textContent = `${label(m.id)}: ${m.width}×${m.height} px, ${m.source_format} upload of `
    + `${bytes(m.source_bytes)}; model ${m.model}, quality ${m.quality}; stream ${bytes(m.size)} `
    + `(header ${bytes(m.header_length)}), top layer ${top.width}×${top.height}.`;
  const body = $("layer-table").tBodies[0];
  body.replaceChildren();
  const head = document.createElement("tr");
  cell(head, "header", true);
  cell(head, "–");
  cell(head, bytes(m.header_length));
  cell(head, `0–${m.header_length - 1}`);
  cell(head, percent(m.header_length, m.size));
  body.append(head);
  for (const la of m.layers) {
    const tr = document.createElement("tr");
    cell(tr, String(la.index), true);
    cell(tr, `${la.width}×${la.height}`);
    cell(tr, bytes(la.length));
    cell(tr, `${la.byte_start}–${la.byte_end}`);
    const share = cell(tr, "");
    const meter = document.createElement("span");
    meter.className = "share";
    meter.style.setProperty("--share", `${(100 * la.length) / m.size}%`);
    meter.setAttribute("aria-hidden", "true");
    share.append(meter, document.createTextNode(percent(la.length, m.size)));
    body.append(tr);
  }
}

// -- progressive delivery ------------------------------------------------------------------------------
function setReceived(n) {
  const m = state.manifest;
  state.received = n;
  $("bytes-bar").max = m.size;
  $("bytes-bar").value = n;
  $("bytes-text").textContent = `${bytes(n)} of ${bytes(m.size)} (${percent(n, m.size)})`;
}

function resetProgressive() {
  state.shown = -1;
  setReceived(0);
  $("steps").tBodies[0].replaceChildren();
  const img = $("progressive");
  img.hidden = true;
  img.removeAttribute("src");
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = null;
  $("progressive-caption").textContent = "Press “Next layer” or “Play all layers”.";
  const c = state.costs;
  $("reference-note").textContent = c && c.recorded
    ? `(JPEG/WebP at quality ${c.output_quality}: ${c.reference}).`
    : "(no JPEG/WebP sizes were recorded for this image).";
  updateStepButtons();
}

function updateStepButtons() {
  const done = !state.manifest || state.shown >= state.manifest.layers.length - 1;
  $("step").disabled = state.busy || done;
  $("play").disabled = state.busy || done;
  $("reset").disabled = state.busy;
}

/** Fetch the next layer's bytes with one Range request, then show the server's decode of that prefix. */
async function nextLayer() {
  const m = state.manifest;
  const k = state.shown + 1;
  if (k >= m.layers.length) return;
  const la = m.layers[k];
  const range = layerRange(m.layers, k);
  const chunk = await fetchRange(`/images/${encodeURIComponent(m.id)}/bitstream`, range.start, range.end,
                                 (n) => setReceived(state.received + n));
  if (k === 0 && String.fromCharCode(...chunk.slice(0, 4)) !== "CMPS") {
    throw new ApiError(206, { detail: "the stream does not start with the CMPS magic" });
  }
  // The decode of exactly layers 0..k: the server picks the fewest layers that reach the width.
  const resp = await fetch(renditionUrl(m.id, la.width, "png"));
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  const blob = await resp.blob();
  const usedLayer = resp.headers.get("X-Compass-Layer");
  const url = URL.createObjectURL(blob);
  const img = $("progressive");
  img.src = url;
  img.alt = `${label(m.id)}, decoded from layers 0 to ${k} (${la.width}×${la.height} px)`;
  img.width = la.width;
  img.height = la.height;
  await img.decode();
  img.hidden = false;
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = url;
  state.shown = k;
  img.dataset.layer = String(k);
  $("progressive-caption").textContent = `Layer ${k} of ${m.layers.length - 1}: ${la.width}×${la.height}, `
    + `${bytes(range.end + 1)} of stream received; picture decoded by the server from layer `
    + `${usedLayer ?? "?"} (${bytes(blob.size)} PNG).`;
  addStepRow(k, range);
}

function addStepRow(k, range) {
  const c = state.costs && state.costs.layers[k];
  const pair = (one, all) => (one === null || one === undefined ? "–" : `${bytes(one)} / ${bytes(all)}`);
  const tr = document.createElement("tr");
  tr.dataset.range = range.header;
  cell(tr, `${k}: ${state.manifest.layers[k].width}×${state.manifest.layers[k].height}`, true);
  cell(tr, range.header).className = "mono";
  cell(tr, bytes(range.end + 1));
  cell(tr, c ? pair(c.jpeg_bytes, c.jpeg_bytes_cumulative) : "–");
  cell(tr, c ? pair(c.webp_bytes, c.webp_bytes_cumulative) : "–");
  // Column names on the cells, for the stacked layout at phone width.
  const names = [...$("steps").tHead.rows[0].cells].map((th) => th.textContent);
  [...tr.cells].forEach((td, i) => { td.dataset.label = names[i]; });
  $("steps").tBodies[0].append(tr);
}

async function runSteps(all) {
  if (state.busy) return;
  state.busy = true;
  updateStepButtons();
  try {
    do {
      await nextLayer();
      if (all && state.shown < state.manifest.layers.length - 1) await sleep(STEP_PAUSE_MS);
    } while (all && state.shown < state.manifest.layers.length - 1);
  } catch (err) {
    say(errorText(err), "error");
  } finally {
    state.busy = false;
    updateStepButtons();
  }
}

// -- responsive renditions -------------------------------------------------------------------------------
function renderResponsive() {
  const m = state.manifest;
  const slider = $("display-width");
  const top = m.layers[m.layers.length - 1];
  slider.min = String(Math.max(16, Math.floor(m.layers[0].width / 2)));
  slider.max = String(Math.max(top.width, m.width));
  slider.value = String(Math.min(Number(slider.value) || 320, top.width));
  updateResponsive();
}

function updateResponsive() {
  const m = state.manifest;
  if (!m) return; // the image was closed or deleted while the slider's timer ran
  const w = Number($("display-width").value);
  $("display-width-out").textContent = `${w} px`;
  // A fresh element each time, so the choice is the one a first page load at this width makes
  // (an existing <img> may keep a larger candidate it already has).
  const old = $("responsive");
  const img = document.createElement("img");
  img.id = "responsive";
  img.alt = `${label(m.id)}, responsive rendition`;
  img.sizes = sizesFor(w);
  img.srcset = srcsetFor(m.id, m.layers);
  img.src = renditionUrl(m.id, m.layers[m.layers.length - 1].width);
  img.style.width = `${w}px`;
  img.addEventListener("load", () => {
    const chosen = new URL(img.currentSrc).searchParams.get("width");
    img.dataset.chosen = chosen;
    $("responsive-info").textContent = `Shown ${Math.round(img.getBoundingClientRect().width)} CSS px wide at `
      + `device pixel ratio ${window.devicePixelRatio}: the browser chose width=${chosen} `
      + `(natural width ${img.naturalWidth} px).`;
  });
  old.replaceWith(img);
  $("snippet").value = htmlSnippet({ id: m.id, layers: m.layers, width: m.width, height: m.height,
                                     displayWidth: w, alt: "describe the image here",
                                     origin: location.origin });
}

function wireImage() {
  $("step").addEventListener("click", () => runSteps(false));
  $("play").addEventListener("click", () => runSteps(true));
  $("reset").addEventListener("click", () => { if (!state.busy) resetProgressive(); });
  $("display-width").addEventListener("input", () => {
    clearTimeout(state.resizeTimer);
    state.resizeTimer = setTimeout(updateResponsive, 120); // not one request per slider pixel
  });
  $("copy").addEventListener("click", async () => {
    const ta = $("snippet");
    try {
      await navigator.clipboard.writeText(ta.value);
      say("Snippet copied.", "ok");
    } catch {
      ta.select(); // clipboard blocked (insecure origin): leave it selected for Ctrl+C
      say("Snippet selected: press Ctrl+C (or ⌘C) to copy.");
    }
  });
  $("delete-current").addEventListener("click", () => state.manifest && remove(state.manifest.id));
}

// -- browse and delete ------------------------------------------------------------------------------------
async function remove(id) {
  if (!window.confirm(`Delete ${label(id)}? Its stream and cached renditions are removed.`)) return;
  // Renditions of it still loading (a thumbnail, the responsive picture) could only end in a 404 once it
  // is gone: cancel them first.
  const stopped = stopRenditionLoads(id);
  try {
    await deleteImage(id);
  } catch (err) {
    say(errorText(err), "error");
    if (stopped && state.manifest && state.manifest.id === id) updateResponsive();
    if (stopped) refreshList();
    return;
  }
  say(`Deleted ${label(id)}.`, "ok");
  if (state.manifest && state.manifest.id === id) {
    state.manifest = null;
    $("image-section").hidden = true;
    history.replaceState(null, "", location.pathname);
  }
  refreshList();
}

/** Drop the source of every <img> showing a rendition of `id` (which aborts a load in flight). */
function stopRenditionLoads(id) {
  const path = renditionUrl(id, 1).split("?")[0];
  let n = 0;
  for (const img of document.querySelectorAll("img[src]")) {
    if (new URL(img.src, location.href).pathname !== path) continue;
    img.removeAttribute("srcset");
    img.removeAttribute("src");
    n += 1;
  }
  return n > 0;
}

function listItem(item) {
  const li = document.createElement("li");
  li.dataset.id = item.id;
  if (item.status === "ready") {
    const img = document.createElement("img");
    img.src = renditionUrl(item.id, Math.min(96, item.width));
    img.alt = `Thumbnail of ${label(item.id)}`;
    img.width = 96;
    img.height = Math.max(1, Math.round((96 * item.height) / item.width));
    img.loading = "lazy";
    li.append(img);
  } else {
    const ph = document.createElement("span");
    ph.className = "thumb-placeholder";
    ph.textContent = item.status;
    li.append(ph);
  }
  const text = document.createElement("span");
  text.className = "item-text";
  text.textContent = `${label(item.id)} · ${item.width}×${item.height} · q ${item.quality} · `
    + `${item.status === "ready" ? bytes(item.size) : item.status}`;
  const view = document.createElement("button");
  view.type = "button";
  view.textContent = "View";
  view.setAttribute("aria-label", `View ${label(item.id)}`);
  view.disabled = item.status === "failed";
  view.addEventListener("click", () => openImage(item.id, { focus: true }));
  const del = document.createElement("button");
  del.type = "button";
  del.className = "danger";
  del.textContent = "Delete";
  del.setAttribute("aria-label", `Delete ${label(item.id)}`);
  del.addEventListener("click", () => remove(item.id));
  li.append(text, view, del);
  return li;
}

async function refreshList(append = false) {
  const list = $("image-list");
  const q = new URLSearchParams({ limit: "12" });
  if (append && state.cursor) q.set("cursor", state.cursor);
  let page;
  try { page = await getJson(`/images?${q}`); } catch (err) { say(errorText(err), "error"); return; }
  if (!append) list.replaceChildren();
  list.append(...page.items.map(listItem));
  state.cursor = page.next_cursor;
  $("more").hidden = !page.next_cursor;
  $("list-empty").hidden = list.children.length > 0;
}

/** The quality field follows the encoder's model (GET /model): its range and its default. */
async function loadModel() {
  let m;
  try { m = await getJson("/model"); } catch { return; } // field stays empty: the server's default
  const q = $("quality");
  q.max = String(m.qualities);
  if (!q.value) q.value = String(m.default_quality);
  $("quality-help").textContent =
    `1 = fewest bytes, ${m.qualities} = best (model ${m.name}); fractions allowed.`;
}

// -- start --------------------------------------------------------------------------------------------------
loadModel();
wireUpload();
wireImage();
$("refresh").addEventListener("click", () => refreshList());
$("more").addEventListener("click", () => refreshList(true));
refreshList();
if (location.hash.length > 1) openImage(decodeURIComponent(location.hash.slice(1)));
