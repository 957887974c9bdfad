// autocontour review page: upload, follow the job, scroll through draft contours, download.
// Plain JavaScript and a canvas, no build step and no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { job: null, info: null, plane: "axial", index: 0, visible: {}, image: null, contours: {},
                flagged: [], drawToken: 0, shown: "", sliceTimes: [], supportSets: new Set() };  // shown: the plane/index the canvas last drew

// The anatomical directions the server names at the edges of each view (planes[plane].edges).
const DIRECTIONS = { A: "anterior", P: "posterior", S: "superior", I: "inferior", R: "patient's right",
                     L: "patient's left" };
const FLAG_COLOUR = "#ff3030";

function apiKey() { return $("api-key").value || sessionStorage.getItem("autocontour-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = response.statusText;
    try { const problem = await response.json(); detail = problem.detail || problem.title || detail; } catch (e) { /* not JSON */ }
    throw new Error(response.status + ": " + detail);
  }
  return response;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function rgb(colour) { return "rgb(" + colour.join(",") + ")"; }

async function loadStructures() {
  const box = $("structure-choices");
  const note = $("structures-loading");
  box.querySelectorAll("label").forEach((label) => label.remove());
  note.hidden = false;
  note.textContent = "Loading the structure catalogue...";
  try {
    const catalogue = await (await api("/v1/structures")).json();
    note.hidden = true;
    state.supportSets = new Set(catalogue.structures.filter((s) => s.available).map((s) => s.name));
    for (const s of catalogue.structures) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox"; input.name = "structures"; input.value = s.name;
      input.checked = s.available; input.disabled = !s.available;
      const swatch = document.createElement("span");
      swatch.className = "swatch"; swatch.style.background = rgb(s.colour);
      label.append(input, swatch, document.createTextNode(" " + s.display_name));
      if (!s.available) label.title = "No support set configured: " + s.how_to_add;
      box.append(label);
    }
  } catch (error) {
    note.textContent = "Cannot load the catalogue (" + error.message + "). An API key may be needed.";
  }
}

