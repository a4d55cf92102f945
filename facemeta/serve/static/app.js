// facemeta's web page: plain JavaScript over the JSON API (/api/...). Names from the server are only ever
// written with textContent or drawn on a canvas, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "facemeta-api-key"; // kept for this tab only (sessionStorage), sent as X-API-Key

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, "the server cannot be reached");
  }
  if (response.status === 401) askForKey();
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.blob();
}

// Run a request with its button disabled and spinning; show the server's one-line error below it.
async function busy(button, errorBox, work) {
  errorBox.textContent = "";
  button.disabled = true;
  button.classList.add("busy");
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } catch (e) {
    errorBox.textContent = e.message;
    return undefined;
  } finally {
    button.classList.remove("busy");
    button.removeAttribute("aria-busy");
    refreshButtons();
  }
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || (sessionStorage.getItem(KEY) ? "wrong API key" : "");
  $("key-input").focus();
}

// ---------------------------------------------------------------- drop zones
function setupDrop(label) {
  const input = label.querySelector("input");
  const img = label.querySelector("img");
  const show = () => {
    const file = input.files[0];
    if (img.src) URL.revokeObjectURL(img.src);
    const span = label.querySelector("span");
    span.textContent = file ? file.name : label.dataset.prompt;
    if (file) { img.src = URL.createObjectURL(file); img.hidden = false; } else { img.removeAttribute("src"); img.hidden = true; }
    if (input.multiple) label.dataset.count = input.files.length > 1 ? `${input.files.length} photos` : "";
    refreshButtons();
  };
  label.dataset.prompt = label.querySelector("span").textContent;
  img.addEventListener("error", () => { img.hidden = true; }); // a format the browser cannot show (PGM): the name
  input.addEventListener("change", show);
  label.addEventListener("dragover", (e) => { e.preventDefault(); label.classList.add("over"); });
  label.addEventListener("dragleave", () => label.classList.remove("over"));
  label.addEventListener("drop", (e) => {
    e.preventDefault();
    label.classList.remove("over");
    if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
  });
}

function refreshButtons() {
  const idle = (b) => !b.classList.contains("busy");
  $("verify-btn").disabled = !idle($("verify-btn")) || !$("verify-a").files.length || !$("verify-b").files.length;
  $("identify-btn").disabled = !idle($("identify-btn")) || !$("identify-file").files.length;
  $("enroll-btn").disabled = !idle($("enroll-btn")) || !$("enroll-files").files.length || !$("enroll-name").value.trim();
}

// ---------------------------------------------------------------- verify
async function verify() {
  const form = new FormData();
  form.append("a", $("verify-a").files[0]);
  form.append("b", $("verify-b").files[0]);
  addDomain(form, "domain_a", "verify-domain-a");
  addDomain(form, "domain_b", "verify-domain-b");
  $("verify-result").hidden = true;
  const r = await busy($("verify-btn"), $("verify-error"), () => api("/api/verify", { method: "POST", body: form }));
  if (!r) return;
  $("verify-face-a").src = r.faces[0].aligned;
  $("verify-face-b").src = r.faces[1].aligned;
  const decision = $("verify-decision");
  decision.textContent = r.decision === "same" ? "same person" : "different people";
  decision.className = `badge ${r.decision}`;
  $("verify-score").textContent = r.score.toFixed(3);
  const far = r.threshold_far ? ` (FAR ${r.threshold_far})` : "";
  $("verify-threshold").textContent = r.threshold.toFixed(3) + far;
  const pct = (x) => `${Math.max(0, Math.min(1, (x + 1) / 2)) * 100}%`; // cosine -1..1 on the bar
  $("verify-bar").style.width = pct(r.score);
  $("verify-mark").style.left = pct(r.threshold);
  $("verify-result").hidden = false;
}

// ---------------------------------------------------------------- identify
async function identify() {
  const file = $("identify-file").files[0];
  const form = new FormData();
  form.append("image", file);
  form.append("top_k", "3");
  form.append("preview", "true"); // the server's decoded image: any format it reads, boxes in its pixels
  addDomain(form, "domain", "identify-domain");
  $("identify-result").hidden = true;
  const r = await busy($("identify-btn"), $("identify-error"), () => api("/api/identify", { method: "POST", body: form }));
  if (!r) return;
  const picture = new Image();
  picture.src = r.image.preview;
  try { await picture.decode(); } catch (e) { $("identify-error").textContent = "cannot show the image"; return; }
  const canvas = $("identify-canvas");
  const scale = Math.min(560 / r.image.width, 320 / r.image.height); // small photos are drawn larger
  canvas.width = Math.round(r.image.width * scale);
  canvas.height = Math.round(r.image.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const list = $("identify-list");
  list.replaceChildren();
  ctx.lineWidth = 2;
  ctx.font = "bold 13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  r.faces.forEach((f, i) => {
    const [x1, y1, x2, y2] = f.box.map((v) => v * scale);
    const known = f.identity !== "unknown";
    const colour = known ? "#1e8e4e" : "#c8372d";
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const label = `${i + 1}. ${f.identity}${f.score == null ? "" : " " + f.score.toFixed(2)}`;
    const w = ctx.measureText(label).width + 8;
    const ty = y1 >= 18 ? y1 - 18 : y2;
    ctx.fillStyle = colour;
    ctx.fillRect(x1, ty, w, 18);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x1 + 4, ty + 2);
    const li = document.createElement("li");
    const cands = f.candidates.map((c) => `${c.identity} ${c.score.toFixed(3)}`).join(", ");
    li.textContent = `${f.identity}${f.score == null ? "" : ` (${f.score.toFixed(3)})`}` + (cands ? ` — candidates: ${cands}` : "");
    li.dataset.identity = f.identity;
    list.append(li);
  });
  const far = r.threshold_far ? ` at FAR ${r.threshold_far}` : "";
  $("identify-threshold").textContent = r.threshold == null ? "" : `threshold ${r.threshold.toFixed(3)}${far}`;
  $("identify-result").hidden = false;
}

