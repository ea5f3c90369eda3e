"use strict";
// The page speaks the OpenAI Realtime API (GA) with the server at /v1/realtime: microphone PCM16 at 16 kHz in, reply
// text and PCM16 audio at 24 kHz out; saved conversations, personas and file transcription over the server's HTTP
// routes. Nothing from the server or the model becomes HTML except through markdown-it with raw HTML off, and then
// only the elements and attributes Markdown makes (see safeHtml); transcripts and the user's words are plain text.
const INPUT_RATE = 16000;  // Hz: what the AudioWorklet captures and the session's audio.input.format says
const OUTPUT_RATE = 24000;  // Hz: reply audio (audio.output.format) and the playback AudioContext
const STILL_PLAYING_S = 0.01;  // seconds: a reply with more unplayed audio than this is cut on barge-in
const STORE = "assistant.";  // localStorage prefix: settings per conversation
const SETTINGS = ["persona", "prompt", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens",
                  "language", "voice", "voiceName"];
const JOB_POLL_MS = 1000;
const RESUME_RETRIES = 6;  // a conversation still held by the previous page (a reload) is free a moment later

const $ = (id) => document.getElementById(id);
const log = $("log"), status = $("status"), live = $("live");

// --- Markdown, safely ----------------------------------------------------------------------------------------------

const md = window.markdownit({html: false, linkify: false, typographer: false, breaks: true});
md.disable("image");  // no remote images: a reply must not make the browser fetch anything
md.validateLink = (url) => /^https?:\/\//i.test(url.trim());  // http(s) only: no javascript:, data:, relative links
md.core.ruler.push("page_attributes", (state) => {
  const walk = (tokens) => {
    for (const token of tokens) {
      if (token.type === "link_open") {
        token.attrSet("target", "_blank");
        token.attrSet("rel", "noopener noreferrer nofollow");
      }
      const style = token.attrGet && token.attrGet("style");  // table alignment: a class (the CSP allows no style="")
      if (style) {
        token.attrs = token.attrs.filter(([name]) => name !== "style");
        token.attrJoin("class", "align-" + style.replace("text-align:", "").trim());
      }
      if (token.children) walk(token.children);
    }
  };
  walk(state.tokens);
});
// What markdown-it can make with html off; anything else (there should be nothing) is dropped as a second line of
// defence, and only these attributes survive.
const ALLOWED_TAGS = new Set(["P", "BR", "STRONG", "EM", "S", "CODE", "PRE", "BLOCKQUOTE", "UL", "OL", "LI", "H1", "H2",
  "H3", "H4", "H5", "H6", "HR", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "A"]);
const ALLOWED_ATTRIBUTES = {A: ["href", "target", "rel", "title"], OL: ["start"], CODE: ["class"], TH: ["class"],
                            TD: ["class"]};

function safeHtml(markdown) {
  const template = document.createElement("template");  // inert: nothing in it loads or runs
  template.innerHTML = md.render(markdown);
  const clean = (node) => {
    for (const child of [...node.children]) {
      if (!ALLOWED_TAGS.has(child.tagName)) { child.replaceWith(document.createTextNode(child.textContent)); continue; }
      const allowed = ALLOWED_ATTRIBUTES[child.tagName] || [];
      for (const attribute of [...child.attributes]) {
        if (!allowed.includes(attribute.name)) child.removeAttribute(attribute.name);
      }
      if (child.tagName === "A" && !/^https?:\/\//i.test(child.getAttribute("href") || "")) child.removeAttribute("href");
      clean(child);
    }
  };
  clean(template.content);
  return template.content;
}

// --- state ---------------------------------------------------------------------------------------------------------

let ws = null, mic = null, micStarting = null, streaming = false, held = false, partialShown = false;
let updates = 0, lastUpdateId = null;
let committedByHand = 0;  // hold-to-talk turns committed and not yet transcribed: each asks for its reply
let conversationId = null;  // the open conversation (session.created), null before it or without a conversation dir
let conversationsKept = true;  // false when the server keeps no conversations
let personas = [];
let sessionDefaults = null;  // the server's own settings for this session (session.created), restored when cleared
// The messages shown, in order: {id (the server's item id, null until known), role, text, cut, el, body, metrics}.
const messages = [];
// Replies by response id: {msg, done}. `reply` is the one in progress (null when none).
const replies = new Map();
let reply = null;
const pendingCreates = new Map();  // event_id of a conversation.item.create -> its message (removed if refused)
// Playback: one AudioContext at 24 kHz; every piece scheduled back to back (nextStart), kept per reply item so that a
// barge-in knows how much of each reply was actually played.
const player = {context: null, nextStart: 0, items: new Map(), silenced: new Set(), pendingCuts: new Map()};
// For tests and curious users: audio deltas received, seconds scheduled, the playback clock time the scheduled audio
// ends at, partial transcripts shown, the truncations sent and those the server confirmed, the loudest microphone
// level seen (0-1).
window.assistantAudio = {chunks: 0, scheduledSeconds: 0, playedUntil: 0, partials: 0, truncations: [], truncated: [],
                         level: 0};
// For tests: the sessions the server confirmed (session.updated), the responses that ended ({id, status, metrics}),
// the open conversation, and a way to send an event.
window.assistantPage = {sessions: [], responses: [], conversationId: null, send: (event) => send(event)};

// --- the connection ------------------------------------------------------------------------------------------------

function apiKey() { return $("key").value.trim(); }

function connect(resume = null, attempt = 0) {
  const key = apiKey();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams();
  if (resume) params.set("conversation", resume);
  if (key) params.set("api_key", key);
  const query = params.toString() ? "?" + params : "";
  const socket = new WebSocket(`${scheme}://${location.host}/v1/realtime${query}`);
  ws = socket;
  socket.binaryType = "arraybuffer";
  socket.resume = resume;
  socket.onopen = () => { status.textContent = "connected"; };
  socket.onclose = () => {
    if (socket.closed) socket.closed();
    if (socket !== ws) return;  // replaced by a new connection (another conversation, a new API key)
    if (socket.busy && attempt < RESUME_RETRIES) {  // still open in the page we came from: it closes in a moment
      setTimeout(() => { if (socket === ws) connect(resume, attempt + 1); }, 300 * (attempt + 1));
      return;
    }
    if (!socket.failed) status.textContent = "disconnected: reload the page to reconnect";
    stopMic();
    stopPlayback();
    updateButtons();
  };
  socket.onmessage = (message) => { if (socket === ws) handle(JSON.parse(message.data)); };
}

// Close the session (and wait until it is closed), so that the conversation is free for rename and delete.
function disconnect() {
  const socket = ws;
  ws = null;
  reply = null;
  replies.clear();
  if (!socket || socket.readyState === WebSocket.CLOSED) return Promise.resolve();
  return new Promise((resolve) => {
    socket.closed = resolve;
    socket.close();
    setTimeout(resolve, 3000);
  });
}

function send(event) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event)); }

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

