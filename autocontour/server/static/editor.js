// The review page's editor: correct one structure on the axial view (brush, eraser, lasso), propagate what was
// drawn to the rest of the structure on the server, step through versions, approve.
// The active structure lives here as a canonical (z, y, x) Uint8Array; app.js draws the CT and the other
// structures' contours and calls editor.open, editor.owns, editor.drawOverlay and editor.sliceChanged.
"use strict";

const STRUCTURE_NAME = /^[a-z][a-z0-9_]{0,63}$/;
const BRUSH_MM = { min: 1, max: 60, step: 2 };

const editor = {
  layout: null, active: null, volume: null, filled: null, draft: null, versions: [], tool: "brush", brushMm: 10,
  lassoMode: "fill", edited: new Map(), undo: [], redo: [], stroke: null, cursor: null, busy: false,
  autoTimer: null,

  // Called by app.js once a job's review data is loaded.
  open(info) {
    const panel = $("editor");
    panel.hidden = false;
    this.layout = info.grid ? canonicalLayout(info.grid) : null;
    $("editor-tools").hidden = $("editor-toolbar").hidden = !this.layout;
    $("editor-unavailable").hidden = !!this.layout;
    this.fillStructureChoice();
    this.fillSupportChoice();
    if (this.layout) this.activate($("active-structure").value);
  },

  // One checkbox per structure of the job that has a support set on the server: approve then adds the patient.
  fillSupportChoice() {
    const names = Object.keys(state.info.structures).filter((name) => state.supportSets.has(name));
    $("support-choices").replaceChildren(...names.map((name) => {
      const label = document.createElement("label"), box = document.createElement("input");
      box.type = "checkbox"; box.name = "add-to-support"; box.value = name;
      label.append(box, document.createTextNode(" add this patient to the support set of " +
                                                state.info.structures[name].display_name));
      return label;
    }));
    $("support-growth").hidden = !names.length;
  },

  owns(name) { return this.volume !== null && name === this.active; },

  fillStructureChoice() {
    const select = $("active-structure");
    select.replaceChildren(...Object.entries(state.info.structures).map(([name, s]) => new Option(s.display_name, name)));
    if (this.active) select.value = this.active;
  },

  async activate(name) {
    this.active = name; this.volume = null; this.draft = null; this.versions = [];
    this.edited.clear(); this.undo = []; this.redo = [];
    $("compare-draft").checked = false;
    await this.reload(null);
  },

  base() { return "/v1/segmentations/" + state.job.id + "/structures/" + this.active; },

  // The active structure's versions and the given (default newest) version's mask from the server.
  async reload(version) {
    const name = this.active;
    let versions = [];
    try { versions = await (await api(this.base() + "/versions")).json(); } catch (error) { /* not started yet */ }
    const volume = versions.length ? await this.fetchMask(version) : new Uint8Array(this.voxels());
    if (name !== this.active) return;  // another structure was chosen meanwhile
    this.versions = versions; this.volume = volume; this.refreshFilled();
    if (versions.length) { state.info.structures[name].volume_ml = this.newest().volume_ml; buildStructureTable(); }
    this.showVersions(); this.sliceChanged(); draw();
  },

  voxels() { return this.layout.nx * this.layout.ny * this.layout.nz; },

  async fetchMask(version) {
    const query = version === null ? "" : "?version=" + version;
    const response = await api("/v1/segmentations/" + state.job.id + "/masks/" + this.active + query);
    return await readMask(this.layout, await response.arrayBuffer());
  },

  newest() { return this.versions.length ? this.versions[this.versions.length - 1] : null; },

  editable() { return this.volume !== null && state.plane === "axial" && !this.busy; },

  // Canvas event position -> continuous voxel coordinates on the axial slice.
  voxelAt(event) {
    const rect = $("canvas").getBoundingClientRect();
    return { x: (event.clientX - rect.left) / rect.width * this.layout.nx,
             y: (event.clientY - rect.top) / rect.height * this.layout.ny };
  },

  sliceOffset() { return state.index * this.layout.nx * this.layout.ny; },

  // Set (or clear) every voxel of the current slice inside the brush's ellipse (diameter in mm) at p.
  paint(p, value) {
    const { nx, ny } = this.layout, { dx, dy } = this.spacing();
    const rx = Math.max(this.brushMm / 2 / dx, 0.5), ry = Math.max(this.brushMm / 2 / dy, 0.5);
    const base = this.sliceOffset();
    for (let y = Math.max(0, Math.floor(p.y - ry)); y <= Math.min(ny - 1, Math.ceil(p.y + ry)); y++) {
      for (let x = Math.max(0, Math.floor(p.x - rx)); x <= Math.min(nx - 1, Math.ceil(p.x + rx)); x++) {
        if (((x + 0.5 - p.x) / rx) ** 2 + ((y + 0.5 - p.y) / ry) ** 2 <= 1) this.volume[base + y * nx + x] = value;
      }
    }
  },

  // In-plane voxel size in mm: the brush is a circle in the patient, an ellipse in voxels where dx != dy.
  spacing() {
    const pixdim = state.info.grid.nifti.pixdim, m = this.layout.m;
    const along = (axis) => pixdim[1 + [0, 1, 2].find((r) => m[r][axis] !== 0)];
    return { dx: along(0), dy: along(1) };
  },

  paintLine(from, to, value) {
    const steps = Math.max(1, Math.ceil(Math.hypot(to.x - from.x, to.y - from.y) * 2));
    for (let i = 1; i <= steps; i++) {
      this.paint({ x: from.x + (to.x - from.x) * i / steps, y: from.y + (to.y - from.y) * i / steps }, value);
    }
  },

  // Fill (or cut) the lasso's polygon on the current slice, rasterised by an offscreen canvas.
  fillLasso(points, value) {
    const { nx, ny } = this.layout;
    const canvas = new OffscreenCanvas(nx, ny), ctx = canvas.getContext("2d");
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(p.x, p.y) : ctx.moveTo(p.x, p.y)));
    ctx.closePath(); ctx.fill();
    const alpha = ctx.getImageData(0, 0, nx, ny).data, base = this.sliceOffset();
    for (let i = 0; i < nx * ny; i++) if (alpha[4 * i + 3] >= 128) this.volume[base + i] = value;
  },

  pointerDown(event) {
    if (event.button !== 0 || !this.editable() || !this.tool) return;
    clearTimeout(this.autoTimer);  // a stroke under way: propagating now would miss it
    const plane = this.layout.nx * this.layout.ny;
    const p = this.voxelAt(event);
    this.stroke = { z: state.index, before: this.volume.slice(this.sliceOffset(), this.sliceOffset() + plane),
                    last: p, points: [p] };
    if (this.tool !== "lasso") this.paint(p, this.tool === "brush" ? 1 : 0);
    $("canvas").setPointerCapture(event.pointerId);
    draw();
  },

  pointerMove(event) {
    if (!this.layout) return;
    this.cursor = this.voxelAt(event);
    const s = this.stroke;
    if (s && s.z === state.index) {
      if (this.tool === "lasso") s.points.push(this.cursor);
      else this.paintLine(s.last, this.cursor, this.tool === "brush" ? 1 : 0);
      s.last = this.cursor;
    }
    if (this.editable()) draw();
  },

  pointerUp() {
    const s = this.stroke;
    if (!s) return;
    this.stroke = null;
    if (this.tool === "lasso" && s.points.length > 2) this.fillLasso(s.points, this.lassoMode === "fill" ? 1 : 0);
    this.undo.push({ z: s.z, before: s.before });
    this.redo = [];
    this.edited.set(s.z, (this.edited.get(s.z) || 0) + 1);
    this.refreshFilled(s.z); this.sliceChanged(); draw();
    this.propagateSoon();
  },

  // "Propagate automatically": 1.5 s after the last finished stroke (each new stroke restarts the wait), and
  // again once a propagation still running is answered.
  propagateSoon() {
    clearTimeout(this.autoTimer);
    if (!$("auto-propagate").checked) return;
    this.autoTimer = setTimeout(() => {
      if (this.busy) this.propagateSoon(); else if (this.edited.size) this.propagate();
    }, 1500);
  },

  // Swap a stroke's slice with what it held before (undo and redo are the same swap).
  swapSlice(entry, delta) {
    const plane = this.layout.nx * this.layout.ny, offset = entry.z * plane;
    const now = this.volume.slice(offset, offset + plane);
    this.volume.set(entry.before, offset);
    const count = (this.edited.get(entry.z) || 0) + delta;
    if (count > 0) this.edited.set(entry.z, count); else this.edited.delete(entry.z);
    this.refreshFilled(entry.z);
    if (entry.z !== state.index) setPlane("axial", entry.z);
    return { z: entry.z, before: now };
  },

  async undoStep() {
    const entry = this.undo.pop();
    if (!entry) return setStatus("Nothing to undo.");
    if (entry.version === undefined) { this.redo.push(this.swapSlice(entry, -1)); this.sliceChanged(); draw(); return; }
    if (entry.from === null) { this.undo.push(entry); return setStatus("The first version cannot be undone."); }
    if (await this.revertTo(entry.from)) this.redo.push(entry);
  },

  async redoStep() {
    const entry = this.redo.pop();
    if (!entry) return setStatus("Nothing to redo.");
    if (entry.version === undefined) { this.undo.push(this.swapSlice(entry, 1)); this.sliceChanged(); draw(); return; }
    if (await this.revertTo(entry.version)) this.undo.push(entry);
  },

  // Make an older version the newest again (the server keeps every version) and show it.
  async revertTo(version) {
    try {
      const made = await (await api(this.base() + "/versions/" + version + "/revert", { method: "POST" })).json();
      this.edited.clear();
      await this.reload(null);
      setStatus("Back to version " + version + " (kept as version " + made.version + ").");
      return true;
    } catch (error) {
      setStatus("Could not go back: " + error.message, true);
      return false;
    }
  },

  // The edited slices as a mask on the input grid, to the propagate endpoint; then the new version is shown.
  async propagate() {
    clearTimeout(this.autoTimer);  // sent now: a pending automatic propagation would find nothing left
    if (this.busy) return;
    const zs = [...this.edited.keys()].sort((a, b) => a - b);
    if (!zs.length) return setStatus("Draw or correct a slice first: Propagate sends the slices you edited.", true);
    const form = new FormData();
    form.append("drawn", writeMask(this.layout, state.info.grid.nifti, this.volume, zs), "drawn.nii");
    form.append("slices", zs.map((z) => inputSlice(this.layout, z)).join(","));
    form.append("ends", $("ends").value);
    const structure = state.info.structures[this.active];
    if (structure.status === "new") {  // how the approved RTSTRUCT and SEG will name and colour it
      form.append("display_name", structure.display_name);
      form.append("colour", structure.hex);
    }
    this.setBusy(true);
    try {
      const version = await (await api(this.base() + "/propagate", { method: "POST", body: form })).json();
      this.undo.push({ version: version.version, from: version.based_on });
      this.redo = []; this.edited.clear();
      await this.reload(null);
      this.showOutcome(version);
    } catch (error) {
      setStatus("Propagation refused: " + error.message, true);
    } finally {
      this.setBusy(false);
    }
  },

  setBusy(busy) {
    this.busy = busy;
    $("propagate").disabled = busy;
    $("edit-progress").hidden = !busy;
    clearInterval(this.timer);
    if (!busy) return;
    const start = performance.now();
    const tick = () => setStatus("Propagating " + state.info.structures[this.active].display_name + "... " +
                                 Math.round((performance.now() - start) / 1000) + " s");
    tick();
    this.timer = setInterval(tick, 1000);
  },

  showOutcome(version) {
    const changed = version.changed_slices.map((k) => canonicalSlice(this.layout, k));
    setStatus("Version " + version.version + ": " + changed.length + " slices changed in " +
              version.seconds.toFixed(1) + " s; volume " + version.volume_ml.toFixed(1) + " mL.");
  },

  suggested() {
    const v = this.newest();
    return v && v.next_slice !== null && v.next_slice !== undefined ? canonicalSlice(this.layout, v.next_slice) : null;
  },

  showVersions() {
    const list = $("versions");
    list.replaceChildren(...this.versions.map((v) => {
      const item = document.createElement("li");
      item.textContent = "v" + v.version + " " + v.kind + (v.based_on === null ? "" : " of v" + v.based_on) + ", " +
        v.changed_slices.length + " slices changed, " + v.volume_ml.toFixed(1) + " mL ";
      if (v !== this.newest()) {
        const back = document.createElement("button");
        back.type = "button"; back.textContent = "Go back to v" + v.version; back.className = "link";
        back.addEventListener("click", () => { const from = this.newest().version;
          this.revertTo(v.version).then((ok) => ok && this.undo.push({ version: v.version, from })); });
        item.append(back);
      }
      return item;
    }));
    const next = this.suggested();
    $("next-slice").hidden = next === null;
    if (next !== null) $("next-slice").textContent = "Suggested next slice: " + next;
  },

  async toggleCompare() {
    if (!$("compare-draft").checked) { this.draft = null; draw(); return; }
    try { this.draft = this.versions.length ? await this.fetchMask(0) : new Uint8Array(this.voxels()); }
    catch (error) { setStatus("Cannot load the draft: " + error.message, true); }
    draw();
  },
};

