// The chat page: a user of mmchat.js (all protocol work happens there). Text from the
// person and the model is always inserted as text, never as HTML.
import { MMChat, MMChatError } from "./mmchat.js";

const $ = (id) => document.getElementById(id);
const log = $("log");
const status = $("status");
const text = $("text");
const tray = $("tray");
const stopButton = $("stop");
const micButton = $("mic");
const recordingLine = $("recording");
const TOKEN_KEY = "mmchat-token";
const WAV_RATE = 16000;

/** Plain words for the error codes a person may meet. */
const PLAIN = {
  media_too_large: "That file is too large for this server.",
  unsupported_media: "This server cannot read that kind of file.",
  corrupt_media: "That file could not be read.",
  too_many_attachments: "Too many attachments for one message.",
  rate_limited: "Messages are coming too fast. Wait a moment and try again.",
  media_busy: "Your pictures and recordings took a lot of the server's time. Wait a moment and send them again.",
  connection_lost: "The server is gone, so this message was not answered.",
  cannot_connect: "The server cannot be reached.",
  message_too_long: "That message is too long.",
  empty_message: "Type something, or add a picture or a recording.",
  session_busy: "The previous reply took too long. Try again.",
  store_unavailable: "The server cannot reach its session store. Try again later.",
  plugin_error: "The server failed to handle that attachment.",
  reply_lost: "The server stopped while replying; this is what came through.",
  unauthorized: "The access token was refused.",
  forbidden: "This conversation belongs to someone else.",
  microphone: "The microphone could not be used.",
};

/** @type {MMChat|null} */
let chat = null;
/** @type {{blob: Blob, name: string, url: string}[]} */
let pending = [];
/** The replies still running, newest last. */
const running = new Set();

// -- connection --------------------------------------------------------------------

