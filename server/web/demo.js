// The demo page: the microphone (or a local recording) transcribed live over /v1/realtime.
//
// Protocol (vLLM's realtime transcription, plus this server's opt-in partials extension):
//   connect (subprotocols "realtime" and, with a key, "openai-insecure-api-key.<key>")
//   <- session.created;  -> session.update {model, partials: true};  <- session.updated
//   -> input_audio_buffer.commit (starts an utterance); -> input_audio_buffer.append (100 ms PCM16, base64)
//   <- transcription.delta (stable text) / transcription.partial (pending text, replaced each step)
//   -> input_audio_buffer.commit {final: true} on stop;  <- transcription.done
// No framework, no build step, nothing from another origin.
import { Resampler, toPcm16 } from "./resample.js";

const RATE = 16000;
const CHUNK_S = 0.1; // one append per 100 ms
const CHUNK_SAMPLES = RATE * CHUNK_S;
const HEALTH_EVERY_MS = 2000;
const DONE_TIMEOUT_MS = 60000;
const KEY_PROTOCOL = "openai-insecure-api-key.";

const $ = (id) => document.getElementById(id);
const ui = {
  toggle: $("toggle"),
  file: $("file"),
  key: $("api-key"),
  settings: $("settings"),
  txt: $("download-txt"),
  srt: $("download-srt"),
  clear: $("clear"),
  status: $("status"),
  connection: $("connection"),
  latency: $("latency"),
  server: $("server"),
  transcript: $("transcript"),
  empty: $("transcript-empty"),
};

// -- state -------------------------------------------------------------------------------------
const state = {
  ws: null,
  model: null,
  conn: "disconnected", // disconnected | connecting | connected | reconnecting
  source: null, // null | {kind: "mic", ...} | {kind: "file", ...}
  utterance: null, // the running utterance
  finishing: null, // the utterance waiting for its done
  utterances: [],
  samplesSent: 0, // every sample appended since the page opened: the clock of the srt cues
  dropped: 0, // samples captured while the connection was down
  reconnectAttempt: 0,
  reconnectTimer: null,
};

// -- status line -------------------------------------------------------------------------------
function say(message, kind = "info") {
  ui.status.textContent = message;
  ui.status.dataset.kind = kind;
}

function setConnection(conn, detail = "") {
  state.conn = conn;
  ui.connection.textContent = detail ? `${conn} (${detail})` : conn;
  ui.connection.dataset.state = conn;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

async function pollHealth() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const health = await response.json();
    const parts = [`${health.status}`];
    if (typeof health.sessions === "number") parts.push(`${health.sessions} session${health.sessions === 1 ? "" : "s"}`);
    const capacity = health.capacity;
    if (capacity && typeof capacity === "object") {
      if (capacity.headroom !== undefined && capacity.sessions_max !== undefined) {
        parts.push(`headroom ${capacity.headroom} of ${capacity.sessions_max}`);
      } else if (capacity.headroom !== undefined) {
        parts.push(`headroom ${capacity.headroom}`);
      } else if (capacity.sessions_max !== undefined) {
        parts.push(`at most ${capacity.sessions_max} sessions`);
      }
    }
    if (typeof health.queue_depth === "number") parts.push(`queue ${health.queue_depth}`);
    ui.server.textContent = parts.join(" · ");
    if (!state.model && Array.isArray(health.models) && health.models.length) state.model = health.models[0];
  } catch {
    ui.server.textContent = "not answering";
  }
}

// -- transcript ----------------------------------------------------------------------------------
function newUtterance() {
  const el = document.createElement("p");
  el.className = "utterance";
  const committed = document.createElement("span");
  committed.className = "committed";
  const partial = document.createElement("span");
  partial.className = "partial";
  el.append(committed, partial);
  ui.transcript.append(el);
  ui.empty.hidden = true;
  const u = {
    el, committedEl: committed, partialEl: partial, text: "", partial: "",
    startSample: state.samplesSent, started: performance.now(), firstDelta: null, stopped: null,
    cues: [], cue: null, done: false,
  };
  state.utterances.push(u);
  return u;
}

