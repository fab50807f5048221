// pureapi's chat page: plain browser JavaScript, served by pureapi itself, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "pureapi.apiKey";
const SESSION_STORE = "pureapi.session";
let current = null; // the open session's id
let busy = false; // a reply is streaming
// Bumped by every openSession and every send: a session read overtaken by a later one, or by a
// message sent meanwhile, must not replace what is on the page.
let opening = 0;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function errorText(body, status) {
  const err = body && body.error;
  if (typeof err === "string") return err;
  if (err && err.message) return err.message;
  return `HTTP ${status}`;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      /* not JSON */
    }
    if (response.status === 401) {
      $("api-key").focus();
      throw new ApiError(401, "This server needs an API key: enter it in the sidebar.");
    }
    throw new ApiError(response.status, errorText(body, response.status));
  }
  return response;
}

function messageItem(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

async function loadSessions() {
  const page = await (await api("/v1/sessions?limit=100")).json();
  const list = $("sessions");
  list.replaceChildren();
  for (const s of page.data) {
    const li = document.createElement("li");
    li.textContent = s.title || s.id;
    li.title = s.id;
    li.dataset.id = s.id;
    li.classList.toggle("active", s.id === current);
    li.addEventListener("click", () => openSession(s.id).catch((e) => notice(e.message)));
    list.appendChild(li);
  }
  return page.data;
}

async function openSession(id) {
  const ticket = ++opening;
  const session = await (await api(`/v1/sessions/${encodeURIComponent(id)}`)).json();
  if (ticket !== opening) return;
  // A reply streaming into this session's view is newer than what was just read: keep the view.
  if (busy && id === current) return;
  current = id;
  localStorage.setItem(SESSION_STORE, id);
  $("session-title").textContent = session.title || session.id;
  $("messages").replaceChildren();
  for (const m of session.messages) messageItem(m.role, m.content);
  for (const li of $("sessions").children) li.classList.toggle("active", li.dataset.id === id);
  notice("");
  refreshStatus();
}

async function newSession() {
  const session = await (await api("/v1/sessions", { method: "POST", json: {} })).json();
  // A new session is empty: show it so at once, before the list and the session are re-read.
  current = session.id;
  ++opening;
  $("messages").replaceChildren();
  $("session-title").textContent = session.title || session.id;
  await loadSessions();
  await openSession(session.id);
}

async function refreshStatus() {
  try {
    const q = current ? `?session_id=${encodeURIComponent(current)}` : "";
    const s = await (await api(`/status${q}`)).json();
    $("status-model").textContent = s.model_name;
    $("status-device").textContent = s.device;
    $("status-memory").textContent = `${(s.memory_allocated / 1048576).toFixed(0)} MiB`;
  } catch (e) {
    if (e.status === 503) {
      $("status-model").textContent = "loading…";
      setTimeout(refreshStatus, 2000);
    }
  }
}

// Reads a text/event-stream body; calls onEvent with each event's parsed JSON data.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function send(text) {
  if (!current) await newSession();
  const session = current;
  opening += 1;
  busy = true;
  $("send").disabled = true;
  notice("");
  messageItem("user", text);
  const reply = messageItem("assistant", "");
  reply.classList.add("streaming");
  let chunks = 0;
  let first = null;
  try {
    const response = await api("/chat", {
      method: "POST",
      json: { message: text, session_id: session, stream: true },
    });
    await readEvents(response, (event) => {
      if (event.delta !== undefined) {
        if (first === null) first = performance.now();
        chunks += 1;
        reply.textContent += event.delta;
        reply.scrollIntoView({ block: "end" });
      } else if (event.error !== undefined) {
        throw new ApiError(500, event.error);
      } else if (event.response !== undefined) {
        reply.textContent = event.response;
      }
    });
    if (first !== null && chunks > 1) {
      const seconds = (performance.now() - first) / 1000;
      $("status-speed").textContent = `${chunks} tokens, ${((chunks - 1) / seconds).toFixed(1)} tokens/s`;
    }
    if ($("session-title").textContent === session) {
      const title = text.replace(/\s+/g, " ").trim().slice(0, 60);
      await api(`/v1/sessions/${encodeURIComponent(session)}`, { method: "PATCH", json: { title } });
      $("session-title").textContent = title;
    }
    await loadSessions();
  } catch (e) {
    reply.remove();
    notice(e.message);
  } finally {
    reply.classList.remove("streaming");
    busy = false;
    $("send").disabled = false;
    refreshStatus();
  }
}

async function start() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  try {
    const sessions = await loadSessions();
    const saved = localStorage.getItem(SESSION_STORE);
    const pick = sessions.find((s) => s.id === saved) || sessions[0];
    if (pick) await openSession(pick.id);
    else await newSession();
  } catch (e) {
    notice(e.message);
  }
  refreshStatus();
}

$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  start();
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (busy || !text.trim()) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-session").addEventListener("click", () => newSession().catch((e) => notice(e.message)));

$("reset").addEventListener("click", async () => {
  if (!current) return;
  try {
    await api("/reset", { method: "POST", json: { session_id: current } });
    $("messages").replaceChildren();
    refreshStatus();
  } catch (e) {
    notice(e.message);
  }
});

$("delete").addEventListener("click", async () => {
  if (!current) return;
  try {
    await api(`/v1/sessions/${encodeURIComponent(current)}`, { method: "DELETE" });
    current = null;
    const sessions = await loadSessions();
    if (sessions.length) await openSession(sessions[0].id);
    else await newSession();
  } catch (e) {
    notice(e.message);
  }
});

start();
