// The simsearch web page: plain DOM code over the JSON API of `simsearch serve` (no build step, no framework).
// Every string that comes from the db (a file name can hold any character) is set with textContent or as an
// attribute, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  k: 10,
  encoder: null,            // null: the db's default encoder
  query: null,              // {kind: "upload", file, url} | {kind: "item", id, path}
  searchSeq: 0,             // a newer search makes the answer of an older one stale
  browse: { offset: 0, limit: 48, q: "", total: 0, seq: 0 },
  dupesLoaded: false,
  explainSeq: 0,            // as searchSeq, for the explanation overlay
  explainUrl: null,         // object URL of the overlay shown, revoked when replaced
};

// ---------- API ----------

// One-line text of a FastAPI error body: {"detail": "reason"} or a validation list [{loc, msg}, ...].
function detailText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg ? `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}` : String(d)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

async function api(url, options) {
  let res;
  try {
    res = await fetch(url, options);
  } catch (e) {
    throw new Error(`cannot reach the simsearch server (${e.message})`);
  }
  if (!res.ok) {
    let text = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (body && body.detail !== undefined) text = detailText(body.detail);
    } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(text);
  }
  return res;
}

const getJSON = async (url, options) => (await api(url, options)).json();

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// ---------- small DOM helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const plural = (n, one, many = `${one}s`) => `${n.toLocaleString("en-US")} ${n === 1 ? one : many}`;
const baseName = (path) => path.split(/[\\/]/).pop() || path;
const thumbUrl = (id) => `/api/items/${encodeURIComponent(id)}/thumbnail`;
const imageUrl = (id) => `/api/items/${encodeURIComponent(id)}/image`;

function formatBytes(n) {
  if (!n) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

// A thumbnail card of one item: the picture searches from it, the name opens the original file.
function itemCard(id, path, testid) {
  const img = el("img", { src: thumbUrl(id), alt: baseName(path), loading: "lazy", decoding: "async" });
  const thumb = el("button", { class: "thumb", type: "button", title: "search from this image",
    "data-testid": "search-from", onclick: () => searchItem(id, path) }, img);
  const name = el("a", { class: "name", href: imageUrl(id), target: "_blank", rel: "noopener", title: path,
    text: baseName(path) });
  const card = el("figure", { class: "card", "data-testid": testid, "data-id": String(id) }, thumb);
  const caption = el("figcaption", {}, name);
  card.append(caption);
  return { card, caption };
}

// ---------- search ----------

function setQuery(query, imgSrc, label) {
  if (state.query && state.query.kind === "upload" && state.query !== query) URL.revokeObjectURL(state.query.url);
  state.query = query;
  $("query-img").src = imgSrc;  // alt stays empty: the name is written beside it (and a broken upload shows no text)
  $("query-name").textContent = label;
  $("query-name").title = query.kind === "item" ? query.path : label;
  $("query").hidden = false;
  $("dropzone").classList.add("compact");
}

async function runSearch(request) {
  const seq = ++state.searchSeq;
  const grid = $("results");
  grid.dataset.state = "loading";
  grid.classList.add("loading");
  $("search-status").textContent = "searching…";
  clearError();
  const t0 = performance.now();
  try {
    const body = await request();
    if (seq !== state.searchSeq) return;
    renderHits(body.hits);
    const ms = Math.round(performance.now() - t0);
    $("search-status").textContent = `${plural(body.hits.length, "result")} in ${ms} ms`;
    grid.dataset.state = "done";
  } catch (e) {
    if (seq !== state.searchSeq) return;
    grid.replaceChildren();  // the hits of the previous query would read as this one's
    $("results-empty").hidden = true;
    grid.dataset.state = "error";
    $("search-status").textContent = "";
    showError(e.message);
  } finally {
    if (seq === state.searchSeq) grid.classList.remove("loading");
  }
}

function searchParams(extra = {}) {
  const params = new URLSearchParams({ k: String(state.k), ...extra });
  if (state.encoder) params.set("encoder", state.encoder);
  return params;
}

function searchUpload(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type})`);
    return;
  }
  const url = URL.createObjectURL(file);
  setQuery({ kind: "upload", file, url }, url, file.name || "pasted image");
  showView("search");
  runSearch(() => {
    const form = new FormData();
    form.append("image", file, file.name || "pasted.png");
    return getJSON(`/api/query?${searchParams()}`, { method: "POST", body: form });
  });
}

function searchItem(id, path) {
  setQuery({ kind: "item", id, path }, thumbUrl(id), baseName(path));
  showView("search");
  window.scrollTo({ top: 0 });
  runSearch(() => getJSON(`/api/items/${encodeURIComponent(id)}/similar?${searchParams()}`));
}

function rerun() {
  const q = state.query;
  if (!q) return;
  if (q.kind === "upload") searchUpload(q.file);
  else searchItem(q.id, q.path);
}

function renderHits(hits) {
  const grid = $("results");
  const cards = hits.map((hit) => {
    const { card, caption } = itemCard(hit.id, hit.path, "hit");
    card.dataset.rank = String(hit.rank);
    card.dataset.score = String(hit.score);
    const score = hit.rerank_score === null || hit.rerank_score === undefined
      ? hit.score.toFixed(3) : `${hit.rerank_score.toFixed(3)} (cosine ${hit.score.toFixed(3)})`;
    const meter = el("span", { class: "meter" }, el("span", { style: `width:${Math.max(0, hit.score) * 100}%` }));
    const why = el("button", { class: "why", type: "button", "data-testid": "why",
      title: "which parts of the two images made them match", text: "why?",
      onclick: () => explain(hit) });
    caption.prepend(el("div", { class: "meta" },
      el("span", { class: "rank", text: `#${hit.rank}` }),
      el("span", { class: "score", "data-testid": "score", text: score }), why), meter);
    return card;
  });
  grid.replaceChildren(...cards);
  $("results-empty").hidden = hits.length > 0;
  if (!hits.length) $("results-empty").textContent = "No results: the db has no items for this encoder yet.";
}

