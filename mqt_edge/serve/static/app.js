// The page served at `/` by `mqt-edge serve`: a camera or an image, a question, m, and the server's figures.
// Plain browser JavaScript (no build step, nothing fetched from other hosts), so it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { source: "camera", upload: null, held: null, camera: null, controller: null };

// m stops for the slider: about four per octave, so small m (where answers change most) are as easy to
// reach as large ones. The number box beside it takes any m.
function mStops(maxM) {
  const stops = new Set([1, maxM]);
  for (let k = 0; 2 ** (k / 4) < maxM; k++) stops.add(Math.round(2 ** (k / 4)));
  return [...stops].sort((a, b) => a - b);
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = kind;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}`;
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// -- the model: wait for the bundle to load, then read M and the default m from /v1/models -------------

async function connect() {
  for (;;) {
    try {
      const health = await fetch("/health");
      if (health.ok) break;
      setStatus(health.status === 503 ? "loading the bundle…" : `health ${health.status}`, "loading");
    } catch (_) {
      setStatus("server unreachable", "error");
    }
    await sleep(1000);
  }
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) {
    setStatus(r.status === 401 ? "needs the API key (Settings)" : "no model", "error");
    showError(await errorText(r));
    return;
  }
  const card = (await r.json()).data[0];
  state.model = card.id;
  $("model").textContent = card.id;
  setupM(card.mqt ? card.mqt.max_m : 1, card.mqt ? card.mqt.default_m : 1);
  setStatus("ready", "ready");
  showError("");
  $("go").disabled = false;
}

function setupM(maxM, defaultM) {
  state.stops = mStops(maxM);
  const slider = $("m-slider");
  slider.max = String(state.stops.length - 1);
  for (const id of ["m", "refine-to"]) $(id).max = String(maxM);
  $("max-m").textContent = maxM;
  $("refine-to").value = maxM;
  setM(defaultM);
}

function setM(m) {
  const stops = state.stops;
  $("m").value = m;
  // the slider sits at the stop nearest m (on a log scale, as the stops are)
  let best = 0;
  stops.forEach((s, i) => { if (Math.abs(Math.log(s / m)) < Math.abs(Math.log(stops[best] / m))) best = i; });
  $("m-slider").value = best;
}

// -- the image: a camera frame or an uploaded file, as a data URL --------------------------------------

async function startCamera() {
  if (state.camera) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    $("source-note").textContent = "No camera here: browsers allow cameras only on https or localhost pages. Use Image.";
    return;
  }
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    $("video").srcObject = state.camera;
    $("source-note").textContent = "";
  } catch (err) {
    $("source-note").textContent = `The camera did not start (${err.name}). Allow it, or use Image.`;
  }
}

function useSource(source) {
  state.source = source;
  $("tab-camera").setAttribute("aria-selected", source === "camera");
  $("tab-image").setAttribute("aria-selected", source === "image");
  $("video").hidden = source !== "camera";
  $("camera-row").hidden = source !== "camera";
  $("picture").hidden = source !== "image" || !state.upload;
  $("image-row").hidden = source !== "image";
  $("source-note").textContent = source === "image" && !state.upload ? "Choose an image file." : "";
  if (source === "camera") startCamera();
}

function cameraFrame() {
  const video = $("video");
  if (!video.videoWidth) return null;
  if ($("freeze").checked && state.held) return state.held;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  state.held = canvas.toDataURL("image/jpeg", 0.92);
  return state.held;
}

function readUpload(file) {
  const reader = new FileReader();
  reader.onload = () => {
    state.upload = reader.result; // the file's own bytes: asking again about it hits the server's cache
    $("picture").src = state.upload;
    useSource("image");
  };
  reader.readAsDataURL(file);
}

// -- asking: one streamed request, its pieces shown as they come ----------------------------------------

function requestBody(image, question) {
  const m = Number($("m").value);
  const mqt = { m };
  if ($("refine").checked) {
    mqt.refine = Number($("refine-to").value);
    mqt.confidence = Number($("confidence").value);
  }
  return {
    model: state.model, stream: true, stream_options: { include_usage: true }, temperature: 0,
    max_tokens: Number($("max-tokens").value) || 64, mqt,
    messages: [{ role: "user", content: [{ type: "text", text: question }, { type: "image_url", image_url: { url: image } }] }],
  };
}

// Server-sent events over fetch: EventSource cannot POST. Calls onEvent with each parsed `data:` object.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        const data = line.startsWith("data:") ? line.slice(5).trim() : null;
        if (data && data !== "[DONE]") onEvent(JSON.parse(data));
      }
    }
  }
}

function resetAnswer(image) {
  $("answer").textContent = "";
  $("answer").dataset.state = "streaming";
  $("asked").src = image;
  $("asked").hidden = false;
  $("refined").textContent = "";
  for (const id of ["s-m", "s-ttft", "s-cached", "s-prompt", "s-decode", "s-total", "s-finish"]) $(id).textContent = "…";
  showError("");
}

async function ask(event) {
  event.preventDefault();
  const image = state.source === "camera" ? cameraFrame() : state.upload;
  if (!image) return showError(state.source === "camera" ? "No camera frame yet: wait for the video, or use Image." : "Choose an image first.");
  const question = $("question").value.trim();
  const result = { question, text: "", finish: null, usage: null, mqt: null };
  resetAnswer(image);
  busy(true);
  state.controller = new AbortController();
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(requestBody(image, question)), signal: state.controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    await readEvents(r, (chunk) => onChunk(chunk, result));
    showResult(result);
  } catch (err) {
    $("answer").dataset.state = "error";
    showError(err.name === "AbortError" ? "Stopped." : String(err.message || err));
  } finally {
    busy(false);
  }
}

function onChunk(chunk, result) {
  if (chunk.error) throw new Error(chunk.error.message);
  for (const choice of chunk.choices || []) {
    if (choice.delta && choice.delta.content) {
      result.text += choice.delta.content;
      $("answer").textContent = result.text.trimStart();
    }
    if (choice.finish_reason) result.finish = choice.finish_reason;
  }
  if (chunk.usage) result.usage = chunk.usage;
  if (chunk.mqt) result.mqt = chunk.mqt;
}

function busy(on) {
  $("go").disabled = on;
  $("stop").hidden = !on;
}

// -- the server's figures ---------------------------------------------------------------------------------

const ms = (x) => (x == null ? "–" : `${Math.round(x)} ms`);

function showResult(result) {
  const info = result.mqt || {}, timings = info.timings_ms || {}, usage = result.usage || {};
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : null;
  $("answer").textContent = result.text.trim();
  $("answer").dataset.state = "done";
  $("s-m").textContent = info.m ?? "–";
  $("s-ttft").textContent = ms(timings.ttft);
  $("s-cached").textContent = cached ?? "–";
  $("s-prompt").textContent = usage.prompt_tokens ?? "–";
  $("s-decode").textContent = info.decode_tokens_per_s ? `${info.decode_tokens_per_s.toFixed(0)} tok/s` : "–";
  $("s-total").textContent = ms(info.server_ms);
  $("s-finish").textContent = result.finish || "–";
  $("refined").textContent = refineText(info);
  addHistory(result, info, timings, cached);
}

// Probabilities near 1 keep four decimals, so "0.9986 is below 1" does not read as "1.00 is below 1".
const prob = (p) => (p == null ? "?" : p.toFixed(p > 0.99 ? 4 : 2));

function refineText(info) {
  if (!$("refine").checked) return "";
  const from = info.refined_from, t = info.timings_ms || {};
  const confidence = Number($("confidence").value);
  if (!from) return `Not refined: the first token's probability ${prob(info.first_token_prob)} is at least ${confidence}.`;
  return `Refined from m = ${from.m} to m = ${info.m}: the attempt at m = ${from.m} (first token probability ` +
    `${prob(from.first_token_prob)}, below ${confidence}) cost ${ms((from.timings_ms || {}).ttft)} and was dropped; ` +
    `growing to m = ${info.m} computed only the new queries (${ms(t.mqt)}) and prefilled ` +
    `${info.prefilled} positions (${ms(t.prefill)}). The answer above is the refined one.`;
}

