// gptstack web chat: streams /v1/chat/completions (server-sent events), stop, model picker,
// temperature, system prompt, thumbs feedback (/v1/feedback), images (attach button, paste, drop:
// sent as OpenAI image_url parts with data: URLs). No build step, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];          // {role, content}: content a string, or [image_url parts…, text part]
const pending = [];          // data: URLs of the images attached to the next message
let controller = null;       // AbortController of the request in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    $("model").replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    status("");
  } catch (e) { status("could not list models: " + e.message); }
}

function thumbnail(url) {
  const img = document.createElement("img");
  img.src = url; img.alt = "attached image";
  return img;
}

function showPending() {
  $("attachments").replaceChildren(...pending.map((url, i) => {
    const fig = document.createElement("figure");
    const remove = document.createElement("button");
    remove.type = "button"; remove.textContent = "×"; remove.title = "remove this image";
    remove.onclick = () => { pending.splice(i, 1); showPending(); };
    fig.append(thumbnail(url), remove);
    return fig;
  }));
}

function attach(files) {  // image Files → data: URLs in `pending`
  for (const file of files) {
    if (!file.type.startsWith("image/")) { status(file.name + " is not an image"); continue; }
    const reader = new FileReader();
    reader.onload = () => { pending.push(reader.result); showPending(); status(pending.length + " image(s) attached"); };
    reader.onerror = () => status("could not read " + file.name);
    reader.readAsDataURL(file);
  }
}

function addMessage(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  for (const url of images) div.append(thumbnail(url));
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  div.append(body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function addFeedback(div, responseId, model) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.append((model ? model + " · " : "") + "rate this answer:");
  for (const [rating, label] of [["up", "▲ good"], ["down", "▼ bad"]]) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = label; b.dataset.rating = rating; b.title = "thumbs " + rating;
    b.onclick = async () => {
      const r = await fetch("/v1/feedback", { method: "POST", headers: headers(),
        body: JSON.stringify({ response_id: responseId, rating }) });
      if (r.ok) {
        meta.querySelectorAll("button").forEach((x) => x.classList.toggle("chosen", x === b));
        status("feedback stored, thank you");
      } else { status("feedback failed: " + (await r.text())); }
    };
    meta.append(b);
  }
  div.append(meta);
}

async function send(text) {
  const images = pending.splice(0);
  showPending();
  const parts = images.map((url) => ({ type: "image_url", image_url: { url } }));
  const turn = { role: "user", content: parts.length ? [...parts, { type: "text", text }] : text };
  history.push(turn);
  addMessage("user", text, images);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".body");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  status("generating…");
  let responseId = null, finish = null, model = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("model").value, messages, stream: true,
        temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10) }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let at;
      while ((at = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, at); buffer = buffer.slice(at + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        responseId = chunk.id;
        model = chunk.model;
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) { out.textContent += c.delta.content; div.scrollIntoView({ block: "end" }); }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    status(finish === "content_filter" ? "stopped by moderation" : "done (" + finish + ")");
  } catch (e) {
    if (e.name === "AbortError") { status("stopped"); finish = "stopped"; }
    else {  // a refused turn (a bad image…) leaves the history, so the next message is not refused for it
      div.classList.add("error"); out.textContent = "error: " + e.message; status("");
      history.splice(history.indexOf(turn), 1);
    }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
  div.dataset.finish = finish || "";
  if (out.textContent && !div.classList.contains("error")) history.push({ role: "assistant", content: out.textContent });
  if (responseId) { div.dataset.responseId = responseId; addFeedback(div, responseId, model); }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  history.length = 0; pending.length = 0; showPending(); $("log").replaceChildren(); status("");
});
$("attach").addEventListener("click", () => $("image-file").click());
$("image-file").addEventListener("change", () => { attach($("image-file").files); $("image-file").value = ""; });
$("input").addEventListener("paste", (ev) => {
  const files = [...(ev.clipboardData ? ev.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { ev.preventDefault(); attach(files); }
});
document.addEventListener("dragover", (ev) => { ev.preventDefault(); document.body.classList.add("dropping"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
document.addEventListener("drop", (ev) => {
  ev.preventDefault(); document.body.classList.remove("dropping");
  if (ev.dataTransfer) attach(ev.dataTransfer.files);
});
$("api-key").addEventListener("change", () => { localStorage.setItem("gptstack-key", $("api-key").value); loadModels(); });
$("api-key").value = localStorage.getItem("gptstack-key") || "";
loadModels();
