// The simsearch web page: plain DOM code over the JSON API of `simsearch serve` (no build step, no framework).
// Every string that comes from the db (a file name can hold any character) is set with textContent or as an
// attribute, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  k: 10,
  encoder: null,            // null: the db's default encoder
  info: null,               // /api/info: which encoders have a text tower
  // The current query: an uploaded image (or none) and terms, each {kind: "text" | "minus" | "like" | "unlike",
  // value: words or an item id, label}; null when nothing is asked.
  query: null,              // {upload: {file, url, name} | null, terms: [...]}
  under: "",                // folder filter: only items under this folder (or matching this glob)
  searchSeq: 0,             // a newer search makes the answer of an older one stale
  browse: { offset: 0, limit: 48, q: "", total: 0, seq: 0 },
  dupesLoaded: false,
  dupes: null,              // the duplicates view: the groups found and the user's decision (see loadDupes)
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

const TERM_PARAM = { text: "text", minus: "minus", like: "like", unlike: "unlike" };

// The box's words as terms: " - " before words searches away from them, " + " (or nothing) towards them; a "-"
// inside a word ("t-shirt") is part of it.
function parseWords(text) {
  const pieces = text.trim().split(/(?:^|\s)([+-])(?=\s|$)/);  // [words, sign, words, sign, ...]
  const terms = [];
  let sign = "+";
  pieces.forEach((piece, i) => {
    if (i % 2) { sign = piece; return; }
    const words = piece.trim();
    if (words) terms.push({ kind: sign === "-" ? "minus" : "text", value: words, label: words });
  });
  return terms;
}

const sameTerm = (a, b) => a.kind === b.kind && a.value === b.value;

// What the query panel shows: the upload, else the first item searched towards, else the first words.
function headOf(query) {
  if (query.upload) return { src: query.upload.url, label: query.upload.name, title: query.upload.name };
  const item = query.terms.find((t) => t.kind === "like");
  if (item) return { src: thumbUrl(item.value), label: item.label, title: item.path };
  const words = query.terms.find((t) => t.kind === "text") || query.terms[0];
  return { src: null, label: words.kind === "minus" ? `not “${words.label}”` : words.label, title: words.label };
}

// The image "why?" explains a hit against: the upload, else the first item searched towards (none for words only).
function explainSource(query) {
  if (!query) return null;
  if (query.upload) return { upload: query.upload };
  const item = query.terms.find((t) => t.kind === "like");
  return item ? { id: item.value, label: item.label } : null;
}

function newQuery(upload, terms) {
  const old = state.query;
  if (old && old.upload && (!upload || old.upload.url !== upload.url)) URL.revokeObjectURL(old.upload.url);
  state.query = { upload, terms };
  showView("search");
  runQuery();
}

function renderQuery() {
  const q = state.query;
  $("query").hidden = !q;
  $("dropzone").classList.toggle("compact", Boolean(q));
  $("terms").hidden = !q;
  $("text-add").disabled = !q;
  if (!q) {
    $("terms").replaceChildren();
    return;
  }
  const head = headOf(q);
  $("query-img").hidden = !head.src;
  if (head.src) $("query-img").src = head.src;  // alt stays empty: the name is written beside it
  const byImage = q.upload || q.terms.some((t) => t.kind === "like");
  $("query-lead").textContent = byImage ? "Most similar to" : "Best matches for";
  $("query-name").textContent = head.label;
  $("query-name").title = head.title || head.label;
  const chips = [];
  if (q.upload) {
    chips.push(termChip("image", `image ${q.upload.name}`, null, () => {
      URL.revokeObjectURL(q.upload.url);
      q.upload = null;
    }));
  }
  q.terms.forEach((term) => {
    const label = { text: `“${term.label}”`, minus: `not “${term.label}”`, like: `like ${term.label}`,
      unlike: `not like ${term.label}` }[term.kind];
    const thumb = term.kind === "like" || term.kind === "unlike" ? term.value : null;
    chips.push(termChip(term.kind, label, thumb, () => { q.terms = q.terms.filter((t) => t !== term); },
      term.value));
  });
  $("terms").replaceChildren(el("span", { class: "muted small", text: "query:" }), ...chips);
}