// ---------------------------------------------------------------- enroll
async function enroll() {
  const name = $("enroll-name").value.trim();
  const form = new FormData();
  form.append("name", name);
  addDomain(form, "domain", "enroll-domain");
  $("enroll-result").hidden = true;
  for (const f of $("enroll-files").files) form.append("images", f);
  const r = await busy($("enroll-btn"), $("enroll-error"), () => api("/api/enroll", { method: "POST", body: form }));
  if (!r) return;
  const parts = [`${r.name}: ${r.added} photo(s) added`];
  if (r.already) parts.push(`${r.already} already enrolled`);
  const failed = r.skipped.filter((s) => !s.reason.startsWith("already enrolled"));
  if (failed.length) parts.push(`skipped ${failed.map((s) => `${s.file} (${s.reason})`).join("; ")}`);
  $("enroll-result").textContent = parts.join(" · ");
  $("enroll-result").hidden = false;
  $("enroll-name").value = "";  // ready for the next person
  $("enroll-files").value = "";
  $("enroll-files").dispatchEvent(new Event("change"));
  loadPeople();
  if (form.has("domain")) loadDomains(); // its enrolled count changed
}

// ---------------------------------------------------------------- gallery
async function thumbnail(person, holder) {
  try {
    const blob = await api(person.thumbnail);
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = `aligned face of ${person.name}`;
    img.src = URL.createObjectURL(blob);
    holder.replaceWith(img);
  } catch (e) { /* keep the initials */ }
}

function personRow(person) {
  const li = document.createElement("li");
  li.dataset.name = person.name;
  const holder = document.createElement("div");
  holder.className = "thumb";
  holder.textContent = person.name.slice(0, 2).toUpperCase();
  const who = document.createElement("div");
  who.className = "who";
  const name = document.createElement("strong");
  name.className = "name";
  name.textContent = person.name;
  const count = document.createElement("span");
  count.className = "muted";
  count.textContent = ` · ${person.count} photo${person.count === 1 ? "" : "s"}`;
  who.append(name, count);
  const error = document.createElement("p");
  error.className = "error";
  who.append(error);
  const rename = document.createElement("button");
  rename.className = "small rename";
  rename.type = "button";
  rename.textContent = "Rename";
  const remove = document.createElement("button");
  remove.className = "small danger remove";
  remove.type = "button";
  remove.textContent = "Remove";

  rename.addEventListener("click", () => {
    if (rename.dataset.editing) return;
    rename.dataset.editing = "1";
    const input = document.createElement("input");
    input.type = "text";
    input.className = "new-name";
    input.value = person.name;
    input.maxLength = 256;
    name.replaceWith(input);
    rename.textContent = "Save";
    input.focus();
    const save = async () => {
      const r = await busy(rename, error, () => api(`/api/people/${encodeURIComponent(person.name)}`, {
        method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name: input.value }),
      }));
      if (r) loadPeople();
    };
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); if (e.key === "Escape") loadPeople(); });
    rename.onclick = save;
  });
  remove.addEventListener("click", async () => {
    if (!remove.dataset.armed) { // a second click confirms
      remove.dataset.armed = "1";
      remove.textContent = "Really remove?";
      return;
    }
    const r = await busy(remove, error, () => api(`/api/people/${encodeURIComponent(person.name)}`, { method: "DELETE" }));
    if (r) loadPeople();
  });
  li.append(holder, who, rename, remove);
  thumbnail(person, holder);
  return li;
}

async function loadPeople() {
  try {
    const r = await api("/api/people");
    $("gallery-error").textContent = "";
    $("people").replaceChildren(...r.people.map(personRow));
    $("people-count").textContent = `— ${r.count} ${r.count === 1 ? "person" : "people"}`;
    $("people-empty").hidden = r.count > 0;
    loadInfo(); // the header's counts
  } catch (e) {
    if (e.status !== 401) $("gallery-error").textContent = e.message;
  }
}

async function loadInfo() {
  try {
    const r = await api("/api/info");
    const m = r.model;
    const far = m.threshold_far ? ` at FAR ${m.threshold_far}` : "";
    const mode = [r.server.read_only ? "read-only" : "", r.server.auth ? "API key" : ""].filter(Boolean).join(", ");
    $("info").textContent = `model ${m.name} (${m.fingerprint}, ${m.embedding_size}-d, threshold `
      + `${m.threshold == null ? "none" : m.threshold.toFixed(3)}${far}) · gallery ${r.gallery.name}: `
      + `${r.gallery.people} people, ${r.gallery.embeddings} photos` + (mode ? ` · ${mode}` : "");
    if (r.server.read_only) {
      $("enroll").hidden = true;
      $("domain-add").hidden = true;
      document.body.classList.add("read-only");
    }
    $("key-form").hidden = true;
    return true;
  } catch (e) {
    $("info").textContent = e.status === 401 ? "API key needed" : e.message;
    return false;
  }
}

async function start() {
  if (await loadInfo()) loadPeople();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".drop").forEach(setupDrop);
  $("enroll-name").addEventListener("input", refreshButtons);
  $("verify-btn").addEventListener("click", verify);
  $("identify-btn").addEventListener("click", identify);
  $("enroll-btn").addEventListener("click", enroll);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key-input").value.trim());
    $("key-input").value = "";
    start();
  });
  refreshButtons();
  start();
});
