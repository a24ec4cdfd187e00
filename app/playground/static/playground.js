// The tokenlean playground: runs one request per chosen compression level through the public /v1
// API (with `return_token_map`) and draws each level's answer, cost, tokens per layer and token map.
"use strict";

const LEVELS = ["none", "low", "medium", "high"];
const KEY_STORE = "tokenlean-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: {}, // task -> GET /v1/models entry
  task: null,
  image: null, // data: URL of the chosen image
  imageEl: null, // the decoded image, drawn under the token maps
  layers: null, // the model's layers, from a response's tokens.per_layer
  layer: null, // null: the last (after the last layer)
  running: false,
};

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, body) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const options = { headers };
  if (body !== undefined) {
    options.method = "POST";
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, `the server cannot be reached (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch (err) {
    data = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, errorMessage(response, data, text));
  }
  return data;
}

function errorMessage(response, data, text) {
  const error = data && data.error;
  const message = (error && (error.message || error)) || (data && data.detail) || text;
  return `${response.status} ${response.statusText}: ${typeof message === "string" ? message : JSON.stringify(message)}`;
}

function showMessage(text, info = false) {
  const box = $("message");
  box.textContent = text;
  box.className = info ? "info" : "";
  box.hidden = !text;
}

function handleError(err) {
  if (err.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    showMessage(`This server requires an API key: enter it above. (${err.message})`);
  } else {
    showMessage(err.message);
  }
}

// ------------------------------------------------------------------ the models and the controls

async function loadModels() {
  try {
    const data = await api("/v1/models");
    state.models = Object.fromEntries(data.models.map((m) => [m.task, m]));
  } catch (err) {
    handleError(err);
    if (err.status === 503) setTimeout(loadModels, 2000); // still loading
    return;
  }
  $("key-form").hidden = !state.key;
  showMessage("");
  buildTasks();
}

function buildTasks() {
  const box = $("tasks");
  box.querySelectorAll("label").forEach((l) => l.remove());
  const names = { vqa: "Question (VQA)", retrieval: "Rank texts", classify: "Classify" };
  for (const task of ["vqa", "retrieval", "classify"]) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "task";
    input.value = task;
    input.disabled = !state.models[task];
    input.addEventListener("change", () => chooseTask(task));
    label.append(input, ` ${names[task]}`);
    if (!state.models[task]) label.title = "not served by this server";
    box.append(label);
  }
  const first = ["vqa", "retrieval", "classify"].find((t) => state.models[t]);
  if (first) {
    box.querySelector(`input[value="${first}"]`).checked = true;
    chooseTask(first);
  } else {
    showMessage("This server serves none of the playground's tasks.");
  }
}

function chooseTask(task) {
  state.task = task;
  state.layers = null;
  state.layer = null;
  const model = state.models[task];
  $("question-field").hidden = task !== "vqa";
  $("texts-field").hidden = task !== "retrieval";
  const method = $("method");
  method.replaceChildren();
  for (const name of model.methods) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === model.default_method ? `${name} (default)` : name;
    option.selected = name === model.default_method;
    method.append(option);
  }
  const layer = $("layer");
  layer.disabled = true;
  $("layer-value").textContent = "last";
  $("results").replaceChildren();
  $("legend").hidden = true;
  updateRun();
}

function updateRun() {
  $("run").disabled = state.running || !state.task || !state.image;
}

function chooseFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showMessage(`${file.name} is not an image`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      state.image = reader.result;
      state.imageEl = img;
      $("preview").src = reader.result;
      $("preview").hidden = false;
      $("drop-hint").hidden = true;
      showMessage("");
      updateRun();
    };
    img.onerror = () => showMessage(`${file.name} cannot be read as an image`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// ------------------------------------------------------------------ running the levels

function requests() {
  const chosen = [...document.querySelectorAll('input[name="level"]:checked')].map((i) => i.value);
  const levels = LEVELS.filter((l) => chosen.includes(l));
  if ($("use-target").checked) levels.push(Number($("target").value));
  return levels;
}

function body(compression) {
  const model = state.models[state.task];
  const out = { image: state.image, compression, return_token_map: true };
  if ($("method").value !== model.default_method) out.method = $("method").value;
  if (state.layer !== null) out.token_map_layer = state.layer;
  if (state.task === "vqa") out.question = $("question").value;
  if (state.task === "retrieval") {
    out.texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  }
  return out;
}

async function run() {
  const levels = requests();
  if (!levels.length) {
    showMessage("Choose at least one level.");
    return;
  }
  state.running = true;
  updateRun();
  showMessage("");
  const results = $("results");
  results.replaceChildren();
  let failed = 0;
  // One level after the other: each request's latency is its own, not the queue of the others.
  for (const compression of levels) {
    const card = newCard(compression);
    results.append(card);
    const started = performance.now();
    try {
      const response = await api(`/v1/${state.task}`, body(compression));
      fillCard(card, response, performance.now() - started);
    } catch (err) {
      failed += 1;
      failCard(card, err);
      handleError(err);
      if (err.status === 401) break;
    }
  }
  $("legend").hidden = failed === levels.length;
  state.running = false;
  updateRun();
}

function newCard(compression) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.level = String(compression);
  const title = document.createElement("h2");
  title.textContent = typeof compression === "number" ? `${compression.toFixed(2)} FLOPs` : compression;
  const note = document.createElement("p");
  note.className = "plan";
  note.textContent = "running…";
  card.append(title, note);
  return card;
}

function failCard(card, err) {
  card.classList.add("failed");
  card.querySelector(".plan").textContent = "failed";
  const p = document.createElement("p");
  p.className = "error";
  p.textContent = err.message;
  card.append(p);
}

function fillCard(card, r, roundTripMs) {
  const c = r.compression;
  card.querySelector(".plan").textContent = `${c.method} · level ${c.level}`;
  card.append(...answerParts(r));

  const tokens = r.tokens;
  const perLayer = tokens.image_per_layer || tokens.compressed_per_layer || tokens.per_layer;
  const stats = document.createElement("dl");
  stats.className = "stats";
  const rows = [
    ["latency", `${roundTripMs.toFixed(0)} ms (server ${r.timings.total_ms.toFixed(0)}, model ${r.timings.inference_ms.toFixed(0)})`],
    ["FLOPs saved", `${(100 * r.flops.saved).toFixed(1)} %`],
    ["tokens kept", `${(100 * tokens.kept_ratio).toFixed(1)} %`],
  ];
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    stats.append(dt, dd);
  }
  card.append(stats);

  const map = r.token_map;
  if (state.layers === null) setLayers(tokens.per_layer.length - 1);
  card.append(chart(perLayer, map ? map.layer : perLayer.length - 1, tokens));
  if (map) {
    const canvas = document.createElement("canvas");
    canvas.className = "token-map";
    card.append(canvas, mapCaption(map, tokens));
    drawMap(canvas, state.imageEl, map);
  }
}

function answerParts(r) {
  const parts = [];
  const best = document.createElement("p");
  best.className = "answer";
  const list = document.createElement("ul");
  list.className = "scores";
  let items;
  if (r.ranking) {
    best.textContent = r.ranking[0].text ?? `#${r.ranking[0].index}`;
    items = r.ranking.map((x) => [x.text ?? `#${x.index}`, x.probability]);
  } else {
    best.textContent = r.answer ?? r.label;
    items = (r.answers || r.labels).map((x) => [x.label, x.score]);
  }
  for (const [label, score] of items) {
    const li = document.createElement("li");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    const name = document.createElement("em");
    name.textContent = label;
    bar.append(fill, name);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = score.toFixed(3);
    li.append(bar, value);
    list.append(li);
  }
  parts.push(best, list);
  return parts;
}