// The whole session as the page wants it: the conversation's settings, audio formats, replies spoken or written,
// server VAD in hands-free mode. A setting left empty sends the server's own value back (it may have been changed).
function configure() {
  if (!sessionDefaults) return;  // before session.created: sent then
  const handsFree = $("handsfree").classList.contains("on") && !held;
  const defaults = sessionDefaults;
  const session = {
    type: "realtime",
    instructions: instructions(),
    output_modalities: [$("voice").checked ? "audio" : "text"],
    audio: {
      input: {format: {type: "audio/pcm", rate: INPUT_RATE}, turn_detection: handsFree ? {type: "server_vad"} : null,
              transcription: {language: languageChoice()}},
      output: {format: {type: "audio/pcm", rate: OUTPUT_RATE}, voice: $("voice-name").value.trim() || "auto"},
    },
  };
  for (const key of ["temperature", "top_p", "top_k", "repetition_penalty"]) {
    const value = number(key);
    const fallback = defaults.sampling ? defaults.sampling[key] : undefined;
    if (value !== null && Number.isFinite(value)) session[key] = key === "top_k" ? Math.round(value) : value;
    else if (fallback !== undefined && fallback !== null) session[key] = fallback;
  }
  const tokens = number("max_tokens");
  session.max_response_output_tokens = tokens !== null && tokens >= 1 ? Math.round(tokens) : "inf";
  lastUpdateId = `page_session_${++updates}`;
  send({type: "session.update", event_id: lastUpdateId, session});
}

function instructions() {
  const choice = $("persona").value;
  if (choice === "custom") return $("prompt").value;
  const persona = personas.find((p) => p.id === choice);
  if (persona) return persona.instructions || "";
  return sessionDefaults ? sessionDefaults.instructions : "";
}

function languageChoice() {
  const choice = $("language").value;
  if (choice === "auto") return null;
  if (choice) return choice;
  return sessionDefaults ? sessionDefaults.language : null;
}

// --- messages ------------------------------------------------------------------------------------------------------