// One term of the query as a chip; its × removes the term and searches again.
function termChip(kind, label, thumbId, remove, value = "") {
  const chip = el("span", { class: `term ${kind}`, "data-testid": "term", "data-kind": kind,
    "data-value": String(value) });
  if (thumbId !== null) chip.append(el("img", { src: thumbUrl(thumbId), alt: "" }));
  chip.append(el("span", { class: "term-label", text: label, title: label }),
    el("button", { class: "icon", type: "button", "data-testid": "term-remove", "aria-label": `remove ${label}`,
      title: "remove from the query", text: "×", onclick: () => { remove(); afterRemove(); } }));
  return chip;
}

function afterRemove() {
  const q = state.query;
  if (q && !q.upload && !q.terms.length) {
    state.query = null;
    state.searchSeq += 1;  // an answer still on its way belongs to a query that is gone
    renderQuery();
    $("results").replaceChildren();
    $("results").dataset.state = "empty";
    $("results-empty").hidden = false;
    $("search-status").textContent = "";
    return;
  }
  runQuery();
}

function searchParams(extra = {}) {
  const params = new URLSearchParams({ k: String(state.k), ...extra });
  if (state.encoder) params.set("encoder", state.encoder);
  return params;
}

// The request for the current query: an upload goes with its terms to POST /api/query; one item alone is
// "similar" (the item itself first); anything else is GET /api/search.
function queryRequest() {
  const q = state.query;
  const params = searchParams();
  for (const term of q.terms) params.append(TERM_PARAM[term.kind], String(term.value));
  if (state.under) params.set("under", state.under);
  if (q.upload) {
    return () => {
      const form = new FormData();
      form.append("image", q.upload.file, q.upload.file.name || "pasted.png");
      return getJSON(`/api/query?${params}`, { method: "POST", body: form });
    };
  }
  if (q.terms.length === 1 && q.terms[0].kind === "like" && !state.under) {
    const id = q.terms[0].value;
    return () => getJSON(`/api/items/${encodeURIComponent(id)}/similar?${searchParams()}`);
  }
  return () => getJSON(`/api/search?${params}`);
}

function runQuery() {
  if (!state.query) return;
  renderQuery();
  runSearch(queryRequest());
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

function searchUpload(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type})`);
    return;
  }
  newQuery({ file, url: URL.createObjectURL(file), name: file.name || "pasted image" }, []);
}

function searchItem(id, path) {
  window.scrollTo({ top: 0 });
  newQuery(null, [{ kind: "like", value: id, label: baseName(path), path }]);
}

// The words in the box: a new query (Search), or more terms of the current one (Add to query).
function searchWords(add) {
  const terms = parseWords($("text-input").value);
  if (!terms.length) return;
  if (add && state.query) {
    const q = state.query;
    q.terms = q.terms.concat(terms.filter((t) => !q.terms.some((u) => sameTerm(t, u))));
    $("text-input").value = "";  // the words are in the query's terms now
    runQuery();
  } else {
    newQuery(null, terms);
  }
}

// "more like this" / "less like this" on a hit: the current query with the hit added towards or away from it
// (replacing the opposite term of the same item).
function refine(kind, hit) {
  const q = state.query;
  if (!q) return;
  const opposite = kind === "like" ? "unlike" : "like";
  q.terms = q.terms.filter((t) => !((t.kind === kind || t.kind === opposite) && t.value === hit.id));
  q.terms.push({ kind, value: hit.id, label: baseName(hit.path), path: hit.path });
  runQuery();
}

function renderHits(hits) {
  const grid = $("results");
  const canExplain = explainSource(state.query) !== null;
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
    why.hidden = !canExplain;  // words have no picture to compare with
    caption.prepend(el("div", { class: "meta" },
      el("span", { class: "rank", text: `#${hit.rank}` }),
      el("span", { class: "score", "data-testid": "score", text: score }), why), meter,
    el("div", { class: "refine" },
      el("button", { type: "button", "data-testid": "more-like", title: "more like this: refine the query towards it",
        text: "+ more", onclick: () => refine("like", hit) }),
      el("button", { type: "button", "data-testid": "less-like", title: "less like this: refine the query away from it",
        text: "− less", onclick: () => refine("unlike", hit) })));
    return card;
  });
  grid.replaceChildren(...cards);
  // The folders of the hits, offered to the folder filter.
  const folders = [...new Set(hits.map((h) => h.path.slice(0, Math.max(h.path.lastIndexOf("/"), 1))))];
  $("folders").replaceChildren(...folders.map((f) => el("option", { value: f })));
  $("results-empty").hidden = hits.length > 0;
  if (!hits.length) {
    $("results-empty").textContent = state.under ? `No results under ${state.under}.`
      : "No results: the db has no items for this encoder yet.";
  }
}