function addHistory(result, info, timings, cached) {
  const row = document.createElement("tr");
  const cells = [info.m, result.question, result.text.trim(), ms(timings.ttft), cached,
    info.refined_from ? `from m = ${info.refined_from.m}` : "no"];
  for (const value of cells) {
    const cell = document.createElement("td");
    cell.textContent = value ?? "–";
    row.append(cell);
  }
  const body = $("history").tBodies[0];
  body.prepend(row);
  while (body.rows.length > 12) body.deleteRow(-1);
}

// -- wiring -------------------------------------------------------------------------------------------------

function wire() {
  $("key").value = sessionStorage.getItem("mqt-edge-key") || "";
  $("key").addEventListener("change", () => { sessionStorage.setItem("mqt-edge-key", $("key").value.trim()); connect(); });
  $("tab-camera").addEventListener("click", () => useSource("camera"));
  $("tab-image").addEventListener("click", () => useSource("image"));
  $("file").addEventListener("change", (e) => e.target.files[0] && readUpload(e.target.files[0]));
  $("freeze").addEventListener("change", () => { if (!$("freeze").checked) state.held = null; });
  $("m-slider").addEventListener("input", (e) => { $("m").value = state.stops[Number(e.target.value)]; });
  $("m").addEventListener("change", (e) => {
    const m = Math.min(Math.max(1, Math.round(Number(e.target.value)) || 1), Number(e.target.max));
    setM(m);
  });
  $("form").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("go").disabled = true;
}

wire();
useSource("camera");
connect();