// ------------------------------------------------------------------ the layer slider

function setLayers(layers) {
  state.layers = layers;
  const slider = $("layer");
  slider.max = String(layers);
  slider.value = String(state.layer ?? layers);
  slider.disabled = false;
}

function layerChanged() {
  const value = Number($("layer").value);
  state.layer = value === state.layers ? null : value;
  $("layer-value").textContent = state.layer === null ? "last" : String(value);
}

// ------------------------------------------------------------------ drawing

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// Tokens entering each layer (image tokens where the model has text too), the mapped layer dark.
function chart(counts, mapped, tokens) {
  const width = 240, height = 80, top = 12, bottom = 14;
  const box = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  const what = tokens.image_per_layer ? "image tokens" : tokens.compressed_per_layer ? "compressed tokens" : "tokens";
  const title = svg("title", {});
  title.textContent = `${what} entering each layer: ${counts.join(", ")}`;
  box.append(title);
  const most = Math.max(...counts, 1);
  const step = width / counts.length;
  counts.forEach((n, i) => {
    const h = ((height - top - bottom) * n) / most;
    box.append(svg("rect", {
      x: i * step + 1, y: height - bottom - h, width: Math.max(step - 2, 1), height: h,
      fill: i === mapped ? "#2f6fdb" : "#b9c9e6",
    }));
  });
  const label = svg("text", { x: 0, y: 9 });
  label.textContent = `${what} per layer: ${counts[0]} → ${counts[counts.length - 1]}`;
  const axis = svg("text", { x: 0, y: height - 3 });
  axis.textContent = `layer 0 … ${counts.length - 1} (map at ${mapped})`;
  box.append(label, axis);
  return box;
}

