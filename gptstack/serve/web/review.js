// The review page: sign in with a reviewer's API key, claim the next item, label it, see each batch's kappa.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null; // the claimed item

function status(text) { $("status").textContent = text; }

async function api(method, path, body) {
  const h = { "Authorization": "Bearer " + $("api-key").value.trim() };
  if (body !== undefined) h["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error ? data.error.message : r.status + " " + r.statusText);
  return data;
}

function promptText(prompt) {
  if (typeof prompt === "string") return prompt;
  return prompt.map((m) => m.role + ": " + (typeof m.content === "string" ? m.content : JSON.stringify(m.content))).join("\n\n");
}

function show(item) {
  current = item;
  $("item").hidden = !item;
  $("empty").hidden = !!item;
  if (!item) return;
  $("item-id").textContent = item.id;
  $("stage").textContent = item.stage === "adjudicate" ? "adjudication (the first two reviewers disagreed)" : "label";
  $("reasons").textContent = item.reasons.join(", ");
  $("comment").hidden = !item.comment;
  $("comment").textContent = item.comment ? "user's comment: " + item.comment : "";
  $("prompt").textContent = promptText(item.prompt);
  $("response").textContent = item.response;
  $("label-form").reset();
}

function fmt(x) { return x === null || x === undefined ? "–" : x.toFixed(3); }

async function loadStats() {
  const s = await api("GET", "/v1/review/stats");
  $("totals").textContent = `${s.open} open · ${s.adjudicate} awaiting adjudication · ${s.done} done`;
  $("stats").tBodies[0].replaceChildren(...s.batches.map((b) => {
    const tr = document.createElement("tr");
    for (const v of [b.batch, b.items, b.labelled_twice, fmt(b.agreement), fmt(b.kappa)]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    return tr;
  }));
}

async function next() {
  const claim = await api("POST", "/v1/review/next");
  $("who").textContent = "signed in as " + claim.reviewer;
  show(claim.item);
  await loadStats();
}

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionStorage.setItem("gptstack-review-key", $("api-key").value);
  try { await next(); status(""); } catch (err) { show(null); $("empty").hidden = true; status("sign-in failed: " + err.message); }
});

$("label-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const label = new FormData($("label-form")).get("label");
  const text = $("correction").value.trim();
  try {
    const r = await api("POST", `/v1/review/items/${current.id}/label`, text ? { label, text } : { label });
    status(`item ${r.id} labelled ${label} (now ${r.state})`);
    await next();
  } catch (err) { status("label failed: " + err.message); }
});

$("api-key").value = sessionStorage.getItem("gptstack-review-key") || "";