function addMessage(role, text, {id = null, cut = false, before = null} = {}) {
  const el = document.createElement("article");
  el.className = `msg msg-${role}`;
  const body = document.createElement("div");
  body.className = `turn ${role}`;
  if (cut) body.classList.add("cut");
  const tools = document.createElement("div");
  tools.className = "tools";
  const msg = {id, role, text: "", cut, el, body, tools, metrics: null, rendering: false};
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "small";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy this ${role === "user" ? "message" : "reply"}`);
  copy.onclick = () => copyText(msg.text, copy);
  tools.appendChild(copy);
  el.append(body, tools);
  log.insertBefore(el, before);
  if (before) messages.splice(messages.findIndex((m) => m.el === before), 0, msg);
  else messages.push(msg);
  setText(msg, text);
  $("empty").hidden = true;
  if (!before) el.scrollIntoView({block: "end"});
  updateButtons();
  return msg;
}

function setText(msg, text) {
  msg.text = text;
  if (msg.role !== "assistant") { msg.body.textContent = text; return; }
  if (msg.rendering) return;
  msg.rendering = true;
  requestAnimationFrame(() => {  // streamed replies are rendered at most once a frame
    msg.rendering = false;
    msg.body.replaceChildren(safeHtml(msg.text));
  });
}

function appendText(msg, delta) {
  setText(msg, msg.text + delta);
  if (msg.el.getBoundingClientRect().bottom > window.innerHeight) msg.el.scrollIntoView({block: "end"});
}

function removeMessage(id) {
  const msg = messages.find((m) => m.id === id);
  if (msg) dropMessage(msg);
}

function dropMessage(msg) {
  const index = messages.indexOf(msg);
  if (index >= 0) messages.splice(index, 1);
  msg.el.remove();
  $("empty").hidden = messages.length > 0;
  updateButtons();
}

function clearMessages() {
  for (const msg of messages) msg.el.remove();
  messages.length = 0;
  $("empty").hidden = false;
  live.textContent = "";
}

function showMetrics(msg, metrics) {
  msg.metrics = metrics;
  if (!metrics || msg.tools.querySelector(".figures-toggle")) return;
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "small figures-toggle";
  toggle.textContent = "Figures";
  toggle.setAttribute("aria-expanded", "false");
  const figures = document.createElement("dl");
  figures.className = "figures";
  figures.hidden = true;
  const ms = (value) => (value === null || value === undefined ? "–" : `${Math.round(value)} ms`);
  const rows = [
    ["end of speech → first text", ms(metrics.first_char_ms)],
    ["end of speech → first audio", ms(metrics.first_audio_ms)],
    ["end of speech → transcript", ms(metrics.transcript_ms)],
    ["tokens", metrics.tokens === undefined ? "–" : String(metrics.tokens)],
    ["tokens/s", metrics.tokens_per_s === undefined || metrics.tokens_per_s === null ? "–" :
      Number(metrics.tokens_per_s).toFixed(1)],
  ];
  for (const [name, value] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    figures.append(dt, dd);
  }
  toggle.onclick = () => {
    figures.hidden = !figures.hidden;
    toggle.setAttribute("aria-expanded", String(!figures.hidden));
  };
  msg.tools.appendChild(toggle);
  msg.el.appendChild(figures);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {  // no clipboard API (not a secure context) or refused: the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function lastMessage(role) {
  for (let i = messages.length - 1; i >= 0; i--) if (!role || messages[i].role === role) return messages[i];
  return null;
}

function updateButtons() {
  const open = ws && ws.readyState === WebSocket.OPEN;
  const busy = reply !== null || player.items.size > 0;
  const last = messages[messages.length - 1];
  $("stop").disabled = !busy;
  $("regenerate").disabled = !open || reply !== null || !last || last.role !== "assistant" || !last.id;
  $("continue").disabled = $("regenerate").disabled;
  $("undo").disabled = !open || reply !== null || !last || !last.id;
}

// Regenerate: the last reply leaves the history, and the same question is answered again.
function regenerate() {
  const last = messages[messages.length - 1];
  if (!last || last.role !== "assistant" || !last.id || reply) return;
  bargeIn();
  send({type: "conversation.item.delete", item_id: last.id});
  send({type: "response.create"});
}

// Continue: the last reply goes on where it stopped (this server's response.continue); its message grows.
let continuing = null;
function continueReply() {
  const last = messages[messages.length - 1];
  if (!last || last.role !== "assistant" || !last.id || reply) return;
  bargeIn();
  continuing = last;
  send({type: "response.continue"});
}

// Undo: the last reply and the message it answered leave the history.
function undo() {
  const last = messages[messages.length - 1];
  if (!last || !last.id || reply) return;
  bargeIn();
  send({type: "conversation.item.delete", item_id: last.id});
  const before = messages[messages.length - 2];
  if (last.role === "assistant" && before && before.role === "user" && before.id) {
    send({type: "conversation.item.delete", item_id: before.id});
  }
}

function replyOf(event) {
  const known = replies.get(event.response_id);
  if (known && event.item_id) known.msg.id = event.item_id;
  return known || null;
}

function contentText(item) {
  return (item.content || []).map((part) => part.text || part.transcript || "").join("");
}

function handle(event) {
  switch (event.type) {
    case "session.created": opened(event.session); break;
    case "session.updated": window.assistantPage.sessions.push(event.session); statusOk(); break;
    case "input_audio_buffer.speech_started":
      stopPlayback();  // the server stops generating by itself (server VAD barge-in)
      partialShown = false;
      live.textContent = "listening…"; break;
    case "input_audio_buffer.speech_stopped":
      if (!partialShown) live.textContent = "transcribing…"; break;
    case "conversation.item.input_audio_transcription.delta":
      if (event.text) {
        live.textContent = event.text;
        window.assistantAudio.partials++;
        partialShown = true;
      }
      break;
    case "conversation.item.input_audio_transcription.completed":
      live.textContent = "";
      partialShown = false;
      if (event.transcript) {
        const known = messages.find((m) => m.id === event.item_id);
        if (known) setText(known, event.transcript);
        else addMessage("user", event.transcript, {id: event.item_id});
      }
      if (committedByHand > 0) {  // a manual commit waits for response.create; noise asks for nothing
        committedByHand--;
        if (event.transcript) send({type: "response.create"});
      }
      break;
    case "conversation.item.input_audio_transcription.failed":
      live.textContent = ""; partialShown = false; committedByHand = Math.max(0, committedByHand - 1); break;
    case "conversation.item.done": {  // an item the page did not make itself (another client's, a test's)
      const item = event.item || {};
      if (item.type !== "message" || !item.id || messages.some((m) => m.id === item.id)) break;
      if ([...replies.values()].some((r) => r.msg.id === item.id)) break;
      const text = contentText(item);
      if (text && (item.role === "user" || item.role === "assistant")) {
        addMessage(item.role, text, {id: item.id, cut: item.status === "incomplete"});
      }
      break;
    }
    case "conversation.item.added":  // a typed message is in the history: no longer waiting to be refused
      for (const [eventId, msg] of pendingCreates) if (event.item && msg.id === event.item.id) pendingCreates.delete(eventId);
      break;
    case "conversation.item.deleted": removeMessage(event.item_id); break;
    case "response.created":
      reply = {msg: continuing || addMessage("assistant", ""), done: false};
      if (continuing) reply.msg.body.classList.remove("cut", "incomplete");
      continuing = null;
      reply.msg.el.setAttribute("aria-busy", "true");
      replies.set(event.response.id, reply);
      updateButtons(); break;
    case "response.output_item.added": { const known = replyOf(event); if (known) known.msg.id = event.item.id; break; }
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta": {
      const known = replyOf(event);
      if (known) appendText(known.msg, event.delta);
      break;
    }
    case "response.output_audio.delta": {
      const known = replyOf(event);
      play(event.item_id, event.delta, known ? known.msg.body : null); break;
    }
    case "response.done": finished(event.response); break;
    case "conversation.item.truncated":
      window.assistantAudio.truncated.push({item_id: event.item_id, audio_end_ms: event.audio_end_ms}); break;
    case "error": failed(event); break;
  }
}

function opened(session) {
  conversationId = session.conversation_id || null;
  window.assistantPage.conversationId = conversationId;
  const transcription = (session.audio && session.audio.input && session.audio.input.transcription) || {};
  sessionDefaults = {instructions: session.instructions || "", sampling: session.sampling || null,
                     language: transcription.language || null};
  status.textContent = connectedText = `connected: ${session.model}`;
  delete status.dataset.stale;
  if (conversationId) {
    if (location.hash.slice(1) !== `conversation=${conversationId}`) {
      history.replaceState(null, "", `#conversation=${conversationId}`);
    }
    const saved = readStored(conversationId);
    if (saved) applySettings(saved);
    storeSettings();
  }
  configure();
  if (ws && ws.resume && conversationId) loadHistory(conversationId);
  renderConversations();
  updateButtons();
}