// Drawing: the active structure filled (its edge solid), the changes against the draft, the brush or lasso.
Object.assign(editor, {
  drawOverlay(ctx, canvas) {
    if (!this.volume || state.plane !== "axial") return;
    const { nx, ny } = this.layout, base = this.sliceOffset();
    const colour = state.info.structures[this.active].colour;
    const pixels = new ImageData(nx, ny), data = pixels.data;
    for (let y = 0; y < ny; y++) {
      for (let x = 0; x < nx; x++) {
        const i = y * nx + x, on = this.volume[base + i];
        const was = this.draft ? this.draft[base + i] : on;
        if (!on && !was) continue;
        const rgba = on && !was ? [60, 255, 60, 200] : was && !on ? [255, 40, 200, 200]
          : [...colour, this.isEdge(base, x, y) ? 255 : 90];
        data.set(rgba, 4 * i);
      }
    }
    const layer = new OffscreenCanvas(nx, ny);
    layer.getContext("2d").putImageData(pixels, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
    this.drawTool(ctx, canvas);
  },

  isEdge(base, x, y) {
    const { nx, ny } = this.layout, v = this.volume, i = base + y * nx + x;
    return x === 0 || y === 0 || x === nx - 1 || y === ny - 1 || !v[i - 1] || !v[i + 1] || !v[i - nx] || !v[i + nx];
  },

  drawTool(ctx, canvas) {
    const sx = canvas.width / this.layout.nx, sy = canvas.height / this.layout.ny;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1;
    if (this.stroke && this.tool === "lasso") {
      ctx.beginPath();
      this.stroke.points.forEach((p, i) => (i ? ctx.lineTo(p.x * sx, p.y * sy) : ctx.moveTo(p.x * sx, p.y * sy)));
      ctx.stroke();
    } else if (this.cursor && (this.tool === "brush" || this.tool === "eraser")) {
      const { dx, dy } = this.spacing();
      ctx.beginPath();
      ctx.ellipse(this.cursor.x * sx, this.cursor.y * sy, this.brushMm / 2 / dx * sx, this.brushMm / 2 / dy * sy,
                  0, 0, 2 * Math.PI);
      ctx.stroke();
    }
  },

  // The strip beside the image: one row per axial slice, superior at the top; the structure's extent (grey),
  // drawn slices (its colour), edited and not yet propagated (white), flagged (red), suggested next (yellow).
  sliceChanged() {
    const strip = $("slice-strip");
    if (!this.layout || !this.volume) return;
    const nz = this.layout.nz, rows = strip.height = $("canvas").height || 512, ctx = strip.getContext("2d");
    const y = (z) => Math.floor((nz - 1 - z) / nz * rows), h = Math.max(2, Math.ceil(rows / nz));
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, strip.width, rows);
    const newest = this.newest();
    const drawn = new Set(newest ? newest.drawn_slices.map((k) => canonicalSlice(this.layout, k)) : []);
    for (let z = 0; z < nz; z++) {
      if (this.filled[z]) this.mark(ctx, "#555", 0, y(z), 16, h);
      if (drawn.has(z)) this.mark(ctx, rgb(state.info.structures[this.active].colour), 0, y(z), 16, h);
      if (this.edited.has(z)) this.mark(ctx, "#fff", 0, y(z), 16, h);
    }
    for (const f of state.flagged) this.mark(ctx, "#ff3030", 18, y(f.slice), 10, h);
    const next = this.suggested();
    if (next !== null) this.mark(ctx, "#ffd000", 0, y(next), strip.width, h);
    ctx.strokeStyle = "#4fb3ff"; ctx.lineWidth = 2; ctx.strokeRect(0, y(state.index), strip.width, h);
    strip.setAttribute("aria-label", "slice strip: " + drawn.size + " drawn, " + this.edited.size +
                       " edited, " + state.flagged.length + " flagged" + (next === null ? "" : ", suggested " + next));
  },

  // Which slices hold the structure (all of them, or only slice z after a stroke): the strip's grey extent.
  refreshFilled(z = null) {
    const plane = this.layout.nx * this.layout.ny;
    if (z === null) this.filled = new Uint8Array(this.layout.nz);
    for (const k of z === null ? this.filled.keys() : [z]) {
      this.filled[k] = this.volume.subarray(k * plane, (k + 1) * plane).some((v) => v) ? 1 : 0;
    }
  },

  mark(ctx, colour, x, y, w, h) { ctx.fillStyle = colour; ctx.fillRect(x, y, w, h); },

  stripClick(event) {
    if (!this.layout) return;
    const rect = $("slice-strip").getBoundingClientRect();
    const z = this.layout.nz - 1 - Math.floor((event.clientY - rect.top) / rect.height * this.layout.nz);
    setPlane("axial", z);
  },
});

