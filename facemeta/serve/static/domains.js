// The domain parts of facemeta's web page (GET/POST/DELETE /api/domains): pick the domain each photo comes from
// (verify A and B, identify, enroll), and add unlabelled photos of any people to a domain. Uses app.js's $, api
// and busy; names are only ever written with textContent.
"use strict";

const DOMAIN_PICKS = ["verify-domain-a", "verify-domain-b", "identify-domain", "enroll-domain"];

// Append a picked domain to a request's form (nothing for the default domain).
function addDomain(form, field, selectId) {
  const value = $(selectId) ? $(selectId).value : "";
  if (value) form.append(field, value);
}

function fillPicks(domains) {
  for (const id of DOMAIN_PICKS) {
    const select = $(id);
    if (!select) continue;
    const keep = select.value;
    const none = document.createElement("option");
    none.value = "";
    none.textContent = "default domain (no normalisation)";
    const options = domains.map((d) => {
      const o = document.createElement("option");
      o.value = d.name;
      o.textContent = `${d.name} (${d.photos} photo${d.photos === 1 ? "" : "s"})`;
      return o;
    });
    select.replaceChildren(none, ...options);
    select.value = domains.some((d) => d.name === keep) ? keep : "";
  }
}

function domainRow(d) {
  const li = document.createElement("li");
  li.dataset.domain = d.name;
  const who = document.createElement("div");
  who.className = "who";
  const name = document.createElement("strong");
  name.className = "name";
  name.textContent = d.name;
  const facts = document.createElement("span");
  facts.className = "muted";
  const stab = d.stability == null ? "one photo" : `estimate ${d.stability_word} (${d.stability.toFixed(3)})`;
  const thr = d.threshold == null ? "not calibrated" : `threshold ${d.threshold.toFixed(3)} at FAR ${d.far}`;
  facts.textContent = ` · ${d.photos} photo${d.photos === 1 ? "" : "s"} · ${d.enrolled} enrolled · ${stab} · ${thr}`;
  const error = document.createElement("p");
  error.className = "error";
  who.append(name, facts, error);
  const remove = document.createElement("button");
  remove.className = "small danger remove";
  remove.type = "button";
  remove.textContent = "Remove";
  remove.addEventListener("click", async () => {
    if (!remove.dataset.armed) { // a second click confirms
      remove.dataset.armed = "1";
      remove.textContent = "Really remove?";
      return;
    }
    const r = await busy(remove, error, () => api(`/api/domains/${encodeURIComponent(d.name)}`, { method: "DELETE" }));
    if (r) loadDomains();
  });
  li.append(who, remove);
  return li;
}

async function loadDomains() {
  try {
    const r = await api("/api/domains");
    $("domains-error").textContent = "";
    fillPicks(r.domains);
    $("domain-list").replaceChildren(...r.domains.map(domainRow));
    $("domains-empty").hidden = r.count > 0;
    $("domains-default").textContent = `Photos without a domain: ${r.default}.`;
  } catch (e) {
    if (e.status !== 401) $("domains-error").textContent = e.message;
  }
}

async function addDomainPhotos() {
  const form = new FormData();
  form.append("name", $("domain-name").value.trim());
  for (const f of $("domain-files").files) form.append("images", f);
  $("domain-result").hidden = true;
  const r = await busy($("domain-btn"), $("domain-error"), () => api("/api/domains", { method: "POST", body: form }));
  refreshDomainButton(); // busy() re-enables app.js's buttons only
  if (!r) return;
  const parts = [`${r.name}: ${r.added} photo(s) added`];
  if (r.already) parts.push(`${r.already} already counted`);
  if (r.skipped.length) parts.push(`skipped ${r.skipped.map((s) => `${s.file} (${s.reason})`).join("; ")}`);
  if (r.warning) parts.push(r.warning);
  $("domain-result").textContent = parts.join(" · ");
  $("domain-result").hidden = false;
  $("domain-files").value = "";
  $("domain-files").dispatchEvent(new Event("change"));
  loadDomains();
}

function refreshDomainButton() {
  const b = $("domain-btn");
  b.disabled = b.classList.contains("busy") || !$("domain-files").files.length || !$("domain-name").value.trim();
}

document.addEventListener("DOMContentLoaded", () => {
  $("domain-name").addEventListener("input", refreshDomainButton);
  $("domain-files").addEventListener("change", refreshDomainButton);
  $("domain-btn").addEventListener("click", addDomainPhotos);
  refreshDomainButton();
  loadDomains();
});