// A later success replaces an error or "stopped" shown before it.
let connectedText = "";
function statusOk() {
  if (status.dataset.stale && connectedText) status.textContent = connectedText;
  delete status.dataset.stale;
}

function finished(response) {
  if (response.status === "completed" || response.status === "incomplete") statusOk();
  window.assistantPage.responses.push({id: response.id, status: response.status, metrics: response.metrics || null});
  const known = replies.get(response.id);
  const itemId = (response.output && response.output[0] && response.output[0].id) || (known && known.msg.id);
  if (known) {
    known.done = true;
    known.msg.el.removeAttribute("aria-busy");
    if (itemId) known.msg.id = itemId;
    if (response.status === "cancelled") known.msg.body.classList.add("cut");
    if (response.status === "incomplete") known.msg.body.classList.add("incomplete");
    if (response.status === "failed" && !known.msg.text) dropMessage(known.msg);
    showMetrics(known.msg, response.metrics || null);
  }
  if (known === reply) reply = null;
  replies.delete(response.id);
  if (itemId && player.pendingCuts.has(itemId)) {
    const ms = player.pendingCuts.get(itemId);
    player.pendingCuts.delete(itemId);
    if (response.status !== "failed") truncate(itemId, ms);
  }
  updateButtons();
  refreshConversationsSoon();  // the server saved the turn
}

function failed(event) {
  const error = event.error || {};
  continuing = null;
  if (error.code === "response_cancel_not_active") return;  // the reply ended as we cancelled it: nothing to say
  if ((error.message || "").startsWith("input_audio_buffer.commit")) committedByHand = Math.max(0, committedByHand - 1);
  if (error.event_id && pendingCreates.has(error.event_id)) {  // the typed message was refused: it is not in the history
    dropMessage(pendingCreates.get(error.event_id));
    pendingCreates.delete(error.event_id);
  }
  if (ws && /is open in another session/.test(error.message || "")) {
    ws.busy = true;  // retried when the socket closes (see connect)
    status.textContent = "this conversation is open in another tab or app; waiting for it…";
    return;
  }
  if (ws && ["config", "conversation", "unauthorized"].includes(error.code) && !sessionDefaults) ws.failed = true;
  status.textContent = `${error.code}: ${error.message}`;
  status.dataset.stale = "1";  // until the next thing that went right (statusOk)
  if (error.event_id && error.event_id === lastUpdateId && $("voice").checked &&
      /output_modalities/.test(error.message || "")) {
    $("voice").checked = false;  // this server cannot speak: ask for written replies instead
    status.textContent += " (voice replies turned off)";
    storeSettings();
    configure();
  }
}

// --- playing the reply ---------------------------------------------------------------------------------------------

function playbackContext() {
  if (!player.context) player.context = new AudioContext({sampleRate: OUTPUT_RATE});
  if (player.context.state === "suspended") player.context.resume().catch(() => {});
  return player.context;
}

function pcm16ToFloat32(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const samples = new Int16Array(bytes.buffer, 0, bytes.length >> 1);  // little-endian, like every browser's CPU
  const floats = new Float32Array(samples.length);
  for (let i = 0; i < samples.length; i++) floats[i] = samples[i] / 32768;
  return floats;
}

function play(itemId, base64, div) {
  window.assistantAudio.chunks++;
  if (!itemId || player.silenced.has(itemId)) return;  // the user cut this reply: the rest is not played
  const floats = pcm16ToFloat32(base64);
  if (!floats.length) return;
  const context = playbackContext();
  const buffer = context.createBuffer(1, floats.length, OUTPUT_RATE);
  buffer.copyToChannel(floats, 0);
  const node = context.createBufferSource();
  node.buffer = buffer;
  node.connect(context.destination);
  const start = Math.max(context.currentTime, player.nextStart);
  node.start(start);
  player.nextStart = start + buffer.duration;
  let item = player.items.get(itemId);
  if (!item) player.items.set(itemId, item = {pieces: [], div});
  item.pieces.push({node, start, duration: buffer.duration});
  node.onended = () => {  // the Stop button is for a reply still playing
    if (player.items.get(itemId) === item && context.currentTime >= player.nextStart - STILL_PLAYING_S) {
      player.items.delete(itemId);
      updateButtons();
    }
  };
  window.assistantAudio.scheduledSeconds += buffer.duration;
  window.assistantAudio.playedUntil = player.nextStart;
  updateButtons();
}