// ---------- explanation overlay ----------

async function explain(hit) {
  const q = state.query;
  if (!q) return;
  const seq = ++state.explainSeq;
  const modal = $("explain");
  const img = $("explain-img");
  img.hidden = true;
  img.removeAttribute("src");
  $("explain-caption").textContent = `${q.kind === "item" ? baseName(q.path) : q.file.name || "your image"}`
    + `  vs  ${baseName(hit.path)}`;
  $("explain-status").textContent = "explaining…";
  modal.dataset.state = "loading";
  modal.hidden = false;
  $("explain-close").focus();
  try {
    let res;
    if (q.kind === "item") {
      res = await api(`/api/explain?${new URLSearchParams({ a: q.id, b: hit.id, format: "png" })}`);
    } else {
      const form = new FormData();
      form.append("image", q.file, q.file.name || "pasted.png");
      res = await api(`/api/explain?${new URLSearchParams({ b: hit.id, format: "png" })}`,
        { method: "POST", body: form });
    }
    const blob = await res.blob();
    if (modal.hidden || seq !== state.explainSeq) return;  // closed, or another asked, while it was computed
    if (state.explainUrl) URL.revokeObjectURL(state.explainUrl);
    state.explainUrl = URL.createObjectURL(blob);
    img.onload = () => { modal.dataset.state = "done"; };
    img.src = state.explainUrl;
    img.hidden = false;
    $("explain-status").textContent = "Warmer colours: the parts of each image that contributed most to the match.";
  } catch (e) {
    if (seq !== state.explainSeq) return;
    modal.dataset.state = "error";
    $("explain-status").textContent = "";
    closeExplain();
    showError(`explain: ${e.message}`);
  }
}

function closeExplain() {
  $("explain").hidden = true;
}

// ---------- browse ----------

async function loadBrowse() {
  const b = state.browse;
  const seq = ++b.seq;
  const grid = $("browse-grid");
  grid.dataset.state = "loading";
  clearError();
  try {
    const params = new URLSearchParams({ offset: String(b.offset), limit: String(b.limit), q: b.q });
    const body = await getJSON(`/api/items?${params}`);
    if (seq !== b.seq) return;
    b.total = body.total;
    grid.replaceChildren(...body.items.map((item) => itemCard(item.id, item.path, "browse-item").card));
    const first = body.items.length ? body.offset + 1 : 0;
    const filter = b.q ? ` matching “${b.q}”` : "";
    $("browse-status").textContent = `${first}–${body.offset + body.items.length} of `
      + `${body.total.toLocaleString("en-US")}${filter}`;
    $("browse-prev").disabled = body.offset <= 0;
    $("browse-next").disabled = body.offset + body.items.length >= body.total;
    grid.dataset.state = "done";
  } catch (e) {
    if (seq !== b.seq) return;
    grid.dataset.state = "error";
    showError(e.message);
  }
}

let filterTimer = null;
function onFilterInput() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    state.browse.q = $("browse-filter").value;
    state.browse.offset = 0;
    loadBrowse();
  }, 250);
}

// ---------- duplicates ----------