function updateTextBox() {
  const info = state.info;
  const enc = info && info.encoders[state.encoder || info.default_encoder];
  $("text-form").hidden = !(enc && enc.text);
}

// ---------- explanation overlay ----------

async function explain(hit) {
  const source = explainSource(state.query);
  if (!source) return;
  const seq = ++state.explainSeq;
  const modal = $("explain");
  const img = $("explain-img");
  img.hidden = true;
  img.removeAttribute("src");
  $("explain-caption").textContent = `${source.upload ? source.upload.name : source.label}  vs  ${baseName(hit.path)}`;
  $("explain-status").textContent = "explaining…";
  modal.dataset.state = "loading";
  modal.hidden = false;
  $("explain-close").focus();
  try {
    let res;
    const encoder = state.encoder ? { encoder: state.encoder } : {};
    if (!source.upload) {
      res = await api(`/api/explain?${new URLSearchParams({ a: source.id, b: hit.id, format: "png", ...encoder })}`);
    } else {
      const { file } = source.upload;
      const form = new FormData();
      form.append("image", file, file.name || "pasted.png");
      res = await api(`/api/explain?${new URLSearchParams({ b: hit.id, format: "png", ...encoder })}`,
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

// The tiers of /api/dupes: the same pixels, a verified edited copy (crop, frame, thumbnail, recompression, mirror,
// grey...), or only near in the embedding (bursts, retakes). An answer without a tier reads as "similar": nothing
// says it was verified.
const TIER_LABEL = { exact: "exact copy", edited: "edited copy", similar: "similar" };
const tierOf = (tier) => (Object.hasOwn(TIER_LABEL, tier) ? tier : "similar");
const DECISION_COLUMNS = ["group", "tier", "role", "id", "path", "width", "height", "bytes"];

// state.dupes: {body, groups: [{data (the API's group), n (1-based), tier, keep (id), chosen, node, moved: Map id ->
// new path}]}. A chosen group's images other than its keeper are the ones to move ("remove" in the export); a
// group not chosen keeps everything. Groups that are only similar start unchosen: nothing verified them as copies.
const members = (g) => [g.data.keeper, ...g.data.others];
const roleOf = (g, id) => (g.chosen && id !== g.keep ? "remove" : "keep");

async function loadDupes() {
  const list = $("dupes-list");
  const threshold = $("dupes-threshold").value.trim();
  list.dataset.state = "loading";
  $("dupes-status").textContent = "looking for duplicates…";
  $("dupes-run").disabled = true;
  clearError();
  try {
    const params = new URLSearchParams(threshold ? { threshold } : {});
    if ($("dupes-similar").checked) params.set("similar", "true");
    if (state.encoder) params.set("encoder", state.encoder);
    const body = await getJSON(`/api/dupes?${params}`);
    state.dupesLoaded = true;
    state.dupes = {
      body,
      groups: body.groups.map((data, i) => ({ data, n: i + 1, tier: tierOf(data.tier), keep: data.keeper.id,
        chosen: tierOf(data.tier) !== "similar", node: null, moved: new Map() })),
    };
    list.replaceChildren(...state.dupes.groups.map(dupeGroup));
    const tiers = Object.entries(TIER_LABEL).map(([t, label]) => [label, state.dupes.groups.filter((g) => g.tier === t)
      .length]).filter(([, n]) => n).map(([label, n]) => `${n} ${label}`).join(", ");
    const similar = body.similar || Boolean(threshold);
    $("dupes-status").textContent = (body.groups.length ? `${plural(body.groups.length, "group")} (${tiers})`
      : "no duplicates") + (similar ? ` · similar at ≥ ${Number(body.threshold).toFixed(3)}` : "");
    if (!threshold && typeof body.threshold === "number") {
      $("dupes-threshold").placeholder = body.threshold.toFixed(3);  // the calibrated default
    }
    $("dupes-actions").hidden = !body.groups.length;
    $("dupes-move-status").textContent = "";
    $("dupes-move-status").dataset.state = "empty";
    updateDupesSummary();
    list.dataset.state = "done";
  } catch (e) {
    list.dataset.state = "error";
    $("dupes-status").textContent = "";
    showError(e.message);
  } finally {
    $("dupes-run").disabled = false;
  }
}

// One group side by side: the suggested keeper first (marked), each image with its keep choice, dimensions, size
// and path; the group's checkbox says whether the decision moves its others.
function dupeGroup(g) {
  const choose = el("input", { type: "checkbox", "data-testid": "dupe-choose" });
  choose.checked = g.chosen;
  choose.addEventListener("change", () => { g.chosen = choose.checked; updateGroup(g); updateDupesSummary(); });
  const n = members(g).length;
  const head = el("div", { class: "group-head" },
    el("label", { class: "choose", title: "move this group's others (and export them as \"remove\")" }, choose,
      el("span", { text: `Group ${g.n}` })),
    el("span", { class: `badge tier ${g.tier}`, "data-testid": "dupe-tier", text: TIER_LABEL[g.tier] }),
    el("span", { class: "muted small", text: `${n} images · similarity ≥ ${Number(g.data.min_score).toFixed(3)}` }));
  g.node = el("section", { class: "group", "data-testid": "dupe-group", "data-group": String(g.n),
    "data-tier": g.tier }, head, el("div", { class: "compare" }, ...members(g).map((item, j) => dupeCard(g, item, !j))));
  updateGroup(g);
  return g.node;
}

function dupeCard(g, item, suggested) {
  const { card, caption } = itemCard(item.id, item.path, suggested ? "dupe-keeper" : "dupe-other");
  card.classList.add("dupe");
  const radio = el("input", { type: "radio", name: `keep-${g.n}`, value: String(item.id), "data-testid": "dupe-keep" });
  radio.checked = item.id === g.keep;
  radio.addEventListener("change", () => {
    if (!radio.checked) return;
    g.keep = item.id;
    updateGroup(g);
    updateDupesSummary();
  });
  const how = suggested
    ? el("span", { class: "badge suggested", text: "suggested", title: "the suggested keeper: the original the "
      + "others were made from, else the most pixels, then the largest file" })
    : el("span", { class: "muted small", text: TIER_LABEL[tierOf(item.tier)] });
  const hasSize = item.width && item.height;
  const bytes = Number.isFinite(item.bytes) ? `${item.bytes.toLocaleString("en-US")} bytes` : "size unknown";
  caption.prepend(el("div", { class: "meta" },
    el("label", { class: "keep-choice", title: "keep this one" }, radio, el("span", { text: "keep" })),
    el("span", { class: "badge role", "data-testid": "dupe-role" }), how));
  caption.append(
    el("div", { class: "small", "data-testid": "dupe-dims", text: hasSize ? `${item.width}×${item.height}`
      : "file gone or unreadable" }),
    el("div", { class: "small", "data-testid": "dupe-bytes", title: formatBytes(item.bytes), text: bytes }),
    el("div", { class: "small muted path", "data-testid": "dupe-path", text: item.path }),
    el("div", { class: "small outcome", "data-testid": "dupe-outcome" }));
  return card;
}

// The group's cards after its keeper or its choice changed: which is kept, which would go.
function updateGroup(g) {
  g.node.classList.toggle("unchosen", !g.chosen);
  for (const card of g.node.querySelectorAll(".card")) {
    const id = Number(card.dataset.id);
    const role = g.moved.has(id) ? "moved" : roleOf(g, id);
    card.dataset.role = role;
    const badge = card.querySelector("[data-testid=dupe-role]");
    badge.textContent = role;
    badge.className = `badge role ${role}`;
  }
}

// What the chosen groups would move: [{keep, move: [ids]}], leaving out what was moved already.
function movePlan() {
  return state.dupes.groups.filter((g) => g.chosen)
    .map((g) => ({ keep: g.keep, move: members(g).map((m) => m.id).filter((id) => id !== g.keep && !g.moved.has(id)) }))
    .filter((p) => p.move.length);
}

function updateDupesSummary() {
  const byId = new Map(state.dupes.groups.flatMap((g) => members(g).map((m) => [m.id, m])));
  const plan = movePlan();
  const ids = plan.flatMap((p) => p.move);
  const bytes = ids.reduce((n, id) => n + (byId.get(id).bytes || 0), 0);
  const chosen = state.dupes.groups.filter((g) => g.chosen).length;
  $("dupes-summary").textContent = `${plural(chosen, "group")} chosen: ${plural(ids.length, "image")} to move`
    + (bytes ? ` (${formatBytes(bytes)})` : "");
  $("dupes-move").disabled = !ids.length;
}

// The decision, one row per image: group, tier, role (keep | remove), id, path, width, height, bytes.
function decisionRows() {
  return state.dupes.groups.flatMap((g) => members(g).map((m) => ({ group: g.n, tier: g.tier, role: roleOf(g, m.id),
    id: m.id, path: m.path, width: m.width || 0, height: m.height || 0, bytes: m.bytes || 0 })));
}

const csvField = (v) => (/[",\r\n]/.test(String(v)) ? `"${String(v).replace(/"/g, '""')}"` : String(v));

// A file made here, from what the page holds, saved by the browser (no request).
function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = el("a", { href: url, download: name, hidden: "" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function exportDecision(format) {
  const rows = decisionRows();
  if (format === "csv") {
    const lines = [DECISION_COLUMNS.join(","), ...rows.map((r) => DECISION_COLUMNS.map((c) => csvField(r[c])).join(","))];
    download("simsearch-duplicates.csv", "text/csv", `${lines.join("\r\n")}\r\n`);
  } else {
    download("simsearch-duplicates.json", "application/json", `${JSON.stringify(rows, null, 2)}\n`);
  }
}

// Move the chosen groups' others into the folder named (POST /api/dupes/move: by id; nothing is deleted); each
// image's outcome is shown on its card.
async function moveOthers() {
  const status = $("dupes-move-status");
  const destination = $("dupes-dest").value.trim();
  const groups = movePlan();
  if (!destination) {
    showError("name the folder to move the others into (an absolute path)");
    return;
  }
  if (!groups.length) return;
  clearError();
  status.dataset.state = "loading";
  status.textContent = "moving…";
  $("dupes-move").disabled = true;
  try {
    const body = await getJSON("/api/dupes/move", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ destination, groups }) });
    const cards = new Map([...$("dupes-list").querySelectorAll(".card")].map((c) => [Number(c.dataset.id), c]));
    const groupOf = new Map(state.dupes.groups.flatMap((g) => members(g).map((m) => [m.id, g])));
    for (const m of body.moved) {
      const g = groupOf.get(m.id);
      if (g) g.moved.set(m.id, m.to);
      const card = cards.get(m.id);
      if (!card) continue;
      card.dataset.outcome = "moved";
      card.querySelector("[data-testid=dupe-outcome]").textContent = `moved to ${m.to}`;
      card.querySelector("[data-testid=dupe-keep]").disabled = true;  // it is not where it was: not a keeper
    }
    for (const f of body.failed) {
      const card = cards.get(f.id);
      if (!card) continue;
      card.dataset.outcome = "failed";
      card.querySelector("[data-testid=dupe-outcome]").textContent = `not moved: ${f.reason}`;
    }
    state.dupes.groups.forEach(updateGroup);
    status.textContent = `${plural(body.moved.length, "image")} moved into ${body.destination}`
      + (body.failed.length ? `; ${plural(body.failed.length, "image")} not moved (see the cards)` : "")
      + ". Nothing was deleted; the next `simsearch index` sees them gone.";
    status.dataset.state = "done";
  } catch (e) {
    status.dataset.state = "error";
    status.textContent = "";
    showError(`move: ${e.message}`);
  } finally {
    updateDupesSummary();
  }
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
    state.info = info;
    updateTextBox();
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

  $("k").addEventListener("change", (e) => { state.k = Number(e.target.value); runQuery(); });
  $("encoder").addEventListener("change", (e) => { state.encoder = e.target.value; updateTextBox(); runQuery(); });
  $("under").addEventListener("change", (e) => {
    if (e.target.value.trim() === state.under) return;
    state.under = e.target.value.trim();
    runQuery();
  });
  $("text-form").addEventListener("submit", (e) => { e.preventDefault(); searchWords(false); });
  $("text-add").addEventListener("click", () => searchWords(true));
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
  $("dupes-export-csv").addEventListener("click", () => exportDecision("csv"));
  $("dupes-export-json").addEventListener("click", () => exportDecision("json"));
  $("dupes-move-form").addEventListener("submit", (e) => { e.preventDefault(); moveOthers(); });

  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  showView(location.hash.slice(1) || "search");
  loadInfo();
  setInterval(watchGeneration, 10_000);
}

init();