// Seconds of an item's audio played by now on the AudioContext clock (gaps between late pieces do not count), and the
// seconds scheduled in all.
function playedOf(item, now) {
  let played = 0, scheduled = 0;
  for (const piece of item.pieces) {
    scheduled += piece.duration;
    played += Math.min(piece.duration, Math.max(0, now - piece.start));
  }
  return {played: Math.min(played, scheduled), scheduled};
}

function generating(itemId) {
  for (const known of replies.values()) if (!known.done && known.msg.id === itemId) return true;
  return false;
}

// Stop every scheduled piece at once; a reply whose audio had not all been played is cut where the user stopped
// hearing it: marked cut, and the server is told how much was heard (conversation.item.truncate).
function stopPlayback() {
  const context = player.context;
  const now = context ? context.currentTime : 0;
  for (const [itemId, item] of player.items) {
    const {played, scheduled} = playedOf(item, now);
    for (const piece of item.pieces) { try { piece.node.stop(); } catch (e) { /* not started or already stopped */ } }
    if (played < scheduled - STILL_PLAYING_S || generating(itemId)) {
      player.silenced.add(itemId);
      if (item.div) item.div.classList.add("cut");
      const ms = Math.floor(played * 1000);
      if (generating(itemId)) player.pendingCuts.set(itemId, ms);  // the item exists once its response is done
      else truncate(itemId, ms);
    }
  }
  player.items.clear();
  player.nextStart = 0;
  updateButtons();
}

function truncate(itemId, ms) {
  window.assistantAudio.truncations.push({item_id: itemId, audio_end_ms: ms});
  send({type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: ms});
}

// The user presses hold-to-talk, types over the assistant, or presses Esc: silence it, and stop a reply in progress.
function bargeIn() {
  stopPlayback();
  if (reply && !reply.done) send({type: "response.cancel"});
}

// --- the microphone ------------------------------------------------------------------------------------------------

function micError(error) {
  if (error && error.name === "NotAllowedError") {
    return "microphone permission denied: allow it for this site (the icon left of the address, or the browser's " +
           "site settings), then press again";
  }
  if (error && error.name === "NotFoundError") return "no microphone found: connect one and press again";
  return `the microphone cannot be used: ${error && error.message ? error.message : error}`;
}

async function startMic() {
  if (mic) return;
  if (micStarting) return micStarting;
  micStarting = (async () => {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("the microphone needs https:// or http://localhost (this page is not a secure context: " +
                      "open it as http://localhost:PORT on this machine, or put the server behind HTTPS)");
    }
    const stream = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true}});
    const context = new AudioContext({sampleRate: INPUT_RATE});
    await context.audioWorklet.addModule("static/pcm16-worklet.js");
    const node = new AudioWorkletNode(context, "pcm16");
    node.port.onmessage = (m) => { if (streaming && ws && ws.readyState === WebSocket.OPEN) ws.send(m.data); };
    const source = context.createMediaStreamSource(stream);
    source.connect(node);
    const analyser = context.createAnalyser();  // the level meter: people see that the microphone hears them
    analyser.fftSize = 1024;
    source.connect(analyser);
    mic = {stream, context, analyser};
    meter(mic);
  })();
  try { await micStarting; } finally { micStarting = null; }
}