async function loadDupes() {
  const list = $("dupes-list");
  const threshold = $("dupes-threshold").value.trim();
  list.dataset.state = "loading";
  $("dupes-status").textContent = "looking for near-duplicates…";
  $("dupes-run").disabled = true;
  clearError();
  try {
    const params = new URLSearchParams(threshold ? { threshold } : {});
    const body = await getJSON(`/api/dupes?${params}`);
    state.dupesLoaded = true;
    list.replaceChildren(...body.groups.map(dupeGroup));
    const spare = body.groups.reduce((n, g) => n + g.others.length, 0);
    const spareBytes = body.groups.reduce((n, g) => n + g.others.reduce((m, o) => m + (o.bytes || 0), 0), 0);
    $("dupes-status").textContent = body.groups.length
      ? `${plural(body.groups.length, "group")} at similarity ≥ ${body.threshold.toFixed(3)}: `
        + `${plural(spare, "copy", "copies")}`
        + (spareBytes ? `, ${formatBytes(spareBytes)}` : "") + " could go"
      : `no near-duplicates at similarity ≥ ${body.threshold.toFixed(3)}`;
    if (!threshold) $("dupes-threshold").placeholder = body.threshold.toFixed(3);  // the calibrated default
    list.dataset.state = "done";
  } catch (e) {
    list.dataset.state = "error";
    $("dupes-status").textContent = "";
    showError(e.message);
  } finally {
    $("dupes-run").disabled = false;
  }
}

function dupeCard(item, role) {
  const { card, caption } = itemCard(item.id, item.path, role === "keep" ? "dupe-keeper" : "dupe-other");
  const size = [item.width && item.height ? `${item.width}×${item.height}` : "", formatBytes(item.bytes)]
    .filter(Boolean).join(" · ");
  caption.prepend(el("div", { class: "meta" },
    el("span", { class: `badge ${role}`, text: role === "keep" ? "keep" : "copy" }),
    el("span", { class: "muted small", text: size })));
  return card;
}

function dupeGroup(group, i) {
  const n = group.others.length + 1;
  return el("section", { class: "group", "data-testid": "dupe-group" },
    el("h3", { text: `Group ${i + 1} · ${n} images · similarity ≥ ${group.min_score.toFixed(3)}` }),
    el("div", { class: "grid" }, dupeCard(group.keeper, "keep"), ...group.others.map((o) => dupeCard(o, "copy"))));
}

// ---------- views ----------

function showView(name) {
  if (!["search", "browse", "dupes"].includes(name)) name = "search";
  for (const view of ["search", "browse", "dupes"]) {
    $(`view-${view}`).hidden = view !== name;
    $(`tab-${view}`).classList.toggle("active", view === name);
    $(`tab-${view}`).setAttribute("aria-selected", String(view === name));
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "browse" && $("browse-grid").dataset.state === "empty") loadBrowse();
  if (name === "dupes" && !state.dupesLoaded && $("dupes-list").dataset.state === "empty") loadDupes();
}

// The server follows a running `simsearch index`: re-read the db's summary when its generation moves.
let generation = null;
async function watchGeneration() {
  if (document.hidden) return;
  try {
    const health = await getJSON("/api/health");
    if (generation !== null && health.generation !== generation) loadInfo();
    generation = health.generation;
  } catch (_) { /* a passing outage: the next request that matters reports it */ }
}

async function loadInfo() {
  try {
    const info = await getJSON("/api/info");
    generation = info.generation;
    const names = Object.keys(info.encoders);
    const enc = info.encoders[info.default_encoder];
    $("db-info").textContent = `${plural(info.items, "image")} · ${info.default_encoder}`
      + (enc ? ` · ${enc.index_type}` : "");
    $("db-info").title = info.db;
    if (names.length > 1) {
      const select = $("encoder");
      select.replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
      select.value = info.default_encoder;
      $("encoder-label").hidden = false;
    }
  } catch (e) {
    showError(e.message);
  }
}

// ---------- wiring ----------

function init() {
  const drop = $("dropzone");
  $("file-input").addEventListener("change", (e) => {
    searchUpload(e.target.files[0]);
    e.target.value = "";  // choosing the same file again searches again
  });
  // Drop anywhere on the page: the drop zone lights up while a file is dragged over the window.
  let depth = 0;
  window.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; drop.classList.add("over"); });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.classList.remove("over");
  });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    const file = [...(e.dataTransfer ? e.dataTransfer.files : [])].find((f) => f.type.startsWith("image/"))
      || (e.dataTransfer && e.dataTransfer.files[0]);
    if (file) searchUpload(file);
  });
  window.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) searchUpload(item.getAsFile());
  });

  $("k").addEventListener("change", (e) => { state.k = Number(e.target.value); rerun(); });
  $("encoder").addEventListener("change", (e) => { state.encoder = e.target.value; rerun(); });
  $("error-close").addEventListener("click", clearError);

  $("explain-close").addEventListener("click", closeExplain);
  $("explain").addEventListener("click", (e) => { if (e.target === $("explain")) closeExplain(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeExplain(); });

  $("browse-filter").addEventListener("input", onFilterInput);
  $("browse-prev").addEventListener("click", () => {
    state.browse.offset = Math.max(0, state.browse.offset - state.browse.limit);
    loadBrowse();
  });
  $("browse-next").addEventListener("click", () => { state.browse.offset += state.browse.limit; loadBrowse(); });

  $("dupes-form").addEventListener("submit", (e) => { e.preventDefault(); loadDupes(); });

  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  showView(location.hash.slice(1) || "search");
  loadInfo();
  setInterval(watchGeneration, 10_000);
}

init();
