// The Signalgraph web chat: talks to this server's OpenAI-compatible API, streams replies over
// SSE, shows generated media inline and each turn's route on demand. The session id and the API
// key (when the server asks for one) live in localStorage, so a reload resumes the session.
"use strict";

const $ = (id) => document.getElementById(id);
const store = window.localStorage;
const state = {
  session: store.getItem("signalgraph.session") || newSessionId(),
  key: store.getItem("signalgraph.key") || "",
  model: null,
  files: [],
  busy: false,
};
store.setItem("signalgraph.session", state.session);

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- the API -----------------------------------------------------------------------------------

async function api(path, options = {}, retried = false) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && !retried) {
    const key = window.prompt("This server needs an API key:");
    if (key) {
      state.key = key.trim();
      store.setItem("signalgraph.key", state.key);
      return api(path, options, true);
    }
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Media URLs need the key too when the server has one, so they are fetched, not linked.
async function mediaSource(url) {
  if (!state.key) return url;
  const response = await api(url);
  return URL.createObjectURL(await response.blob());
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// --- rendering ---------------------------------------------------------------------------------

function bubble(role) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const text = document.createElement("div");
  text.className = "text";
  div.append(text);
  $("log").append(div);
  return div;
}

function scrollDown() { $("log").scrollTop = $("log").scrollHeight; }

async function addMedia(div, items) {
  for (const item of items) {
    const element = document.createElement(item.kind === "image" ? "img" : "audio");
    if (item.kind === "image") element.alt = item.id; else element.controls = true;
    element.className = `generated ${item.kind}`;
    element.dataset.mediaId = item.id;
    div.append(element);
    element.src = await mediaSource(item.url);
  }
}

function withoutLinks(text, media) {
  for (const item of media || []) {
    text = text.replace(`![${item.id}](${item.url})`, "").replace(`[${item.id}](${item.url})`, "");
  }
  return text.trim();
}

function traceLines(trace) {
  return (trace || []).map((entry) => {
    const details = Object.fromEntries(Object.entries(entry).filter(
      ([k, v]) => !["step", "time"].includes(k) && v !== null && v !== "" && !(Array.isArray(v) && !v.length)
        && !(typeof v === "object" && !Array.isArray(v) && !Object.keys(v).length)));
    return `${entry.step.padEnd(9)}${JSON.stringify(details).slice(0, 300)}`;
  }).join("\n");
}

async function finishReply(div, extension) {
  if (!extension) return;
  const text = div.querySelector(".text");
  text.textContent = withoutLinks(text.textContent, extension.media);
  for (const notice of extension.notices || []) {
    const p = document.createElement("div");
    p.className = "notice";
    p.textContent = `! ${notice}`;
    div.append(p);
  }
  if ((extension.citations || []).length) {
    const p = document.createElement("div");
    p.className = "sources";
    p.textContent = `sources: ${extension.citations.join(", ")}`;
    div.append(p);
  }
  if (extension.pending) addAnswerButtons(div);
  await addMedia(div, extension.media || []);
  const trace = document.createElement("div");
  trace.className = "trace";
  trace.textContent = traceLines(extension.trace);
  div.append(trace);
}

// An action waiting for the user's yes or no: two buttons that answer it as the next message.
function addAnswerButtons(div) {
  const row = document.createElement("div");
  row.className = "answer";
  for (const [label, reply] of [["Approve", "yes"], ["Reject", "no"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", () => {
      row.remove();
      $("input").value = reply;
      $("composer").requestSubmit();
    });
    row.append(button);
  }
  div.append(row);
}

function showUserTurn(text, files) {
  const div = bubble("user");
  div.querySelector(".text").textContent = text;
  for (const file of files) {
    const element = document.createElement(file.type.startsWith("image/") ? "img" : "audio");
    if (element.tagName === "AUDIO") element.controls = true;
    element.src = URL.createObjectURL(file);
    div.append(element);
  }
}

function showError(message) {
  bubble("error").querySelector(".text").textContent = message;
  scrollDown();
}

// --- sending -----------------------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function contentParts(text, files) {
  const parts = text ? [{ type: "text", text }] : [];
  for (const file of files) {
    const url = await readAsDataUrl(file);
    if (file.type.startsWith("image/")) {
      parts.push({ type: "image_url", image_url: { url } });
    } else {
      const format = (file.name.split(".").pop() || "wav").toLowerCase();
      parts.push({ type: "input_audio", input_audio: { data: url.slice(url.indexOf(",") + 1), format } });
    }
  }
  return parts;
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  const files = state.files;
  if (state.busy || (!text && !files.length)) return;
  state.busy = true;
  $("send").disabled = true;
  $("input").value = "";
  state.files = [];
  renderAttachments();
  showUserTurn(text, files);
  const div = bubble("assistant");
  div.classList.add("pending");
  scrollDown();
  try {
    const body = { model: state.model, stream: true,
                   messages: [{ role: "user", content: await contentParts(text, files) }] };
    const response = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "X-Session-Id": state.session },
    });
    const out = div.querySelector(".text");
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice.delta.content) { out.textContent += choice.delta.content; scrollDown(); }
      if (choice.finish_reason) await finishReply(div, chunk.signalgraph);
    }
    div.classList.remove("pending");
    div.classList.add("done");
  } catch (error) {
    div.remove();
    showError(error.message);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    scrollDown();
  }
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.files.map((file) => {
    const chip = document.createElement("span");
    chip.textContent = file.name;
    return chip;
  }));
}

// --- start -------------------------------------------------------------------------------------

async function loadHistory() {
  const response = await api(`/v1/sessions/${encodeURIComponent(state.session)}`);
  const history = await response.json();
  for (const turn of history.turns) {
    showUserTurn(turn.user, []);
    const div = bubble("assistant");
    div.querySelector(".text").textContent = turn.assistant || (history.pending ? history.pending.question : "");
    await finishReply(div, { media: turn.media, trace: turn.trace });
  }
  if (history.pending && history.turns.length) addAnswerButtons($("log").lastElementChild);
  scrollDown();
}

async function start() {
  const traceBox = $("show-trace");
  traceBox.checked = store.getItem("signalgraph.trace") === "1";
  document.body.classList.toggle("show-trace", traceBox.checked);
  traceBox.addEventListener("change", () => {
    document.body.classList.toggle("show-trace", traceBox.checked);
    store.setItem("signalgraph.trace", traceBox.checked ? "1" : "0");
  });
  $("new-session").addEventListener("click", () => {
    state.session = newSessionId();
    store.setItem("signalgraph.session", state.session);
    $("log").replaceChildren();
    $("meta").textContent = `${state.model} · session ${state.session}`;
  });
  $("attach-button").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    state.files.push(...$("file").files);
    $("file").value = "";
    renderAttachments();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer").addEventListener("submit", send);
  try {
    const models = await (await api("/v1/models")).json();
    state.model = models.data[0].id;
    $("meta").textContent = `${state.model} · session ${state.session}`;
    await loadHistory();
  } catch (error) {
    $("meta").textContent = "not connected";
    showError(error.message);
  }
}

start();
