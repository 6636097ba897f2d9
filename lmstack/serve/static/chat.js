// lmstack chat page: talks to this server's OpenAI-compatible API with streaming (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // sent with every turn: [{role, content}]
let controller = null; // AbortController of the reply being streamed

$("api_key").value = localStorage.getItem("lmstack_api_key") || "";
$("api_key").addEventListener("change", () => {
  localStorage.setItem("lmstack_api_key", $("api_key").value);
  loadModels();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.textContent = "";
  for (const model of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.appendChild(option);
  }
  if (previous) select.value = previous;
  showError("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function numberOr(id, fallback) {
  const value = $(id).value.trim();
  return value === "" ? fallback : Number(value);
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : [...conversation];
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOr("temperature", 0.7),
    top_p: numberOr("top_p", 1),
    max_tokens: numberOr("max_tokens", 256),
  };
  const seed = numberOr("seed", null);
  if (seed !== null) body.seed = seed;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Parse server-sent events from a fetch body; calls onEvent(parsed JSON) per `data:` line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function showStats(tokens, firstAt, endAt, startAt, final) {
  if (!firstAt) return;
  const seconds = Math.max((endAt - firstAt) / 1000, 1e-3);
  const rate = tokens > 1 ? (tokens - 1) / seconds : 0;
  $("stats").textContent =
    `${tokens} tokens · ${rate.toFixed(1)} tokens/s · first token ${((firstAt - startAt) / 1000).toFixed(2)} s` +
    (final ? "" : " …");
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const content = div.querySelector(".content");
  let reply = "";
  let pieces = 0;
  let scrollQueued = false;
  let usageTokens = null;
  const startAt = performance.now();
  let firstAt = null;
  controller = new AbortController();
  setBusy(true);
  showError("");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usageTokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (!piece) continue;
        if (firstAt === null) firstAt = performance.now();
        pieces += 1;
        reply += piece;
        // Append the piece as a text node and scroll at most once a frame: re-setting the whole reply per
        // chunk is quadratic in its length, and a fast server streaming thousands of chunks froze the page.
        content.append(piece);
        if (!scrollQueued) {
          scrollQueued = true;
          requestAnimationFrame(() => {
            scrollQueued = false;
            div.scrollIntoView({ block: "end" });
          });
        }
      }
      showStats(usageTokens ?? pieces, firstAt, performance.now(), startAt, false);
    });
    showStats(usageTokens ?? pieces, firstAt, performance.now(), startAt, true);
  } catch (err) {
    if (err.name === "AbortError") {
      div.classList.add("stopped");
      showStats(pieces, firstAt, performance.now(), startAt, true);
    } else {
      showError(err.message);
    }
  } finally {
    div.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
  if (reply) conversation.push({ role: "assistant", content: reply });
  else conversation.pop(); // nothing came back: let the user edit and resend the message
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (controller) controller.abort();
});

$("reset").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").textContent = "";
  $("stats").textContent = "";
});

loadModels();