function showText(u) {
  u.committedEl.textContent = u.text;
  u.partialEl.textContent = u.partial;
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function onDelta(u, delta) {
  if (!delta) return;
  if (u.firstDelta === null) u.firstDelta = performance.now();
  u.text += delta;
  // srt: a cue runs from the end of the previous one to the audio sent when its text arrived
  const now = state.samplesSent / RATE;
  if (u.cue && u.cue.full && /^\s/.test(delta)) u.cue = null;
  if (!u.cue) {
    const start = u.cues.length ? u.cues[u.cues.length - 1].end : u.startSample / RATE;
    u.cue = { start, end: now, text: "" };
    u.cues.push(u.cue);
  }
  u.cue.text += delta;
  u.cue.end = Math.max(now, u.cue.start + 0.1);
  // a cue ends after a sentence or ~2 lines; the next one starts at a space, never inside a word
  u.cue.full = /[.?!]["')\]]?\s*$/.test(u.cue.text) || u.cue.text.length >= 84;
  showText(u);
}

function onPartial(u, text) {
  u.partial = text;
  showText(u);
}

function onDone(u, event) {
  const wasFinishing = state.finishing === u;
  u.done = true;
  u.partial = "";
  if (typeof event.text === "string" && event.text !== u.text) {
    u.text = event.text; // equal to the deltas by the protocol; the server's text wins
  }
  if (u.cues.length) u.cues[u.cues.length - 1].end = Math.max(u.cues[u.cues.length - 1].end, state.samplesSent / RATE);
  u.cue = null;
  showText(u);
  if (u.stopped !== null) {
    const parts = [];
    if (u.firstDelta !== null) parts.push(`first text ${seconds(u.firstDelta - u.started)} after start`);
    parts.push(`stop → done ${seconds(performance.now() - u.stopped)}`);
    ui.latency.textContent = `Last utterance: ${parts.join(" · ")}`;
  }
  if (wasFinishing) {
    state.finishing = null;
    clearTimeout(u.doneTimer);
    say(state.source ? "Recording…" : "Done.", "info");
    if (!state.source) closeSocket();
    refreshButtons();
  }
}

function transcriptText() {
  return state.utterances.map((u) => (u.text + (u.done ? "" : u.partial)).trim()).filter(Boolean).join("\n");
}

function srtTime(t) {
  const ms = Math.max(0, Math.round(t * 1000));
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(Math.floor(ms / 3600000))}:${pad(Math.floor(ms / 60000) % 60)}:${pad(Math.floor(ms / 1000) % 60)},${pad(ms % 1000, 3)}`;
}

function transcriptSrt() {
  const cues = state.utterances.flatMap((u) => u.cues).filter((c) => c.text.trim());
  return cues.map((c, i) => `${i + 1}\n${srtTime(c.start)} --> ${srtTime(c.end)}\n${c.text.trim()}\n`).join("\n");
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// -- the connection ------------------------------------------------------------------------------
class RefusedError extends Error {}

async function resolveModel(key) {
  // /v1/models needs the key when the server has keys: asking it first gives a clear message,
  // where a refused WebSocket handshake only shows the browser a closed socket.
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  let response;
  try {
    response = await fetch("/v1/models", { headers, cache: "no-store" });
  } catch {
    throw new Error("The server does not answer.");
  }
  if (response.status === 401) {
    throw new RefusedError(key ? "The API key was refused: check the API key field."
                               : "This server needs an API key: enter it in the API key field.");
  }
  if (response.ok) {
    const body = await response.json();
    if (body.data && body.data.length) return body.data[0].id;
  }
  await pollHealth();
  if (state.model) return state.model;
  throw new Error(`The server has no model to offer (HTTP ${response.status}).`);
}

function openSocket() {
  const key = ui.key.value.trim();
  return resolveModel(key).then((model) => new Promise((resolve, reject) => {
    state.model = model;
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
    const protocols = ["realtime"];
    if (key) protocols.push(KEY_PROTOCOL + key);
    let ws;
    try {
      ws = new WebSocket(url, protocols);
    } catch (err) {
      reject(new RefusedError(`This API key cannot be sent from a browser (${err.message}).`));
      return;
    }
    let opened = false;
    ws.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (!opened) {
        if (event.type === "session.created") {
          ws.send(JSON.stringify({ type: "session.update", model, partials: true }));
        } else if (event.type === "session.updated") {
          opened = true;
          ws.onmessage = (m) => onEvent(ws, m);
          resolve(ws);
        } else if (event.type === "error") {
          ws.busyCode = event.code;
          if (event.code !== "server_busy" && event.code !== "server_shutdown") reject(new Error(event.error));
        }
      }
    };
    ws.onclose = (close) => {
      if (!opened) {
        const error = new Error(closeMessage(close.code, ws.busyCode) || "Could not connect.");
        error.closeCode = close.code;
        error.errorCode = ws.busyCode;
        reject(error);
      } else {
        onClose(ws, close);
      }
    };
  }));
}

function closeMessage(code, errorCode) {
  if (code === 1013 || errorCode === "server_busy") {
    return "Server busy: every session is in use. Try again in a moment.";
  }
  if (code === 1001 || errorCode === "server_shutdown") return "The server is shutting down.";
  return null;
}

function onEvent(ws, message) {
  if (ws !== state.ws) return;
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return;
  }
  const u = state.finishing || state.utterance;
  switch (event.type) {
    case "transcription.delta":
      if (u) onDelta(u, event.delta);
      break;
    case "transcription.partial":
      if (u) onPartial(u, event.text);
      break;
    case "transcription.done":
      if (u) onDone(u, event);
      break;
    case "error":
      ws.lastError = event.code;
      if (event.code === "server_shutdown") say(`The server is shutting down: ${event.error}`, "error");
      else if (event.code === "idle_timeout") say("The server closed the idle connection.", "info");
      else if (event.code !== "server_busy") say(`Server error (${event.code}): ${event.error}`, "error");
      if (event.code === "processing_error" && state.finishing) {
        // replaces transcription.done: the utterance ends with the text it has
        const failed = state.finishing;
        clearTimeout(failed.doneTimer);
        failed.partial = "";
        failed.done = true;
        state.finishing = null;
        showText(failed);
        if (!state.source) closeSocket();
        refreshButtons();
      }
      break;
    default:
      break;
  }
}

function onClose(ws, close) {
  if (ws !== state.ws) return;
  state.ws = null;
  for (const u of [state.utterance, state.finishing]) {
    if (u && !u.done) {
      u.partial = "";
      u.done = true;
      u.cue = null;
      u.el.classList.add("interrupted");
      showText(u);
    }
  }
  state.finishing = null;
  if (close.code === 1013 || ws.lastError === "server_busy") {
    stopSource();
    setConnection("disconnected", "busy");
    say(closeMessage(1013), "error");
    refreshButtons();
    return;
  }
  if (close.code === 1000 && ws.lastError === "idle_timeout" && !state.source) {
    setConnection("disconnected");
    refreshButtons();
    return;
  }
  const why = close.code === 1001 || ws.lastError === "server_shutdown"
    ? "The server is shutting down." : `Connection lost (code ${close.code}).`;
  if (state.source) scheduleReconnect(why);
  else {
    setConnection("disconnected");
    say(`${why} Press Start to connect again.`, "error");
    refreshButtons();
  }
}

function scheduleReconnect(why) {
  const attempt = ++state.reconnectAttempt;
  const delay = Math.min(10, 2 ** (attempt - 1));
  setConnection("reconnecting", `attempt ${attempt}`);
  say(`${why} Reconnecting in ${delay} s (attempt ${attempt})…`, "error");
  refreshButtons();
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(async () => {
    if (!state.source) return;
    try {
      await connect();
      startUtterance();
      const lost = state.dropped / RATE;
      say(`Reconnected${lost ? `; ${lost.toFixed(1)} s of audio was lost while disconnected` : ""}. Recording…`);
      state.dropped = 0;
    } catch (err) {
      if (err instanceof RefusedError || err.closeCode === 1013 || err.errorCode === "server_busy") {
        stopSource();
        setConnection("disconnected");
        say(err.message, "error");
        refreshButtons();
      } else if (state.source) {
        scheduleReconnect(err.message);
      }
    }
  }, delay * 1000);
}

async function connect() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) return state.ws;
  if (state.conn !== "reconnecting") setConnection("connecting");
  const ws = await openSocket();
  state.ws = ws;
  state.reconnectAttempt = 0;
  setConnection("connected", state.model);
  return ws;
}

function closeSocket() {
  // forgotten at once: its close event is then no news (see onClose), and a new one may open
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close(1000, "done");
  setConnection("disconnected");
  refreshButtons();
}

function send(event) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(event));
    return true;
  }
  return false;
}

function appendPcm(bytes) {
  const samples = bytes.length / 2;
  if (!state.utterance || !state.ws || state.ws.readyState !== WebSocket.OPEN) {
    state.dropped += samples;
    return;
  }
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  send({ type: "input_audio_buffer.append", audio: btoa(binary) });
  state.samplesSent += samples;
}

function startUtterance() {
  state.utterance = newUtterance();
  send({ type: "input_audio_buffer.commit" });
}

function finishUtterance() {
  const u = state.utterance;
  state.utterance = null;
  if (!u) return;
  u.stopped = performance.now();
  if (!send({ type: "input_audio_buffer.commit", final: true })) {
    say("Stopped.");
  } else {
    state.finishing = u;
    say("Finishing the last words…");
    u.doneTimer = setTimeout(() => {
      if (state.finishing === u) {
        say("No answer from the server for the last words.", "error");
        state.finishing = null;
        closeSocket();
        refreshButtons();
      }
    }, DONE_TIMEOUT_MS);
  }
}

// -- sources ---------------------------------------------------------------------------------------
async function startMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    say("This browser offers no microphone here (a page must come from https:// or localhost).", "error");
    return;
  }
  const source = { kind: "mic", stream: null, context: null, node: null };
  state.source = source;
  refreshButtons();
  say("Connecting…");
  try {
    await connect(); // first: a server that refuses (key, busy) needs no microphone
  } catch (err) {
    failStart(err);
    return;
  }
  try {
    source.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (err) {
    if (err.name === "NotAllowedError" || err.name === "SecurityError") {
      failStart(new Error("Microphone access was denied. Allow it for this page in the browser's site settings, "
                          + "then press Start again."));
    } else if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
      failStart(new Error("No microphone was found."));
    } else {
      failStart(new Error(`The microphone could not be opened: ${err.message}`));
    }
    closeSocket();
    return;
  }
  if (state.source !== source) {
    source.stream.getTracks().forEach((track) => track.stop());
    return;
  }
  try {
    const context = new AudioContext();
    source.context = context;
    await context.audioWorklet.addModule("/demo/capture-worklet.js");
    if (state.source !== source) return;
    const input = context.createMediaStreamSource(source.stream);
    const node = new AudioWorkletNode(context, "pcm16-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { targetRate: RATE, chunkSamples: CHUNK_SAMPLES },
    });
    source.node = node;
    node.port.onmessage = (event) => {
      if (event.data instanceof ArrayBuffer) appendPcm(new Uint8Array(event.data));
      else if (event.data === "flushed" && source.onFlushed) source.onFlushed();
    };
    const mute = context.createGain();
    mute.gain.value = 0;
    input.connect(node).connect(mute).connect(context.destination); // pulled by the graph, silent
    startUtterance();
    say(`Recording from the microphone (${context.sampleRate} Hz, sent as 16 kHz)…`);
  } catch (err) {
    failStart(err);
    closeSocket();
  }
}

async function startFile(file) {
  say(`Reading ${file.name}…`);
  let samples;
  try {
    const data = await file.arrayBuffer();
    const context = new OfflineAudioContext(1, 1, 48000);
    const decoded = await context.decodeAudioData(data); // at 48 kHz (the browser resamples other rates)
    const mono = new Float32Array(decoded.length);
    for (let c = 0; c < decoded.numberOfChannels; c++) {
      const channel = decoded.getChannelData(c);
      for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
    }
    samples = Resampler.resampleAll(mono, decoded.sampleRate, RATE);
  } catch (err) {
    say(`${file.name} could not be decoded as audio (${err.message || err}).`, "error");
    return;
  }
  const source = { kind: "file", name: file.name, samples, position: 0, timer: null };
  state.source = source;
  refreshButtons();
  try {
    await connect();
  } catch (err) {
    failStart(err);
    return;
  }
  startUtterance();
  const started = performance.now();
  const total = samples.length / RATE;
  const tick = () => {
    if (state.source !== source) return;
    // absolute schedule: chunk k is due at started + k * 100 ms, so the pace never drifts
    const due = Math.min(samples.length, Math.floor(((performance.now() - started) / 1000) * RATE / CHUNK_SAMPLES + 1) * CHUNK_SAMPLES);
    while (source.position < due) {
      const end = Math.min(source.position + CHUNK_SAMPLES, samples.length);
      appendPcm(toPcm16(samples.subarray(source.position, end)));
      source.position = end;
    }
    if (state.conn === "connected") say(`Streaming ${file.name} at real time: ${(source.position / RATE).toFixed(1)} of ${total.toFixed(1)} s…`);
    if (source.position >= samples.length) {
      stop();
      return;
    }
    source.timer = setTimeout(tick, started + ((source.position / CHUNK_SAMPLES) * CHUNK_S * 1000) - performance.now());
  };
  tick();
}

function failStart(err) {
  stopSource();
  setConnection(state.ws ? state.conn : "disconnected");
  say(err.message || String(err), "error");
  refreshButtons();
}

function stopSource() {
  const source = state.source;
  state.source = null;
  clearTimeout(state.reconnectTimer);
  if (!source) return;
  if (source.kind === "mic") {
    if (source.stream) source.stream.getTracks().forEach((track) => track.stop());
    if (source.context) source.context.close();
  } else {
    clearTimeout(source.timer);
  }
}

async function stop() {
  const source = state.source;
  if (!source) return;
  if (source.kind === "mic" && source.node) {
    // the worklet's last partial chunk goes out before the final commit
    await new Promise((resolve) => {
      source.onFlushed = resolve;
      source.node.port.postMessage("flush");
      setTimeout(resolve, 300);
    });
  }
  stopSource();
  if (state.utterance) finishUtterance();
  else if (!state.finishing) {
    closeSocket();
    say("Stopped.");
  }
  if (state.conn === "reconnecting") setConnection("disconnected");
  refreshButtons();
}

// -- buttons -----------------------------------------------------------------------------------------
function refreshButtons() {
  const active = state.source !== null;
  ui.toggle.textContent = active ? (state.source.kind === "file" ? "Stop streaming the file" : "Stop")
                                 : "Start microphone";
  ui.toggle.setAttribute("aria-pressed", String(active));
  const waiting = !active && state.finishing !== null;
  ui.toggle.disabled = waiting;
  ui.file.disabled = active || waiting;
  const has = state.utterances.some((u) => u.text.trim() || u.partial.trim());
  ui.txt.disabled = !has;
  ui.srt.disabled = !has;
  ui.clear.disabled = !has || active || waiting;
  document.body.dataset.recording = String(active);
}

ui.toggle.addEventListener("click", () => {
  if (state.source) stop();
  else if (!state.finishing) startMicrophone();
});

ui.file.addEventListener("change", () => {
  const file = ui.file.files && ui.file.files[0];
  ui.file.value = "";
  if (file && !state.source && !state.finishing) startFile(file);
});

ui.settings.addEventListener("submit", (event) => event.preventDefault());
ui.txt.addEventListener("click", () => download("transcript.txt", transcriptText() + "\n", "text/plain"));
ui.srt.addEventListener("click", () => download("transcript.srt", transcriptSrt(), "application/x-subrip"));
ui.clear.addEventListener("click", () => {
  state.utterances = [];
  ui.transcript.querySelectorAll(".utterance").forEach((el) => el.remove());
  ui.empty.hidden = false;
  refreshButtons();
});

const observer = new MutationObserver(() => refreshButtons());
observer.observe(ui.transcript, { childList: true, subtree: true, characterData: true });

setConnection("disconnected");
refreshButtons();
pollHealth();
setInterval(pollHealth, HEALTH_EVERY_MS);
document.body.dataset.ready = "true";