// Controls: tools and keys (3D Slicer and OHIF habits), a new structure, approval.
Object.assign(editor, {
  setTool(tool) {
    this.tool = tool;
    for (const name of ["brush", "eraser", "lasso"]) $("tool-" + name).setAttribute("aria-pressed", String(name === tool));
    draw();
  },

  setBrush(mm) {
    this.brushMm = Math.max(BRUSH_MM.min, Math.min(BRUSH_MM.max, mm));
    $("brush-mm").value = this.brushMm;
    draw();
  },

  onKey(event) {
    if (!this.layout || !state.info || event.target.closest("input, select, textarea")) return;
    const key = event.key.toLowerCase(), ctrl = event.ctrlKey || event.metaKey;
    const actions = {
      "z": ctrl && (() => (event.shiftKey ? this.redoStep() : this.undoStep())), "y": ctrl && (() => this.redoStep()),
      "b": !ctrl && (() => this.setTool("brush")), "e": !ctrl && (() => this.setTool("eraser")),
      "l": !ctrl && (() => this.setTool("lasso")), "[": () => this.setBrush(this.brushMm - BRUSH_MM.step),
      "]": () => this.setBrush(this.brushMm + BRUSH_MM.step), "escape": () => this.setTool(null),
    };
    if (!actions[key]) return;
    event.preventDefault();
    actions[key]();
  },

  startStructure(event) {
    event.preventDefault();
    const name = $("new-name").value.trim(), display = $("new-display").value.trim() || name;
    if (!STRUCTURE_NAME.test(name)) return setStatus("Structure name: lower-case letters, digits and _, " +
                                                     "starting with a letter (e.g. gtv_primary).", true);
    if (state.info.structures[name]) return setStatus("The job already has " + name + ": choose it above.", true);
    const hex = $("new-colour").value;
    const colour = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    state.info.structures[name] = { display_name: display, colour, hex, confidence: null, volume_ml: 0,
                                    status: "new", flagged_slices: [], slice_range: null };
    state.visible[name] = true;
    buildStructureTable();
    this.active = name;
    this.fillStructureChoice();
    this.fillSupportChoice();
    this.activate(name);
    setStatus("Draw " + display + " on a few slices (three spread over it is enough), then Propagate.");
  },

  async approve() {
    clearTimeout(this.autoTimer);
    if (this.busy) return setStatus("A propagation is running: approve once it is answered.", true);
    if (this.edited.size) await this.propagate();  // approve what the reviewer sees, not the version before it
    if (this.edited.size) return setStatus("The edited slices are not propagated yet: nothing was approved.", true);
    try {
      const approval = await (await api("/v1/segmentations/" + state.job.id + "/approve", { method: "POST" })).json();
      $("approval").textContent = "Approved by " + approval.by + " at " + approval.at + " (" +
        Object.entries(approval.versions).map(([n, v]) => n + " v" + v).join(", ") + ").";
      this.offerDownloads(approval);
    } catch (error) {
      return setStatus("Approval refused: " + error.message, true);
    }
    await this.addToSupportSets();
  },

  // The approved patient into each ticked structure's support set; each outcome (or refusal) listed.
  async addToSupportSets() {
    const names = [...document.querySelectorAll("input[name=add-to-support]:checked")].map((box) => box.value);
    const outcomes = [];
    for (const name of names) {
      const display = state.info.structures[name].display_name;
      try {
        const added = await (await api("/v1/segmentations/" + state.job.id + "/structures/" + name +
                                       "/add-to-support-set", { method: "POST" })).json();
        outcomes.push(["Added to the support set of " + display + ": now " + added.support_set.source_cases +
                       " patients, " + added.support_set.size + " slices (" + added.support_set.id + ").", false]);
      } catch (error) {
        outcomes.push(["Not added to the support set of " + display + ": " + error.message, true]);
      }
    }
    $("support-added").replaceChildren(...outcomes.map(([text, failed]) => {
      const item = document.createElement("li");
      item.textContent = text;
      if (failed) item.className = "error";
      return item;
    }));
  },

  offerDownloads(approval) {
    const job = "/v1/segmentations/" + state.job.id;
    const offers = [];
    if (approval.files.includes("rtstruct.dcm")) offers.push(["Approved RTSTRUCT", job + "/dicom/rtstruct", "rtstruct.dcm"]);
    if (approval.files.includes("seg.dcm")) offers.push(["DICOM-SEG", job + "/dicom/seg", "seg.dcm"]);
    for (const n of Object.keys(approval.versions)) offers.push([n + " (NIfTI)", job + "/masks/" + n, n + ".nii.gz"]);
    $("approved-downloads").replaceChildren(...offers.map(([text, path, filename]) => {
      const item = document.createElement("li"), button = document.createElement("button");
      button.type = "button"; button.textContent = text;
      button.addEventListener("click", () => download(path, filename));
      item.append(button);
      return item;
    }));
  },
});

