// The web chat page of `scalelm serve` (scalelm/serve/webchat.py serves it at `/`).
//
// A client of the server's own OpenAI API, nothing more: GET v1/models for the model's name and
// POST v1/chat/completions with `stream: true` for each reply, read as server-sent events with
// fetch + ReadableStream. The conversation lives in this page (`history`) and goes with every
// request as `messages`, as with any OpenAI client. Model output, error messages and the model's
// name are written with textContent / text nodes, never as markup: a reply that says
// `<img onerror=...>` shows those characters. URLs are relative, so the page also works behind a
// proxy that serves it under a path prefix.
"use strict";

const KEY_STORE = "scalelm.apiKey"; // sessionStorage: the key lives as long as the tab

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), settings: $("settings"), key: $("api-key"), system: $("system"),
  temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"),
  transcript: $("transcript"), status: $("status"), form: $("composer"), input: $("input"),
  send: $("send"), stop: $("stop"), clear: $("clear"),
};

const chat = {
  model: null,      // the served model's id (sent as `model`)
  history: [],      // finished turns: {role: "user" | "assistant", content}
  controller: null, // the AbortController of the reply being streamed, if any
  epoch: 0,         // +1 on Clear: a reply still ending then belongs to no conversation
};

// ------------------------------------------------------------------------------------ requests
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.key.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The message of an error answer: OpenAI's {"error": {"message"}} shape, else the HTTP status.
async function errorMessage(resp) {
  let message = "";
  try {
    const body = await resp.json();
    message = (body && body.error && body.error.message) || "";
  } catch (_) { /* not JSON: a proxy's page, say */ }
  return `${resp.status} ${resp.statusText || "error"}${message ? ": " + message : ""}`;
}

function needsKey(status) {
  if (status !== 401) return;
  ui.settings.open = true; // where the key goes
  if (!ui.key.value) ui.key.focus();
}

async function loadModel() {
  ui.model.textContent = "connecting\u2026";
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (!resp.ok) {
      needsKey(resp.status);
      ui.model.textContent = "no model";
      setStatus(resp.status === 401 ? "This server needs an API key: type it in Settings. (" +
        await errorMessage(resp) + ")" : "Could not list the models: " + await errorMessage(resp), true);
      return;
    }
    const card = ((await resp.json()).data || [])[0];
    chat.model = card ? card.id : null;
    ui.model.textContent = card ? `${card.id}${card.max_model_len ? ` \u00b7 context ${card.max_model_len}` : ""}`
                                : "no model";
    setStatus("");
  } catch (e) {
    ui.model.textContent = "offline";
    setStatus("Could not reach the server: " + e.message, true);
  }
}

// The `data:` payloads of a server-sent-event stream, one per event (a multi-line payload joined
// with "\n", as the SSE spec says); comments and other fields are skipped.
async function* sseData(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
      if (done) {
        if (data.length) yield data.join("\n");
        return;
      }
    }
  } finally {
    if (!signal.aborted) reader.cancel().catch(() => {}); // stop reading a stream we left early
  }
}

// The request body from the settings; an empty field leaves the server's default.
function requestBody(messages) {
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (chat.model) body.model = chat.model;
  const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
  const temperature = number(ui.temperature), topP = number(ui.topP);
  const maxTokens = number(ui.maxTokens), seed = number(ui.seed);
  if (temperature !== null) body.temperature = temperature;
  if (topP !== null) body.top_p = topP;
  if (maxTokens !== null) body.max_tokens = maxTokens;
  if (seed !== null) body.seed = seed;
  return body;
}

// ------------------------------------------------------------------------------------ the page
function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

function nearBottom() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 40;
}