function mapCaption(map, tokens) {
  const groups = new Map();
  let pruned = 0;
  for (const t of map.token_of_patch) {
    if (t < 0) pruned += 1;
    else groups.set(t, (groups.get(t) || 0) + 1);
  }
  const merged = [...groups.values()].filter((n) => n > 1).length;
  const p = document.createElement("p");
  p.className = "map-caption";
  const [rows, cols] = map.grid;
  const what = tokens.compressed_per_layer ? "compressed tokens" : "tokens";
  p.textContent = `layer ${map.layer}: ${count(map.tokens, what)} over ${rows}×${cols} patches; ` +
    `${count(merged, "merged groups")}, ${count(pruned, "patches")} pruned`;
  return p;
}

function count(n, plural) {
  return `${n} ${n === 1 ? plural.replace(/(es|s)$/, "") : plural}`; // tokens, groups, patches
}

function hue(token) {
  return (token * 137.508) % 360; // the golden angle: neighbouring tokens get distant hues
}

// The image (resized to a square, as the server does) under its token map: a merged group's
// patches in one colour, pruned patches greyed, outlines between different tokens.
function drawMap(canvas, img, map) {
  const [rows, cols] = map.grid;
  const cell = Math.max(4, Math.floor(256 / Math.max(rows, cols)));
  canvas.width = cols * cell;
  canvas.height = rows * cell;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const patches = map.token_of_patch;
  const size = new Map();
  for (const t of patches) size.set(t, (size.get(t) || 0) + 1);
  patches.forEach((t, p) => {
    const x = (p % cols) * cell, y = Math.floor(p / cols) * cell;
    if (t < 0) {
      ctx.fillStyle = "rgba(45, 45, 45, 0.82)";
      ctx.fillRect(x, y, cell, cell);
    } else if (size.get(t) > 1) {
      ctx.fillStyle = `hsla(${hue(t)}, 85%, 50%, 0.55)`;
      ctx.fillRect(x, y, cell, cell);
    }
  });
  ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  patches.forEach((t, p) => {
    const r = Math.floor(p / cols), c = p % cols;
    if (c + 1 < cols && patches[p + 1] !== t) {
      ctx.moveTo((c + 1) * cell, r * cell);
      ctx.lineTo((c + 1) * cell, (r + 1) * cell);
    }
    if (r + 1 < rows && patches[p + cols] !== t) {
      ctx.moveTo(c * cell, (r + 1) * cell);
      ctx.lineTo((c + 1) * cell, (r + 1) * cell);
    }
  });
  ctx.stroke();
  canvas.dataset.tokens = String(map.tokens);
  canvas.dataset.drawn = "true";
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  $("run").addEventListener("click", run);
  $("target").addEventListener("input", () => {
    $("target-value").textContent = Number($("target").value).toFixed(2);
  });
  $("layer").addEventListener("input", layerChanged);
  $("layer").addEventListener("change", () => {
    if (state.image && !state.running) run();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    loadModels();
  });
}

wire();
loadModels();
