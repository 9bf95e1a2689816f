// The search page: one form, one fetch per search, the answer drawn as cards.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let last = null;  // {request: a function (format) -> fetch promise, answer: the JSON}

function fmt(value, digits) {
  return value === null || value === undefined ? "unknown" : Number(value).toFixed(digits);
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function card(entry, isQuery) {
  const div = document.createElement("div");
  div.className = isQuery ? "card query" : "card result";
  if (isQuery) {
    div.innerHTML = '<span class="badge">QUERY</span>';
  } else {
    div.dataset.targetid = entry.targetid_str;
    div.title = "search with this galaxy";
    div.addEventListener("click", () => {
      document.querySelector('input[value="targetid"]').checked = true;
      $("targetid").value = entry.targetid_str;
      runSearch();
    });
  }
  if (entry.image) {
    const img = document.createElement("img");
    img.className = "cutout"; img.src = entry.image; img.alt = "g,r,z cutout";
    div.appendChild(img);
  }
  if (entry.spectrum) {
    const img = document.createElement("img");
    img.className = "spectrum"; img.src = entry.spectrum; img.alt = "spectrum";
    div.appendChild(img);
  }
  const lines = [];
  if (!isQuery) lines.push(`<span class="rank">#${entry.rank}</span> similarity ${fmt(entry.similarity, 3)}`);
  if (entry.targetid_str !== undefined) {
    lines.push(`target <span class="tid">${entry.targetid_str}</span>`);
    lines.push(`z = ${fmt(entry.redshift, 4)}`);
    lines.push(`log M* = ${fmt(entry.log_mstar, 2)}`);
  } else {
    lines.push(`uploaded ${entry.kind}`);
  }
  if (entry.ra !== undefined) lines.push(`RA ${fmt(entry.ra, 5)}, Dec ${fmt(entry.dec, 5)}`);
  const text = document.createElement("div");
  text.className = "labels";
  text.innerHTML = lines.join("<br>");
  div.appendChild(text);
  return div;
}

function show(answer) {
  $("query").replaceChildren(card(answer.query, true));
  $("results").replaceChildren(...answer.neighbours.map((e) => card(e, false)));
  const arrow = answer.direction.replace("_to_", " \u2192 ");
  $("results-title").textContent = `${answer.neighbours.length} nearest neighbours, ${arrow}`;
  $("dropped").textContent = answer.dropped_near_duplicates
    ? `left out: ${answer.dropped_near_duplicates} (the query galaxy itself, or near-duplicates)`
    : "";
  $("query-section").hidden = false;
  $("results-section").hidden = false;
}

function buildRequest() {
  const by = document.querySelector('input[name="by"]:checked').value;
  const direction = $("direction").value;
  const k = $("k").value;
  if (by === "upload") {
    const file = $("upload").files[0];
    if (!file) throw new Error("choose a .npy or FITS file to upload");
    return (format) => {
      const body = new FormData();
      body.append("file", file); body.append("direction", direction);
      body.append("k", k); body.append("format", format);
      return fetch("/api/search", {method: "POST", body});
    };
  }
  const params = new URLSearchParams({direction, k});
  if (by === "random") params.set("random", "1");
  else params.set("targetid", $("targetid").value.trim());
  return (format) => fetch(`/api/search?${params}&format=${format}`);
}

async function errorOf(response) {
  try { return (await response.json()).error || response.statusText; }
  catch (e) { return response.statusText; }
}

async function runSearch() {
  let request;
  try { request = buildRequest(); } catch (e) { setStatus(e.message, true); return; }
  setStatus("searching\u2026", false);
  const response = await request("json");
  if (!response.ok) {
    setStatus(`error ${response.status}: ${await errorOf(response)}`, true);
    return;
  }
  const answer = await response.json();
  if (answer.query.source === "targetid") {
    // Downloads and re-runs repeat this galaxy, also when it was drawn at random.
    const params = new URLSearchParams({direction: answer.direction, k: answer.k,
                                        targetid: answer.query.targetid_str});
    request = (format) => fetch(`/api/search?${params}&format=${format}`);
  }
  last = {request, answer};
  show(answer);
  setStatus(`${answer.neighbours.length} neighbours (index: ${answer.index})`, false);
}

async function download(format) {
  if (!last) return;
  const response = format === "json"
    ? new Response(JSON.stringify(last.answer, null, 1)) : await last.request(format);
  if (!response.ok) { setStatus(`error ${response.status}: ${await errorOf(response)}`, true); return; }
  const blob = await response.blob();
  const a = document.createElement("a");
  const name = last.answer.query.targetid_str ?? "upload";
  a.href = URL.createObjectURL(blob);
  a.download = `neighbours_${name}_${last.answer.direction}.${format}`;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function start() {
  info = await (await fetch("/api/info")).json();
  const names = Object.entries(info.index).map(([m, e]) => `${m}: ${e.factory}`).join(", ");
  $("info").textContent = `${info.n.toLocaleString()} galaxies of ${info.dataset} ` +
    `(${info.split} split, checkpoint step ${info.checkpoint_step}); index ${names}`;
  $("k").value = info.k; $("k").max = info.max_k;
  $("upload-hint").textContent = `A cutout: .npy or FITS, (H, W, 3) g, r, z flux, at least ` +
    `${info.cutout_min_size}\u00d7${info.cutout_min_size} px; a spectrum: ${info.spectrum_length} ` +
    `flux values on the ${info.grid} grid. The direction says which (at most ` +
    `${(info.max_upload_bytes / 2 ** 20).toFixed(0)} MiB).`;
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
  $("download-csv").addEventListener("click", () => download("csv"));
  $("download-json").addEventListener("click", () => download("json"));
  document.body.dataset.ready = "1";
}

start();