function chatUrl() {
  // served from the HTTP port (the OpenAI endpoint's), the page is told where to connect
  const meta = document.querySelector('meta[name="mmchat-websocket"]');
  if (meta) return meta.content;
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/`;
}

function showStatus(words, state) {
  status.textContent = words;
  status.dataset.state = state;
}

async function connect() {
  showStatus("Connecting…", "connecting");
  const token = sessionStorage.getItem(TOKEN_KEY);
  try {
    chat = await MMChat.connect(chatUrl(), { token });
  } catch (err) {
    if (err.code === "unauthorized") {
      askForToken(token ? PLAIN.unauthorized : "This server needs an access token.");
      return;
    }
    showStatus(`${PLAIN[err.code] ?? err.message} Trying again…`, "reconnecting");
    setTimeout(connect, 2000);
    return;
  }
  $("token-form").hidden = true;
  document.body.dataset.session = chat.sessionId;
  showStatus("Connected", "connected");
  chat.addEventListener("status", (ev) => {
    const { state, resumed } = ev.detail;
    document.body.dataset.session = chat.sessionId;
    if (state === "connected") showStatus(resumed ? "Resumed" : "Connected", resumed ? "resumed" : "connected");
    else if (state === "reconnecting") showStatus("Reconnecting…", "reconnecting");
    else showStatus("Disconnected", "closed");
  });
  chat.addEventListener("error", (ev) => {
    showError(ev.detail);
    if (ev.detail.code === "unauthorized") askForToken(PLAIN.unauthorized);  // expired, say
  });
  chat.addEventListener("notice", (ev) => showError(ev.detail));
  chat.addEventListener("reply", (ev) => showReply(ev.detail));
  text.focus();
}

function askForToken(words) {
  sessionStorage.removeItem(TOKEN_KEY);
  showStatus(words, "closed");
  $("token-form").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  connect();
});

// -- the conversation --------------------------------------------------------------

function element(tag, className, content) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (content !== undefined) node.textContent = content;
  return node;
}

function scrollDown() {
  log.scrollTop = log.scrollHeight;
}

/** @param {MMChatError} err @param {HTMLElement} [where] */
function showError(err, where) {
  const box = element("p", "error");
  box.setAttribute("role", "alert");
  box.dataset.code = err.code;
  box.append(PLAIN[err.code] ?? "Something went wrong.");
  if (err.message && err.message !== PLAIN[err.code]) {
    box.append(" ", element("small", "", `(${err.message})`));
  }
  (where ?? log).append(box);
  scrollDown();
}

function attachmentView(item) {
  if (item.blob.type.startsWith("image/")) {
    const img = element("img", "thumb");
    img.src = item.url;
    img.alt = `picture: ${item.name}`;
    return img;
  }
  const audio = element("audio", "clip");
  audio.controls = true;
  audio.src = item.url;
  audio.title = item.name;
  return audio;
}

function showUserMessage(words, items) {
  const box = element("article", "msg user");
  box.setAttribute("aria-label", "You");
  for (const item of items) box.append(attachmentView(item));
  if (words) box.append(element("p", "text", words));
  log.append(box);
}

/** Render a reply as it streams, with its details folded away once done. */
async function showReply(reply) {
  const box = element("article", "msg bot");
  box.setAttribute("aria-label", "mmchat");
  box.setAttribute("aria-busy", "true");
  const body = element("p", "text");
  box.append(body);
  log.append(box);
  running.add(reply);
  stopButton.disabled = false;
  try {
    for await (const delta of reply) {
      body.append(delta.text);
      scrollDown();
    }
    const done = await reply.finished;
    box.dataset.finish = done.finish_reason;
    for (const err of reply.errors) showError(err, box);
    if (done.finish_reason === "cancelled") box.append(element("p", "note", "(stopped)"));
    if (done.finish_reason === "length") box.append(element("p", "note", "(cut at the length limit)"));
    box.append(details(done));
  } catch (err) {
    box.dataset.finish = "refused";
    body.remove();
    showError(err instanceof MMChatError ? err : new MMChatError("bad_input", String(err)), box);
  } finally {
    box.removeAttribute("aria-busy");
    running.delete(reply);
    stopButton.disabled = running.size === 0;
    scrollDown();
  }
}

/** Where the model looked (attention per modality) and the timings, folded away. */
function details(done) {
  const fold = element("details", "details");
  fold.append(element("summary", "", "Details"));
  const attention = element("dl", "attention");
  for (const [name, share] of Object.entries(done.attention ?? {})) {
    const bar = element("meter");
    bar.min = 0;
    bar.max = 1;
    bar.value = share;
    const percent = `${Math.round(share * 100)}%`;
    bar.title = percent;
    const value = element("dd");
    value.append(bar, ` ${percent}`);
    attention.append(element("dt", "", name), value);
  }
  if (attention.childElementCount) {
    fold.append(element("h3", "", "Attention"), attention);
  }
  const timings = element("dl", "timings");
  for (const [name, ms] of Object.entries(done.timings ?? {})) {
    timings.append(element("dt", "", name.replace(/_ms$/, "")), element("dd", "", `${ms.toFixed(1)} ms`));
  }
  if (done.usage) {
    timings.append(element("dt", "", "tokens"),
                   element("dd", "", `${done.usage.prompt_tokens} in, ${done.usage.completion_tokens} out`));
  }
  fold.append(element("h3", "", "Timings"), timings);
  return fold;
}

function send() {
  const words = text.value.trim();
  const items = pending;
  if (!chat || (!words && items.length === 0)) return;
  if (chat.state === "closed") {
    showError(new MMChatError("connection_lost", "not connected"));
    return;
  }
  pending = [];
  renderTray();
  text.value = "";
  showUserMessage(words, items);
  const reply = chat.send({ text: words, attachments: items.map((item) => item.blob) });
  showReply(reply);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  send();
});

text.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    send();
  }
});

stopButton.addEventListener("click", () => {
  for (const reply of running) reply.cancel();
});

// -- attachments: picker, drag and drop, paste -------------------------------------

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/") && !file.type.startsWith("audio/")) {
      showError(new MMChatError("unsupported_media", `${file.name || "that file"} is ${file.type || "of no known type"}`));
      continue;
    }
    pending.push({ blob: file, name: file.name || file.type, url: URL.createObjectURL(file) });
  }
  renderTray();
}

function renderTray() {
  tray.replaceChildren();
  pending.forEach((item, i) => {
    const entry = element("li");
    entry.append(attachmentView(item));
    const remove = element("button", "remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(item.url);
      pending.splice(i, 1);
      renderTray();
    });
    entry.append(remove);
    tray.append(entry);
  });
}

$("file").addEventListener("change", (ev) => {
  addFiles(ev.target.files);
  ev.target.value = "";
});

document.addEventListener("dragover", (ev) => {
  ev.preventDefault();
  document.body.classList.add("dropping");
});
document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
document.addEventListener("drop", (ev) => {
  ev.preventDefault();
  document.body.classList.remove("dropping");
  addFiles(ev.dataTransfer.files);
});

text.addEventListener("paste", (ev) => {
  if (ev.clipboardData.files.length) {
    ev.preventDefault();
    addFiles(ev.clipboardData.files);
  }
});

// -- voice: record, convert to 16 kHz mono WAV -------------------------------------

let recording = null;

micButton.addEventListener("click", async () => {
  if (recording) {
    stopRecording();
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.addEventListener("dataavailable", (ev) => chunks.push(ev.data));
    const started = performance.now();
    const tick = setInterval(() => {
      const seconds = (performance.now() - started) / 1000;
      recordingLine.dataset.seconds = seconds.toFixed(1);
      recordingLine.textContent = `Recording… ${seconds.toFixed(1)} s (press the microphone again to stop)`;
    }, 100);
    recording = { stream, recorder, chunks, tick };
    recorder.start();
    micButton.setAttribute("aria-pressed", "true");
    recordingLine.dataset.seconds = "0.0";
    recordingLine.textContent = "Recording…";
    recordingLine.hidden = false;
  } catch (err) {
    showError(new MMChatError("microphone", String(err.message || err)));
  }
});

async function stopRecording() {
  const { stream, recorder, chunks, tick } = recording;
  recording = null;
  clearInterval(tick);
  micButton.setAttribute("aria-pressed", "false");
  recordingLine.textContent = "Converting the recording…";
  const stopped = new Promise((resolve) => recorder.addEventListener("stop", resolve, { once: true }));
  recorder.stop();
  await stopped;
  for (const track of stream.getTracks()) track.stop();
  try {
    const wav = await toWav(new Blob(chunks, { type: recorder.mimeType }));
    const name = `recording-${new Date().toISOString().slice(11, 19)}.wav`;
    addFiles([new File([wav], name, { type: "audio/wav" })]);
    recordingLine.hidden = true;
  } catch (err) {
    recordingLine.hidden = true;
    showError(new MMChatError("microphone", `the recording could not be converted: ${err.message || err}`));
  }
}

/** Decode a recording and render it as 16 kHz mono 16-bit PCM WAV. */
async function toWav(blob) {
  const context = new AudioContext();
  let decoded;
  try {
    decoded = await context.decodeAudioData(await blob.arrayBuffer());
  } finally {
    context.close();
  }
  const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * WAV_RATE)), WAV_RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const samples = (await offline.startRendering()).getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const ascii = (at, word) => [...word].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  ascii(8, "WAVEfmt ");
  view.setUint32(16, 16, true);   // fmt chunk size
  view.setUint16(20, 1, true);    // PCM
  view.setUint16(22, 1, true);    // mono
  view.setUint32(24, WAV_RATE, true);
  view.setUint32(28, WAV_RATE * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  ascii(36, "data");
  view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return new Blob([view.buffer], { type: "audio/wav" });
}

connect();