function meter(current) {
  const samples = new Float32Array(current.analyser.fftSize);
  const tick = () => {
    if (mic !== current) { $("level").value = 0; return; }
    current.analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const level = Math.min(1, Math.sqrt(sum / samples.length) * 5);
    $("level").value = level;
    window.assistantAudio.level = Math.max(window.assistantAudio.level, level);
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}

function stopMic() {
  streaming = false;
  if (!mic) return;
  mic.stream.getTracks().forEach((t) => t.stop());
  mic.context.close();
  mic = null;
  $("level").value = 0;
}

// --- conversations -------------------------------------------------------------------------------------------------

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

async function api(path, {method = "GET", body} = {}) {
  const headers = authHeaders(body === undefined ? {} : {"Content-Type": "application/json"});
  const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await response.json(); } catch (e) { /* no JSON body */ }
  if (!response.ok) {
    const error = new Error((data && data.error && data.error.message) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// A download from a route: a plain link without a key; with one, fetched with the key and saved from a blob.
async function download(url, fallbackName) {
  const response = await fetch(url, {headers: authHeaders()});
  if (!response.ok) throw new Error(`download failed: HTTP ${response.status}`);
  const disposition = response.headers.get("content-disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = match ? match[1] : fallbackName;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function downloadLink(text, url, fallbackName, label) {
  const link = document.createElement("a");
  link.className = "button small";
  link.textContent = text;
  link.href = url;
  link.setAttribute("download", "");
  link.setAttribute("aria-label", label);
  link.onclick = (e) => {
    if (!apiKey()) return;  // the browser downloads it (same origin, no key needed)
    e.preventDefault();
    download(url, fallbackName).catch((error) => { $("conversations-note").textContent = error.message; });
  };
  return link;
}

let conversations = [];
let refreshTimer = null;

function refreshConversationsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshConversations, 300);
}

async function refreshConversations() {
  if (!conversationsKept) return;
  const note = $("conversations-note");
  try {
    conversations = (await api("/v1/conversations")).data || [];
    note.hidden = true;
  } catch (error) {
    if (error.status === 404) {
      conversationsKept = false;
      conversations = [];
      note.textContent = "This server keeps no conversations (start it with server.conversation_dir set): " +
                         "each page load is a new one, and nothing is saved.";
      $("conversations").hidden = true;
    } else {
      note.textContent = `conversations: ${error.message}`;
    }
    note.hidden = false;
  }
  renderConversations();
}

function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleString([], {dateStyle: "short", timeStyle: "short"});
}

function renderConversations() {
  const list = $("conversations");
  if (!conversationsKept) { list.replaceChildren(); return; }
  const shown = [...conversations];
  if (conversationId && !shown.some((c) => c.id === conversationId)) {
    shown.unshift({id: conversationId, title: "New conversation", message_count: 0, unsaved: true});
  }
  list.replaceChildren(...shown.map(conversationRow));
}

function conversationRow(conversation) {
  const row = document.createElement("li");
  row.className = "conversation";
  row.dataset.id = conversation.id;
  const current = conversation.id === conversationId;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  if (current) open.setAttribute("aria-current", "true");
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = conversation.title || "New conversation";
  const meta = document.createElement("small");
  meta.textContent = conversation.unsaved ? "not saved yet" :
    `${conversation.message_count} messages · ${when(conversation.updated_at)}`;
  open.append(title, meta);
  open.onclick = () => { closeDrawer(); if (!current) openConversation(conversation.id); };
  row.appendChild(open);
  if (conversation.unsaved) return row;
  const actions = document.createElement("div");
  actions.className = "actions";
  const name = conversation.title || "conversation";
  const rename = document.createElement("button");
  rename.type = "button";
  rename.className = "small";
  rename.textContent = "Rename";
  rename.setAttribute("aria-label", `Rename ${name}`);
  rename.onclick = () => startRename(row, conversation);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "small danger";
  remove.textContent = "Delete";
  remove.setAttribute("aria-label", `Delete ${name}`);
  remove.onclick = () => deleteConversation(conversation);
  const base = `/v1/conversations/${encodeURIComponent(conversation.id)}/export?format=`;
  actions.append(rename, remove,
                 downloadLink("MD", base + "markdown", `${conversation.id}.md`, `Export ${name} as Markdown`),
                 downloadLink("JSON", base + "json", `${conversation.id}.json`, `Export ${name} as JSON`));
  row.appendChild(actions);
  return row;
}

function startRename(row, conversation) {
  const form = document.createElement("form");
  form.className = "rename";
  const input = document.createElement("input");
  input.value = conversation.metadata && conversation.metadata.title ? conversation.metadata.title : conversation.title;
  input.maxLength = 200;
  input.setAttribute("aria-label", "New title (Enter saves, Esc cancels)");
  const save = document.createElement("button");
  save.textContent = "Save";
  save.className = "small";
  form.append(input, save);
  row.replaceChildren(form);
  input.focus();
  input.select();
  input.onkeydown = (e) => { if (e.key === "Escape") { e.stopPropagation(); renderConversations(); } };
  form.onsubmit = async (e) => {
    e.preventDefault();
    await whileFree(conversation.id, () => api(`/v1/conversations/${encodeURIComponent(conversation.id)}`,
                                               {method: "POST", body: {metadata: {title: input.value.trim()}}}));
    await refreshConversations();
  };
}

async function deleteConversation(conversation) {
  if (!confirm(`Delete "${conversation.title}"? This cannot be undone.`)) return;
  const current = conversation.id === conversationId;
  await whileFree(conversation.id, () => api(`/v1/conversations/${encodeURIComponent(conversation.id)}`,
                                             {method: "DELETE"}), !current);
  localStorage.removeItem(STORE + "settings." + conversation.id);
  if (current) openConversation(null);
  await refreshConversations();
}

// Rename and delete are refused (409) while a session holds the conversation: this page's own session is closed for
// the change and (unless deleted) reopened.
async function whileFree(id, change, reopen = true) {
  const note = $("conversations-note");
  const mine = id === conversationId && ws !== null;
  if (mine) await disconnect();
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        await change();
        break;
      } catch (error) {
        if (error.status !== 409 || attempt >= 5) throw error;
        await new Promise((resolve) => setTimeout(resolve, 300 * (attempt + 1)));
      }
    }
  } catch (error) {
    note.textContent = error.status === 409 ? "that conversation is open in another tab or app: close it there first"
      : error.message;
    note.hidden = false;
  } finally {
    if (mine && reopen) openConversation(id);
  }
}

function openConversation(id) {
  disconnect();
  bargeIn();
  clearMessages();
  sessionDefaults = null;
  conversationId = null;
  history.replaceState(null, "", id ? `#conversation=${id}` : location.pathname + location.search);
  status.textContent = "connecting…";
  connect(id);
  renderConversations();
}

async function loadHistory(id) {
  const prefix = `item_${id.slice(0, 8)}_`;  // the Realtime session's ids for the saved messages, in order
  const first = messages[0] ? messages[0].el : null;
  let after = null;
  try {
    for (let page = 0; page < 100; page++) {
      const query = `order=asc&limit=100${after ? "&after=" + encodeURIComponent(after) : ""}`;
      const found = await api(`/v1/conversations/${encodeURIComponent(id)}/items?${query}`);
      if (id !== conversationId) return;  // another conversation was opened meanwhile
      for (const item of found.data) {
        const index = item.id.slice(item.id.lastIndexOf("_") + 1);
        addMessage(item.role, contentText(item), {id: prefix + index, cut: item.status === "incomplete", before: first});
      }
      if (!found.has_more) break;
      after = found.last_id;
    }
  } catch (error) {
    if (error.status !== 404) status.textContent = `history: ${error.message}`;  // 404: nothing saved yet
  }
  const last = messages[messages.length - 1];
  if (last) last.el.scrollIntoView({block: "end"});
}

// --- settings per conversation ---------------------------------------------------------------------------------------

function readSettings() {
  const settings = {};
  for (const key of SETTINGS) {
    if (key === "voice") settings.voice = $("voice").checked;
    else if (key === "voiceName") settings.voiceName = $("voice-name").value;
    else settings[key] = $(key).value;
  }
  return settings;
}

