// The service's HTTP API as the page uses it: plain fetch, no framework.
// Pure helpers (ranges, srcset, formatting) are exported separately from the DOM code.

const KEY_STORAGE = "compass-serve.api-key";

export function getApiKey() {
  try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lives only as long as the field */ }
}

/** An error answer of the service (RFC 9457 problem document) or of the network. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.detail ? problem.detail : `HTTP ${status}`);
    this.status = status;
    this.problem = problem || null;
  }
}

async function fail(resp) {
  let problem = null;
  try { problem = await resp.json(); } catch { /* not JSON */ }
  throw new ApiError(resp.status, problem);
}

function writeHeaders() {
  const key = getApiKey();
  return key ? { "X-API-Key": key } : {};
}

export async function getJson(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" } });
  if (!resp.ok) await fail(resp);
  return resp.json();
}

/** POST /images as multipart; resolves to { status, body } (202 pending, 200/201 ready). */
export async function upload(file, { quality, widths }) {
  const params = new URLSearchParams();
  if (quality) params.set("quality", String(quality));
  if (widths) params.set("widths", widths);
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  const resp = await fetch(`/images?${params}`, { method: "POST", body: form, headers: writeHeaders() });
  if (!resp.ok) await fail(resp);
  return { status: resp.status, body: await resp.json() };
}

export async function deleteImage(id) {
  const resp = await fetch(`/images/${encodeURIComponent(id)}`, { method: "DELETE", headers: writeHeaders() });
  if (!resp.ok) await fail(resp);
}

/**
 * The Range request that fetches layer k on top of layers 0..k-1: its own bytes, except that
 * layer 0 also takes the container header before it (bytes 0..). `byte_end` is inclusive.
 */
export function layerRange(layers, k) {
  const start = k === 0 ? 0 : layers[k].byte_start;
  return { start, end: layers[k].byte_end, header: `bytes=${start}-${layers[k].byte_end}` };
}

/**
 * Fetch bytes start..end (inclusive) of a URL with one Range request, reporting each chunk's
 * size as it arrives (so a progress bar fills with the network, not after it).
 */
export async function fetchRange(url, start, end, onChunk) {
  const resp = await fetch(url, { headers: { Range: `bytes=${start}-${end}` } });
  if (resp.status !== 206) {
    if (!resp.ok) await fail(resp);
    throw new ApiError(resp.status, { detail: `expected 206 Partial Content, got ${resp.status}` });
  }
  const expected = end - start + 1;
  const out = new Uint8Array(expected);
  let got = 0;
  const reader = resp.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (got + value.length > expected) throw new ApiError(206, { detail: "the server sent more bytes than asked for" });
    out.set(value, got);
    got += value.length;
    if (onChunk) onChunk(value.length);
  }
  if (got !== expected) throw new ApiError(206, { detail: `short response: ${got} of ${expected} bytes` });
  return out;
}

/** `?width=` rendition URL of an image. */
export function renditionUrl(id, width, format) {
  const q = new URLSearchParams({ width: String(width) });
  if (format) q.set("format", format);
  return `/images/${encodeURIComponent(id)}?${q}`;
}

/** srcset candidates: one rendition per distinct layer width, the cheapest reaching each width. */
export function srcsetFor(id, layers, origin = "") {
  const widths = [...new Set(layers.map((l) => l.width))].sort((a, b) => a - b);
  return widths.map((w) => `${origin}${renditionUrl(id, w)} ${w}w`).join(", ");
}

/** `sizes` for an image shown at `px` CSS pixels, or the full viewport width when that is narrower. */
export function sizesFor(px) {
  return `(max-width: ${px}px) 100vw, ${px}px`;
}

export function htmlSnippet({ id, layers, width, height, displayWidth, alt, origin }) {
  const top = layers[layers.length - 1];
  const h = Math.max(1, Math.round((height * displayWidth) / width));
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/"/g, "&quot;").replace(/</g, "&lt;");
  return [
    `<img src="${esc(origin + renditionUrl(id, Math.min(displayWidth, top.width)))}"`,
    `     srcset="${esc(srcsetFor(id, layers, origin))}"`,
    `     sizes="${sizesFor(displayWidth)}"`,
    `     width="${displayWidth}" height="${h}" alt="${esc(alt)}" loading="lazy" decoding="async">`,
  ].join("\n");
}

const NUM = new Intl.NumberFormat("en");

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  return `${NUM.format(n)} B`;
}

export function percent(part, whole) {
  return whole ? `${((100 * part) / whole).toFixed(1)} %` : "–";
}
