// svlm viewer: plays a local file or the webcam, sends `fps` JPEG frames per second of video over the
// WebSocket /v1/stream (protocol: docs/serve.md) and shows the commentary, answers, latency and speed.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video"), canvas = $("canvas");
const ui = {
  file: $("file"), webcam: $("webcam"), start: $("start"), stop: $("stop"), fps: $("fps"),
  previousText: $("previous-text"), query: $("query"), question: $("question"), ask: $("ask"),
  status: $("status"), commentary: $("commentary"), answers: $("answers"), errors: $("errors"),
  latency: $("latency"), rtf: $("rtf"), dropped: $("dropped"), lag: $("lag"),
};

let source = null;      // "file" | "webcam"
let camera = null;      // MediaStream of the webcam
let fileUrl = null;
let ws = null;
let fps = 2;
let frameSize = null;   // [width, height] the server resizes to
let timer = null;
let nextFrame = 0;      // index of the next frame to send; frame n is at (n + 1) / fps seconds of video
let clock0 = 0;         // performance.now() at the webcam's first frame
let sendChain = Promise.resolve();  // frames are encoded asynchronously but sent in order
let startedAt = 0;      // performance.now() when the stream became ready
let secondsCommented = 0;
let stopping = false, ended = false;

function setStatus(text, state) {
  ui.status.textContent = text;
  ui.status.dataset.state = state;
}

function fmtT(t) { return Number.isInteger(t) ? String(t) : Number(t).toFixed(1); }

function addError(message) {
  const li = document.createElement("li");
  li.textContent = message;
  ui.errors.prepend(li);
}

function setControls() {
  const open = ws !== null;
  ui.start.disabled = open || source === null;
  ui.stop.disabled = !open || stopping;
  ui.question.disabled = ui.ask.disabled = !open || stopping;
  ui.file.disabled = ui.webcam.disabled = open;
}

// --- sources -----------------------------------------------------------------------------------

function releaseSource() {
  if (camera) { camera.getTracks().forEach((track) => track.stop()); camera = null; }
  if (fileUrl) { URL.revokeObjectURL(fileUrl); fileUrl = null; }
  video.srcObject = null;
  video.removeAttribute("src");
  source = null;
}

ui.file.addEventListener("change", () => {
  const file = ui.file.files[0];
  if (!file) return;
  releaseSource();
  fileUrl = URL.createObjectURL(file);
  video.controls = true;
  video.src = fileUrl;
  source = "file";
  setStatus(`file ${file.name}: press Start`, "idle");
  setControls();
});

ui.webcam.addEventListener("click", async () => {
  releaseSource();
  setControls();
  try {
    camera = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    setStatus("no webcam", "error");
    addError(`webcam: ${err.message || err.name}`);
    return;
  }
  video.controls = false;
  video.srcObject = camera;
  await video.play().catch(() => {});
  source = "webcam";
  setStatus("webcam: press Start", "idle");
  setControls();
});

// --- streaming ---------------------------------------------------------------------------------

function videoTime() {
  return source === "webcam" ? (performance.now() - clock0) / 1000 : video.currentTime;
}

function captureFrame() {
  const vw = video.videoWidth, vh = video.videoHeight;
  if (!vw || !vh) return false;
  // Keep the aspect ratio and at least the server's frame size (it resizes), never upscale.
  let scale = 1;
  if (frameSize) scale = Math.min(1, Math.max(frameSize[0] / vw, frameSize[1] / vh));
  canvas.width = Math.max(1, Math.round(vw * scale));
  canvas.height = Math.max(1, Math.round(vh * scale));
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  const blob = new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
  const socket = ws;
  sendChain = sendChain.then(() => blob).then((b) => {
    if (b && socket.readyState === WebSocket.OPEN) socket.send(b);
  });
  return true;
}

function tick() {
  if (!ws || stopping || video.readyState < 2) return;
  const t = videoTime();
  // Frame k of a second s is the one on screen at s + (k + 1) / fps (docs/method.md §2).
  while ((nextFrame + 1) / fps <= t) {
    if (!captureFrame()) return;
    nextFrame += 1;
  }
}

function beginFrames() {
  nextFrame = 0;
  clock0 = performance.now();
  if (source === "file") {
    video.currentTime = 0;
    video.play().catch((err) => addError(`play: ${err.message}`));
  }
  timer = setInterval(tick, Math.max(10, 250 / fps));
}

function stopStream() {
  if (!ws || stopping) return;
  stopping = true;
  clearInterval(timer);
  timer = null;
  const socket = ws;
  setStatus("stopping: the queued seconds are still commented", "stopping");
  setControls();
  sendChain = sendChain.then(() => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "stop" }));
  });
}