function applySettings(settings) {
  for (const key of SETTINGS) {
    if (!(key in settings)) continue;
    if (key === "voice") $("voice").checked = Boolean(settings.voice);
    else if (key === "voiceName") $("voice-name").value = settings.voiceName;
    else if (key === "persona" && settings.persona && !$("persona").querySelector(`option[value="${CSS.escape(settings.persona)}"]`)) {
      $("persona").value = "";  // a persona the server no longer has
    } else $(key).value = settings[key];
  }
  showPersona();
}

function readStored(id) {
  try { return JSON.parse(localStorage.getItem(STORE + "settings." + id) || "null"); } catch (e) { return null; }
}

function storeSettings() {
  const settings = JSON.stringify(readSettings());
  try {
    if (conversationId) localStorage.setItem(STORE + "settings." + conversationId, settings);
    localStorage.setItem(STORE + "settings.last", settings);  // where a new conversation starts from
  } catch (e) { /* storage full or off: the settings last as long as the page */ }
}

function showPersona() {
  const choice = $("persona").value;
  $("prompt-field").hidden = choice !== "custom";
  const persona = personas.find((p) => p.id === choice);
  $("persona-about").textContent = persona ? `${persona.name}: ${persona.instructions || ""}` : "";
  $("empty").textContent = persona && persona.greeting ? `${persona.name}: ${persona.greeting}`
    : "Speak (Hands-free or Hold to talk) or type a message.";
}

async function loadPersonas() {
  for (const option of [...$("persona").options]) {  // a reload (a new key) replaces the list
    if (option.value !== "" && option.value !== "custom") option.remove();
  }
  try {
    personas = ((await api("/v1/personas")).data || []).filter((p) => !p.error);
  } catch (error) {
    personas = [];
  }
  const select = $("persona");
  const custom = select.querySelector('option[value="custom"]');
  for (const persona of personas) {
    const option = document.createElement("option");
    option.value = persona.id;
    option.textContent = persona.name || persona.id;
    select.insertBefore(option, custom);
  }
}

function settingChanged() {
  showPersona();
  storeSettings();
  configure();
}

// --- files ---------------------------------------------------------------------------------------------------------

const jobs = [];  // {file, id, status, row, progress, label, actions}
let uploading = false;
let pollTimer = null;

function addFiles(files) {
  for (const file of files) {
    const job = {file, id: null, status: "waiting", language: $("file-language").value};
    job.row = document.createElement("li");
    job.row.className = "job";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name;
    job.progress = document.createElement("progress");
    job.progress.setAttribute("aria-label", `Progress of ${file.name}`);
    job.label = document.createElement("span");
    job.label.className = "note";
    job.label.textContent = "waiting";
    job.actions = document.createElement("div");
    job.actions.className = "actions";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small";
    cancel.textContent = "Cancel";
    cancel.setAttribute("aria-label", `Cancel ${file.name}`);
    cancel.onclick = () => cancelJob(job);
    job.actions.appendChild(cancel);
    job.row.append(name, job.progress, job.label, job.actions);
    $("jobs").appendChild(job.row);
    jobs.push(job);
  }
  uploadNext();
}

// Files are sent one at a time (the server transcribes them one after another anyway); each then runs as a job.
async function uploadNext() {
  if (uploading) return;
  const job = jobs.find((j) => j.status === "waiting");
  if (!job) return;
  uploading = true;
  job.status = "uploading";
  job.label.textContent = "uploading…";
  const form = new FormData();
  form.append("file", job.file, job.file.name);
  if (job.language) form.append("language", job.language);
  try {
    const response = await fetch("/v1/transcription_jobs", {method: "POST", headers: authHeaders(), body: form});
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
    if (job.status === "cancelled") {
      fetch(`/v1/transcription_jobs/${data.id}`, {method: "DELETE", headers: authHeaders()}).catch(() => {});
    } else {
      job.id = data.id;
      showJob(job, data);
    }
  } catch (error) {
    if (job.status !== "cancelled") jobFailed(job, error.message);
  } finally {
    uploading = false;
  }
  schedulePoll();
  uploadNext();
}

function schedulePoll() {
  if (pollTimer || !jobs.some((j) => j.id && (j.status === "queued" || j.status === "running"))) return;
  pollTimer = setTimeout(async () => {
    pollTimer = null;
    for (const job of jobs.filter((j) => j.id && (j.status === "queued" || j.status === "running"))) {
      try {
        showJob(job, await api(`/v1/transcription_jobs/${job.id}`));
      } catch (error) {
        jobFailed(job, error.message);
      }
    }
    schedulePoll();
  }, JOB_POLL_MS);
}

function seconds(value) { return value === null || value === undefined ? "?" : Number(value).toFixed(1); }

function showJob(job, data) {
  if (job.status === "cancelled") return;
  job.status = data.status;
  job.row.dataset.status = data.status;
  if (data.duration) {
    job.progress.max = data.duration;
    job.progress.value = Math.min(data.progress || 0, data.duration);
  }
  if (data.status === "failed") { jobFailed(job, data.error && data.error.message ? data.error.message : "failed"); return; }
  if (data.status !== "completed") {
    job.label.textContent = `${data.status}: ${seconds(data.progress)} of ${seconds(data.duration)} s`;
    return;
  }
  job.progress.max = 1;
  job.progress.value = 1;
  job.label.textContent = `done: ${seconds(data.duration)} s`;
  const stem = job.file.name.replace(/\.[^.]*$/, "") || "transcript";
  const links = [["TXT", "text", "txt"], ["SRT", "srt", "srt"], ["VTT", "vtt", "vtt"], ["JSON", "verbose_json", "json"]];
  job.actions.replaceChildren(...links.map(([text, format, suffix]) =>
    downloadLink(text, `/v1/transcription_jobs/${job.id}/result?format=${format}`, `${stem}.${suffix}`,
                 `Download ${job.file.name} as ${text}`)));
}