async function submit(event) {
  event.preventDefault();
  sessionStorage.setItem("autocontour-key", $("api-key").value);
  const file = $("ct-file").files[0];
  const chosen = [...document.querySelectorAll("input[name=structures]:checked")].map((i) => i.value);
  if (!file) { setStatus("Choose a CT file first.", true); return; }
  if (!chosen.length) { setStatus("Choose at least one structure.", true); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("structures", chosen.join(","));
  $("submit-button").disabled = true;
  setStatus("Uploading...");
  try {
    const job = await (await api("/v1/segmentations", { method: "POST", body: form })).json();
    await follow(job.id);
  } catch (error) {
    setStatus("Refused: " + error.message, true);
  } finally {
    $("submit-button").disabled = false;
  }
}

async function follow(jobId) {
  const bar = $("progress");
  bar.hidden = false;
  for (;;) {
    const job = await (await api("/v1/segmentations/" + jobId)).json();
    const p = job.progress || {};
    if (p.slices_total) { bar.max = p.slices_total; bar.value = p.slices_done; }
    setStatus("Job " + job.id.slice(0, 8) + ": " + job.status +
              (p.slices_total ? " (" + p.phase + " pass, " + p.slices_done + "/" + p.slices_total + " slices)"
                              : p.phase ? " (" + p.phase + ")" : ""));
    if (job.status === "done") { bar.hidden = true; await openReview(job); return; }
    if (job.status === "failed" || job.status === "cancelled") {
      bar.hidden = true;
      setStatus("Job " + job.status + ": " + ((job.error && job.error.detail) || ""), true);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function openReview(job) {
  state.job = job;
  state.info = await (await api("/v1/segmentations/" + job.id + "/review")).json();
  state.visible = {};
  for (const name of Object.keys(state.info.structures)) state.visible[name] = true;
  buildStructureTable();
  buildFlaggedList();
  const notices = $("notices");
  notices.replaceChildren(...[...state.info.notices, ...state.info.warnings].map((text) => {
    const p = document.createElement("p"); p.className = "hint"; p.textContent = text; return p;
  }));
  $("review-section").hidden = false;
  setStatus("Done. Review every slice before use: these are drafts.");
  const first = Object.values(state.info.structures).find((s) => s.slice_range);
  setPlane("axial", first ? Math.round((first.slice_range[0] + first.slice_range[1]) / 2) : 0);
  editor.open(state.info);
  $("canvas").focus();
}

function buildStructureTable() {
  const body = $("structure-table").querySelector("tbody");
  body.replaceChildren();
  for (const [name, s] of Object.entries(state.info.structures)) {
    const row = document.createElement("tr");
    const toggle = document.createElement("input");
    toggle.type = "checkbox"; toggle.checked = state.visible[name] !== false; toggle.id = "show-" + name;
    toggle.setAttribute("aria-label", "show " + s.display_name);
    toggle.addEventListener("change", () => { state.visible[name] = toggle.checked; draw(); });
    const label = document.createElement("label");
    label.htmlFor = toggle.id;
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = rgb(s.colour);
    label.append(swatch, document.createTextNode(" " + s.display_name));
    const estimated = s.estimated_surface_dice ?? null;  // only where the server has a calibration
    const confidence = (s.confidence === null ? "n/a" : s.confidence.toFixed(2))
      + (estimated === null ? "" : " (surface Dice about " + estimated.toFixed(2) + ")");
    const mask = document.createElement("button");
    mask.type = "button"; mask.textContent = "NIfTI";
    mask.setAttribute("aria-label", "download the " + s.display_name + " mask");
    mask.addEventListener("click", () => download("/v1/segmentations/" + state.job.id + "/masks/" + name, name + ".nii.gz"));
    const cells = [toggle, label, confidence, s.volume_ml.toFixed(1) + " mL", mask];
    for (const content of cells) {
      const cell = document.createElement("td");
      if (typeof content === "string") cell.textContent = content; else cell.append(content);
      if (content === confidence && s.confidence !== null && s.confidence < 0.6) cell.className = "low";
      row.append(cell);
    }
    body.append(row);
  }
}

function buildFlaggedList() {
  const list = $("flagged");
  list.replaceChildren();
  state.flagged = [];
  for (const [name, s] of Object.entries(state.info.structures)) {
    for (const f of s.flagged_slices) state.flagged.push({ slice: f.slice, z: f.z_mm, text: s.display_name + ": " + f.reason });
  }
  state.flagged.sort((a, b) => a.slice - b.slice);
  if (!state.flagged.length) { list.innerHTML = "<li>none flagged (still review every slice)</li>"; return; }
  for (const f of state.flagged) {
    const item = document.createElement("li");
    const jump = document.createElement("button");
    jump.type = "button";
    jump.textContent = "z = " + f.z.toFixed(1) + " mm";
    jump.addEventListener("click", () => { setPlane("axial", f.slice); $("canvas").focus(); });
    item.append(jump, document.createTextNode(" " + f.text));
    list.append(item);
  }
}

function setPlane(plane, index) {
  state.plane = plane;
  $("plane").value = plane;
  const count = state.info.planes[plane].count;
  $("slice").max = count - 1;
  setSlice(index === undefined ? Math.floor(count / 2) : index);
}

function setSlice(index) {
  const count = state.info.planes[state.plane].count;
  state.index = Math.max(0, Math.min(count - 1, index));
  $("slice").value = state.index;
  const where = state.plane === "axial" ? "z = " + state.info.z_mm[state.index].toFixed(1) + " mm" : state.plane;
  // slices are numbered from 0, as summary.json and the CLI count them
  $("slice-label").textContent = "slice " + state.index + " / " + (count - 1) + "  (" + where + ")";
  const edges = state.info.planes[state.plane].edges;
  $("canvas").setAttribute("aria-label", state.plane + " slice " + state.index + " of 0 to " + (count - 1) +
    (state.plane === "axial" ? " at " + where : "") + "; top " + DIRECTIONS[edges.top] + ", left " +
    DIRECTIONS[edges.left] + (state.plane === "axial" ? "; a flagged slice is framed in red"
                                                     : "; flagged axial slices are marked red at both sides") +
    "; arrow keys change the slice");
  load();
}

async function load() {
  const token = ++state.drawToken, start = performance.now();
  const base = "/v1/segmentations/" + state.job.id + "/review/" + state.plane + "/" + state.index;
  const [png, contours] = await Promise.all([
    api(base + ".png?level=" + $("level").value + "&width=" + $("width").value).then((r) => r.blob()),
    api(base + "/contours").then((r) => r.json()),
  ]);
  if (token !== state.drawToken) return;  // a newer slice was asked for meanwhile
  const image = new Image();
  image.src = URL.createObjectURL(png);
  await image.decode();
  state.image = image;
  state.contours = contours;
  draw();
  editor.sliceChanged();
  state.sliceTimes.push(performance.now() - start);  // slice change to drawn, ms (docs/http-api.md reports it)
}

function draw() {
  const canvas = $("canvas"), image = state.image;
  if (!image) return;
  const aspect = state.info.planes[state.plane].aspect;
  const scale = Math.min(512 / image.width, 512 / (image.height * aspect));
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * aspect * scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const sx = canvas.width / image.width, sy = canvas.height / image.height;
  ctx.lineWidth = 2;
  for (const [name, lines] of Object.entries(state.contours)) {
    if (!state.visible[name] || editor.owns(name)) continue;  // the editor draws the structure it edits
    ctx.strokeStyle = rgb(state.info.structures[name].colour);
    for (const line of lines) {
      ctx.beginPath();
      line.forEach(([x, y], i) => {
        const px = (x + 0.5) * sx, py = (y + 0.5) * sy;
        if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
      });
      ctx.stroke();
    }
  }
  ctx.fillStyle = "#ffb347";
  ctx.font = "bold 13px sans-serif";
  ctx.fillText("DRAFT - review before clinical use", 8, canvas.height - 10);
  drawEdges(ctx, canvas, state.info.planes[state.plane].edges);
  drawFlags(ctx, canvas);
  state.shown = state.plane + "/" + state.index;
}

function drawEdges(ctx, canvas, edges) {
  // each edge's direction (A/P, S/I, R/L) at its middle; the bottom one clears the DRAFT line
  ctx.save();
  ctx.fillStyle = "#fff";
  ctx.shadowColor = "#000"; ctx.shadowBlur = 3;  // readable on bone too
  ctx.font = "bold 14px sans-serif";
  ctx.textAlign = "center";
  ctx.fillText(edges.top, canvas.width / 2, 16);
  ctx.fillText(edges.bottom, canvas.width / 2, canvas.height - 28);
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillText(edges.left, 16, canvas.height / 2);
  ctx.textAlign = "right";
  ctx.fillText(edges.right, canvas.width - 16, canvas.height / 2);
  ctx.restore();
}

function drawFlags(ctx, canvas) {
  // axial: a red frame round a flagged slice; coronal and sagittal (superior at the top): a red tick at both
  // sides at the height of every flagged axial slice, so the reader sees where along z to look
  ctx.save();
  ctx.strokeStyle = ctx.fillStyle = FLAG_COLOUR;
  if (state.plane === "axial") {
    if (state.flagged.some((f) => f.slice === state.index)) {
      ctx.lineWidth = 4; ctx.strokeRect(2, 2, canvas.width - 4, canvas.height - 4);
    }
  } else {
    const rows = state.info.planes.axial.count, row = canvas.height / rows;
    for (const slice of new Set(state.flagged.map((f) => f.slice))) {
      const top = (rows - 1 - slice) * row;
      ctx.fillRect(0, top, 10, Math.max(2, row));
      ctx.fillRect(canvas.width - 10, top, 10, Math.max(2, row));
    }
  }
  ctx.restore();
  editor.drawOverlay(ctx, canvas);
}

async function download(path, filename) {
  try {
    const blob = await (await api(path)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = filename;
    document.body.append(link);
    link.click();
    link.remove();
  } catch (error) {
    setStatus("Download failed: " + error.message, true);
  }
}

function jumpFlagged(direction) {
  const slices = [...new Set(state.flagged.map((f) => f.slice))];
  const next = direction > 0 ? slices.find((s) => s > state.index) : slices.reverse().find((s) => s < state.index);
  if (next !== undefined) setPlane("axial", next);
}

function onKey(event) {
  if (!state.info) return;
  const steps = { ArrowUp: 1, ArrowRight: 1, k: 1, ArrowDown: -1, ArrowLeft: -1, j: -1, PageUp: 10, PageDown: -10 };
  if (event.key in steps) { setSlice(state.index + steps[event.key]); event.preventDefault(); }
  else if (event.key === "n") jumpFlagged(1);
  else if (event.key === "p") jumpFlagged(-1);
}

$("upload-form").addEventListener("submit", submit);
$("slice").addEventListener("input", () => setSlice(Number($("slice").value)));
$("plane").addEventListener("change", () => setPlane($("plane").value));
$("window-preset").addEventListener("change", () => {
  const [level, width] = $("window-preset").value.split(",");
  $("level").value = level; $("width").value = width; load();
});
$("level").addEventListener("change", load);
$("width").addEventListener("change", load);
$("canvas").addEventListener("keydown", onKey);
$("canvas").addEventListener("wheel", (event) => { if (state.info) { setSlice(state.index + (event.deltaY < 0 ? 1 : -1)); event.preventDefault(); } });
$("download-zip").addEventListener("click", () => download("/v1/segmentations/" + state.job.id + "/result", "autocontour-" + state.job.id + ".zip"));
$("api-key").value = sessionStorage.getItem("autocontour-key") || "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem("autocontour-key", $("api-key").value); loadStructures(); });
loadStructures();