(function wire() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (e) => editor.pointerDown(e));
  canvas.addEventListener("pointermove", (e) => editor.pointerMove(e));
  canvas.addEventListener("pointerup", () => editor.pointerUp());
  canvas.addEventListener("pointerleave", () => { editor.cursor = null; if (editor.volume) draw(); });
  document.addEventListener("keydown", (e) => editor.onKey(e));
  $("slice-strip").addEventListener("click", (e) => editor.stripClick(e));
  for (const tool of ["brush", "eraser", "lasso"]) $("tool-" + tool).addEventListener("click", () => editor.setTool(tool));
  $("brush-mm").addEventListener("change", () => editor.setBrush(Number($("brush-mm").value)));
  $("lasso-mode").addEventListener("change", () => { editor.lassoMode = $("lasso-mode").value; });
  $("active-structure").addEventListener("change", () => editor.activate($("active-structure").value));
  $("undo").addEventListener("click", () => editor.undoStep());
  $("redo").addEventListener("click", () => editor.redoStep());
  $("propagate").addEventListener("click", () => editor.propagate());
  $("auto-propagate").addEventListener("change", () => { if (editor.edited.size) editor.propagateSoon(); });
  $("compare-draft").addEventListener("change", () => editor.toggleCompare());
  $("next-slice").addEventListener("click", () => { const z = editor.suggested(); if (z !== null) setPlane("axial", z); });
  $("new-structure").addEventListener("submit", (e) => editor.startStructure(e));
  $("approve").addEventListener("click", () => editor.approve());
})();