function jobFailed(job, message) {
  job.status = "failed";
  job.row.dataset.status = "failed";
  job.label.textContent = `failed: ${message}`;
  job.actions.replaceChildren();
}

async function cancelJob(job) {
  const running = job.id && (job.status === "queued" || job.status === "running");
  job.status = "cancelled";
  job.row.dataset.status = "cancelled";
  job.label.textContent = "cancelled";
  job.actions.replaceChildren();
  if (running) {
    try { await api(`/v1/transcription_jobs/${job.id}`, {method: "DELETE"}); } catch (e) { /* already gone */ }
  }
}

// --- controls ------------------------------------------------------------------------------------------------------

$("handsfree").onclick = async () => {
  const button = $("handsfree");
  playbackContext();  // a user gesture: the browser lets audio play from now on
  const on = button.classList.toggle("on");
  button.setAttribute("aria-pressed", String(on));
  if (on) {
    configure();
    try {
      await startMic();
    } catch (error) {
      button.classList.remove("on");
      button.setAttribute("aria-pressed", "false");
      configure();
      status.textContent = micError(error);
      return;
    }
    streaming = true;
    status.textContent = "hands-free: just speak";
  } else {
    stopMic();
    configure();
    status.textContent = "connected";
  }
};

const ptt = $("ptt");
async function pressed() {
  if (held) return;
  held = true;
  playbackContext();
  bargeIn();
  configure();  // no server VAD while held: the release ends the turn
  ptt.classList.add("on");
  try {
    await startMic();
  } catch (error) {
    held = false;
    ptt.classList.remove("on");
    configure();
    status.textContent = micError(error);
    return;
  }
  if (held) streaming = true;
}
function released() {
  if (!held) return;
  held = false;
  ptt.classList.remove("on");
  if (streaming) { send({type: "input_audio_buffer.commit"}); committedByHand++; }
  streaming = $("handsfree").classList.contains("on") && mic !== null;
  configure();
}
ptt.addEventListener("pointerdown", pressed);
ptt.addEventListener("pointerup", released);
ptt.addEventListener("pointerleave", released);
ptt.addEventListener("keydown", (e) => {
  if ((e.key === " " || e.key === "Enter") && !e.repeat) { e.preventDefault(); pressed(); }
});
ptt.addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); released(); } });
ptt.addEventListener("blur", released);

$("typed").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  playbackContext();
  bargeIn();
  const id = `item_page_${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  const msg = addMessage("user", text, {id});
  const eventId = `page_create_${id}`;
  pendingCreates.set(eventId, msg);
  send({type: "conversation.item.create", event_id: eventId,
        item: {id, type: "message", role: "user", content: [{type: "input_text", text}]}});
  send({type: "response.create"});
  $("text").value = "";
};
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("typed").requestSubmit();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  if (document.body.classList.contains("drawer-open")) { closeDrawer(); return; }
  if (reply || player.items.size) { bargeIn(); status.textContent = "stopped"; status.dataset.stale = "1"; }
});
$("stop").onclick = () => { bargeIn(); status.textContent = "stopped"; status.dataset.stale = "1"; };
$("regenerate").onclick = regenerate;
$("continue").onclick = continueReply;
$("undo").onclick = undo;
$("voice").onchange = () => { playbackContext(); storeSettings(); configure(); };
for (const id of ["persona", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "language",
                  "voice-name"]) $(id).addEventListener("change", settingChanged);
$("prompt").addEventListener("change", settingChanged);
// A new key: reconnect to the conversation in the address (a session refused for want of a key never learnt its
// id), after storing what the user was setting, and load what the key lets us see (conversations, personas).
$("key").onchange = async () => {
  try { sessionStorage.setItem(STORE + "key", apiKey()); } catch (e) { /* storage off */ }
  if (conversationId) storeSettings();
  conversationsKept = true;
  $("conversations").hidden = false;
  $("conversations-note").hidden = true;
  const id = conversationId || conversationInAddress();
  await loadPersonas();  // before the session opens: its stored settings may name a persona
  showPersona();
  openConversation(id);
  refreshConversations();
};

function conversationInAddress() {
  const match = /^#conversation=([A-Za-z0-9_-]{1,64})$/.exec(location.hash);
  return match ? match[1] : null;
}
$("new").onclick = () => { closeDrawer(); openConversation(null); $("text").focus(); };

function closeDrawer() {
  document.body.classList.remove("drawer-open");
  $("menu").setAttribute("aria-expanded", "false");
  $("scrim").hidden = true;
}
$("menu").onclick = () => {
  const open = document.body.classList.toggle("drawer-open");
  $("menu").setAttribute("aria-expanded", String(open));
  $("scrim").hidden = !open;
  if (open) { const first = $("sidebar").querySelector("button"); if (first) first.focus(); }
};
$("scrim").onclick = closeDrawer;

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  addFiles([...e.dataTransfer.files]);
});
$("file-pick").onchange = () => { addFiles([...$("file-pick").files]); $("file-pick").value = ""; };

async function start() {
  try { $("key").value = sessionStorage.getItem(STORE + "key") || ""; } catch (e) { /* storage off */ }
  const last = readStored("last");
  await loadPersonas();
  if (last) applySettings(last);
  showPersona();
  connect(conversationInAddress());
  refreshConversations();
}
start();
