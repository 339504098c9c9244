// dicomnode admin page: the token, buttons that post to the API, thumbnails, the rule test dialog. No framework.
"use strict";
const TOKEN_KEY = "dicomnode-admin-token";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function flash(text, isError, keep) {
  const box = document.getElementById("flash");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = false;
  if (keep) sessionStorage.setItem("dicomnode-flash", JSON.stringify([text, !!isError]));  // shown again after the reload
}

async function call(url, body, method) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined && body !== null) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const response = await fetch(url, { method: method || "POST", headers, body: payload });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  return { ok: response.ok, status: response.status, data };
}

function describe(result) {
  const d = result.data || {};
  if (result.ok) return d.message || "done";
  let text = `${result.status}: ${typeof d.detail === "string" ? d.detail : JSON.stringify(d.detail || d)}`;
  if (d.errors) text += " — " + d.errors.map(e => `${e.key}: ${e.reason}`).join("; ");
  if (result.status === 401) text += " (type the admin token at the top right)";
  return text;
}

function esc(value) {
  return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function setupToken() {
  const form = document.getElementById("token-form");
  const state = document.getElementById("token-state");
  const show = () => { state.textContent = token() ? "token set" : "no token"; state.className = token() ? "ok" : "muted"; };
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const value = document.getElementById("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, value);
    document.cookie = "dicomnode_token=" + encodeURIComponent(value) + "; path=/; SameSite=Strict";
    document.getElementById("token-input").value = "";
    show();
    loadThumbnails();
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    document.cookie = "dicomnode_token=; path=/; max-age=0; SameSite=Strict";
    show();
  });
  show();
}

function setupButtons() {
  document.querySelectorAll("[data-action]").forEach(button => {
    button.addEventListener("click", async () => {
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      button.disabled = true;
      const result = await call(button.dataset.action, button.dataset.body ? JSON.parse(button.dataset.body) : null);
      const target = button.dataset.target && document.getElementById(button.dataset.target);
      if (target) {
        const d = result.data || {};
        target.textContent = result.ok ? `${d.ok ? "✔" : "✘"} ${d.detail} (${d.seconds} s)` : describe(result);
        target.className = "echo-result " + (result.ok && d.ok ? "ok" : "bad");
      } else {
        flash(describe(result), !result.ok, result.ok && !!button.dataset.reload);
      }
      button.disabled = false;
      if (result.ok && button.dataset.reload) setTimeout(() => window.location.reload(), 600);
    });
  });
}

async function loadThumbnails() {
  for (const img of document.querySelectorAll("img[data-src]")) {
    if (!token()) { img.alt = "type the admin token to see images"; continue; }
    const response = await fetch(img.dataset.src, { headers: { Authorization: "Bearer " + token() } });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
    else {
      let detail = "";
      try { detail = (await response.json()).detail; } catch (e) { detail = response.statusText; }
      img.alt = detail;
    }
  }
}

function ruleTable(result) {
  let html = "";
  for (const s of result.series || []) {
    html += `<h3>Series …${esc(s.series_uid.slice(-20))} <small class="muted">${esc(s.modality || "?")}, ${s.instances} instances, sender ${esc(s.calling_aet || "none")}</small></h3>`;
    html += `<p class="rule-verdict"><b>${esc(s.action)}</b>` + (s.rule ? ` by rule <b>${esc(s.rule)}</b>` : " (no rule matched: unmatched policy)") +
      (s.model ? ` with model <b>${esc(s.model)}</b>` : "") + ` → ${esc(s.destinations.join(", ") || "no destination")}; ${s.matched} of ${s.instances} instances</p>`;
    html += "<table class='compact'><thead><tr><th>rule</th><th>result</th><th>why not</th></tr></thead><tbody>";
    for (const r of s.rules_tried) {
      const why = (r.why || []).map(w => w.key ? `<code>${esc(w.key)}</code> wants <code>${esc(JSON.stringify(w.expected))}</code>, ${w.instances_matching} match; seen ${w.seen.map(v => `<code>${esc(v)}</code>`).join(", ")}` : esc(w.seen.join(" "))).join("<br>");
      html += `<tr><td>${esc(r.rule)}</td><td>${esc(r.result)}</td><td>${why}</td></tr>`;
    }
    html += "</tbody></table>";
  }
  for (const k of result.skipped || []) html += `<p class="error">${esc(k.file)}: ${esc(k.reason)}</p>`;
  return html || "<p class='muted'>no series</p>";
}

function setupRuleTest() {
  const dialog = document.getElementById("rule-test");
  if (!dialog) return;
  document.getElementById("rule-test-open").addEventListener("click", () => dialog.showModal());
  document.getElementById("rule-test-close").addEventListener("click", () => dialog.close());
  document.getElementById("rule-test-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const form = new FormData();
    const job = document.getElementById("rule-test-job").value;
    if (job) form.append("job", job);
    for (const file of document.getElementById("rule-test-files").files) form.append("files", file);
    const aet = document.getElementById("rule-test-aet").value;
    if (aet) form.append("calling_aet", aet);
    const out = document.getElementById("rule-test-result");
    out.innerHTML = "<p class='muted'>testing…</p>";
    const result = await call("/api/rules/test", form);
    out.innerHTML = result.ok ? ruleTable(result.data) : `<p class="error">${esc(describe(result))}</p>`;
  });
}

function setupRefresh() {
  const box = document.getElementById("autorefresh");
  if (!box) return;
  box.checked = sessionStorage.getItem("dicomnode-refresh") === "1";
  box.addEventListener("change", () => sessionStorage.setItem("dicomnode-refresh", box.checked ? "1" : "0"));
  setInterval(() => { if (box.checked) window.location.reload(); }, 10000);
}

document.addEventListener("DOMContentLoaded", () => {
  const kept = sessionStorage.getItem("dicomnode-flash");  // a message from before a reload
  if (kept) { const [text, isError] = JSON.parse(kept); sessionStorage.removeItem("dicomnode-flash"); flash(text, isError, false); }
  setupToken();
  setupButtons();
  setupRuleTest();
  setupRefresh();
  loadThumbnails();
});