function updateRtf() {
  if (!startedAt) return;
  const wall = (performance.now() - startedAt) / 1000;
  if (wall > 0) ui.rtf.textContent = (secondsCommented / wall).toFixed(2);
}

function onCommentary(m) {
  const li = document.createElement("li");
  li.dataset.tStart = m.t_start;
  li.dataset.tEnd = m.t_end;
  const label = document.createElement("span");
  label.className = "t";
  label.textContent = `${fmtT(m.t_start)}–${fmtT(m.t_end)} s`;
  const text = document.createElement("span");
  text.className = m.text ? "text" : "text silence";
  text.textContent = m.text || "(silence)";
  li.append(label, " ", text);
  ui.commentary.prepend(li);
  secondsCommented += m.t_end - m.t_start;
  if (typeof m.latency_ms === "number") ui.latency.textContent = Math.round(m.latency_ms);
  if (typeof m.dropped_s === "number") ui.dropped.textContent = fmtT(m.dropped_s);
  if (typeof m.lag_s === "number") ui.lag.textContent = fmtT(m.lag_s);
  updateRtf();
}

function onAnswer(m) {
  let li = [...ui.answers.querySelectorAll("li.pending")].reverse().find((el) => el.dataset.question === m.question);
  if (!li) {
    li = document.createElement("li");
    ui.answers.prepend(li);
  }
  li.className = "answered";
  li.replaceChildren();
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = `${fmtT(m.t)} s: ${m.question}`;
  const a = document.createElement("div");
  a.className = m.text ? "a" : "a silence";
  a.textContent = m.text || "(no answer)";
  li.append(q, a);
}

ui.start.addEventListener("click", () => {
  if (ws || !source) return;
  fps = Math.max(1, Math.round(Number(ui.fps.value) || 2));
  const start = { type: "start", fps };
  if (ui.previousText.value.trim()) start.previous_text = ui.previousText.value;
  if (ui.query.value.trim()) start.query = ui.query.value;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/v1/stream`);
  ws = socket;
  stopping = ended = false;
  startedAt = 0;
  secondsCommented = 0;
  sendChain = Promise.resolve();
  ui.commentary.replaceChildren();
  ui.answers.replaceChildren();
  ui.errors.replaceChildren();
  for (const el of [ui.latency, ui.rtf, ui.dropped, ui.lag]) el.textContent = "–";
  setStatus("connecting", "connecting");
  setControls();

  socket.addEventListener("open", () => socket.send(JSON.stringify(start)));
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") return;
    let m;
    try { m = JSON.parse(event.data); } catch { addError("the server sent malformed JSON"); return; }
    if (m.type === "ready") {
      if (m.fps) ui.fps.title = `the model keeps ${m.fps} frames per second`;
      frameSize = Array.isArray(m.frame_size) ? m.frame_size : null;
      startedAt = performance.now();
      setStatus(`streaming (row ${m.row})`, "streaming");
      beginFrames();
    } else if (m.type === "commentary") {
      onCommentary(m);
    } else if (m.type === "answer") {
      onAnswer(m);
    } else if (m.type === "error") {
      addError(m.message);
    } else if (m.type === "end") {
      ended = true;
      setStatus("ended", "ended");
      socket.close();
    }
  });
  socket.addEventListener("close", (event) => {
    if (ws !== socket) return;
    clearInterval(timer);
    timer = null;
    ws = null;
    stopping = false;
    if (!ended) setStatus(`closed (${event.code}${event.reason ? ": " + event.reason : ""})`, "closed");
    if (source === "file") video.pause();
    setControls();
  });
  socket.addEventListener("error", () => addError("WebSocket error"));
});

ui.stop.addEventListener("click", stopStream);
video.addEventListener("ended", () => { if (source === "file") { tick(); stopStream(); } });
setInterval(() => { if (ws) updateRtf(); }, 1000);

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.question.value.trim();
  if (!text || !ws || stopping) return;
  const socket = ws;
  sendChain = sendChain.then(() => {  // after the frames already captured
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "ask", text }));
  });
  const li = document.createElement("li");
  li.className = "pending";
  li.dataset.question = text;
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = text;
  const a = document.createElement("div");
  a.className = "a silence";
  a.textContent = "waiting for the next second…";
  li.append(q, a);
  ui.answers.prepend(li);
  ui.question.value = "";
});

window.addEventListener("pagehide", () => { if (ws) ws.close(); });