function scrollDown(follow) {
  if (follow) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

// One turn in the transcript: a label ("You", the model) and its text, as text.
function addTurn(role, text, label) {
  const turn = document.createElement("article");
  turn.className = "turn " + role;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = label;
  const body = document.createElement("div");
  body.className = "text";
  const textNode = document.createTextNode(text);
  body.append(textNode);
  turn.append(who, body);
  ui.transcript.append(turn);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return { turn, body, textNode };
}

function addNote(turn, text, className) {
  const note = document.createElement("p");
  note.className = className;
  note.textContent = text;
  turn.append(note);
  return note;
}

// "12 tokens · 34.5 tokens/s · first token 120 ms": tokens/s is the decode speed, the tokens after
// the first over the time after the first (the time to the first token, mostly the prompt's
// prefill, is shown beside it); a one-token reply counts from the request. Without `usage` (a
// stopped reply) the tokens are the streamed chunks, about one per token.
function stats(t) {
  const n = t.usage ? t.usage.completion_tokens : t.chunks;
  const parts = [`${t.usage ? "" : "\u2248"}${n} token${n === 1 ? "" : "s"}`];
  let rate = null;
  if (n >= 2 && t.last > t.first) rate = (n - 1) / ((t.last - t.first) / 1000);
  else if (n >= 1 && t.last > t.start) rate = n / ((t.last - t.start) / 1000);
  if (rate !== null) parts.push(`${rate.toFixed(1)} tokens/s`);
  if (t.first !== null) parts.push(`first token ${Math.round(t.first - t.start)} ms`);
  return { text: parts.join(" \u00b7 "), rate };
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || chat.controller) return;
  const invalid = [ui.temperature, ui.topP, ui.maxTokens, ui.seed].find((input) => !input.checkValidity());
  if (invalid) { // a setting out of its range: the browser says which, and why
    ui.settings.open = true;
    invalid.reportValidity();
    return;
  }
  const epoch = chat.epoch;
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.history, { role: "user", content: text });

  ui.input.value = "";
  const user = addTurn("user", text, "You");
  const reply = addTurn("assistant", "", chat.model || "assistant");
  reply.turn.setAttribute("aria-busy", "true"); // screen readers announce the reply once, when done
  const controller = (chat.controller = new AbortController());
  setBusy(true);
  setStatus("");

  const t = { start: performance.now(), first: null, last: null, chunks: 0, usage: null };
  let content = "", finish = null, error = null;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
    });
    if (!resp.ok) {
      needsKey(resp.status);
      error = await errorMessage(resp);
    } else {
      for await (const data of sseData(resp.body, controller.signal)) {
        if (data === "[DONE]") break;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          error = "The server sent an event that is not JSON.";
          break;
        }
        if (chunk.error) { // a decode step failed after the 200 was sent
          error = chunk.error.message || "The server reported an error.";
          break;
        }
        if (chunk.usage) t.usage = chunk.usage;
        const choice = (chunk.choices || [])[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          const follow = nearBottom();
          t.last = performance.now();
          if (t.first === null) t.first = t.last;
          t.chunks += 1;
          content += delta;
          reply.textNode.appendData(delta);
          scrollDown(follow);
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") error = "The request failed: " + e.message;
  } finally {
    chat.controller = null;
    setBusy(false);
    reply.turn.removeAttribute("aria-busy");
  }

  if (epoch !== chat.epoch) return; // cleared meanwhile
  const stopped = controller.signal.aborted;
  if (error === null && (content || !stopped)) {
    // a finished (or stopped, with some text) reply is part of the conversation from now on
    chat.history.push({ role: "user", content: text }, { role: "assistant", content });
    const s = stats(t);
    let note = s.text;
    if (stopped) note += " \u00b7 stopped";
    else if (finish === "length") note += " \u00b7 cut at max tokens";
    const el = addNote(reply.turn, note, "stats");
    if (s.rate !== null) el.dataset.tokensPerSecond = s.rate.toFixed(3);
  } else {
    // not part of the conversation: the next request will not send this turn
    user.turn.classList.add("failed");
    addNote(user.turn, "not sent with later messages", "note");
    if (stopped) {
      addNote(reply.turn, "stopped before the first token", "stats");
    } else {
      reply.turn.classList.add("error");
      reply.body.setAttribute("role", "alert");
      reply.textNode.appendData((content ? "\n\n" : "") + error);
    }
    if (!ui.input.value) ui.input.value = text; // to send again, after fixing the key, say
  }
  scrollDown(true);
  if (!stopped) ui.input.focus();
}

function stop() {
  if (chat.controller) chat.controller.abort(); // the server cancels a request whose client went away
}

function clear() {
  stop();
  chat.epoch += 1;
  chat.history = [];
  ui.transcript.replaceChildren();
  setStatus("");
  ui.input.focus();
}

// ------------------------------------------------------------------------------------ wiring
ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  } else if (e.key === "Escape") {
    stop();
  }
});
ui.stop.addEventListener("click", stop);
ui.clear.addEventListener("click", clear);
ui.key.addEventListener("input", () => {
  try {
    sessionStorage.setItem(KEY_STORE, ui.key.value.trim());
  } catch (_) { /* storage off: the key lasts until the page reloads */ }
});
ui.key.addEventListener("change", loadModel); // on Enter or leaving the field: try the key

try {
  ui.key.value = sessionStorage.getItem(KEY_STORE) || "";
} catch (_) { /* storage off */ }
loadModel();
ui.input.focus();
