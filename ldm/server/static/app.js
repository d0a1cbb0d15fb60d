// The page at /: AUTOMATIC1111's API from a browser (same origin, so basic auth, if any, is the browser's).
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "txt2img";
let running = false;

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(describeError(response.status, data));
  return data;
}

function describeError(status, data) {
  const detail = data && data.detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  return `${status}: ${detail || "request failed"}`;
}

function fillSelect(select, items, chosen) {
  select.replaceChildren(...items.map(([value, label]) => {
    const option = new Option(label, value);
    option.selected = value === chosen;
    return option;
  }));
}

async function loadChoices() {
  const [samplers, schedulers, models, options] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/options"),
  ]);
  fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
}

async function switchModel() {
  $("error").textContent = "";
  try {
    await api("/sdapi/v1/options", {sd_model_checkpoint: $("model").value});
  } catch (error) {
    $("error").textContent = error.message;
  }
}

function numberOf(id) { return Number($(id).value); }

function payload(taskId) {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    width: numberOf("width"), height: numberOf("height"), steps: numberOf("steps"), cfg_scale: numberOf("cfg_scale"),
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value, seed: numberOf("seed"),
    n_iter: numberOf("n_iter"), force_task_id: taskId,
  };
  if (mode === "img2img") {
    if (!$("image_canvas").width) throw new Error("choose an image to start from");
    body.init_images = [$("image_canvas").toDataURL("image/png")];
    body.denoising_strength = numberOf("denoising_strength");
    if ($("use_mask").checked) {
      body.mask = maskDataURL();
      body.mask_blur = numberOf("mask_blur");
      body.inpaint_full_res = $("only_masked").checked;
    }
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  $("error").textContent = "";
  const taskId = `task(${Math.random().toString(36).slice(2)})`;
  let body;
  try { body = payload(taskId); } catch (error) { $("error").textContent = error.message; return; }
  setRunning(true);
  const watcher = watchProgress(taskId);
  try {
    const result = await api(`/sdapi/v1/${mode}`, body);
    showResults(result);
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    watcher.stop();
    setRunning(false);
  }
}

function setRunning(on) {
  running = on;
  $("generate").disabled = on;
  $("interrupt").disabled = !on;
  $("progress-box").hidden = !on;
  if (on) { $("progress").value = 0; $("progress-text").textContent = "starting"; $("preview").removeAttribute("src"); }
}

function watchProgress(taskId) {
  let stopped = false;
  let previewId = -1;
  async function poll() {
    if (stopped) return;
    try {
      const p = await api("/internal/progress", {id_task: taskId, id_live_preview: previewId, live_preview: true});
      if (stopped) return;
      if (p.queued) {
        $("progress-text").textContent = p.textinfo || "waiting in the queue";
      } else if (p.active) {
        $("progress").value = p.progress || 0;
        const eta = p.eta ? `, about ${p.eta.toFixed(1)} s left` : "";
        $("progress-text").textContent = `${Math.round(100 * (p.progress || 0))}%${eta}`;
      }
      if (p.live_preview) { $("preview").src = p.live_preview; }
      if (p.id_live_preview !== null && p.id_live_preview !== undefined) previewId = p.id_live_preview;
    } catch (error) { /* the generation request reports errors */ }
    setTimeout(poll, 300);
  }
  poll();
  return {stop() { stopped = true; }};
}

function showResults(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((image, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${image}`;
    img.alt = info.infotexts[i] || "generated image";
    const caption = document.createElement("figcaption");
    caption.textContent = info.infotexts[i] || "";
    figure.append(img, caption);
    $("gallery").prepend(figure);
  });
}

// ---------------------------------------------------------------- img2img: the image and the mask canvas

function chooseMode(event) {
  mode = event.target.dataset.mode;
  document.querySelectorAll(".tab").forEach((tab) => tab.classList.toggle("active", tab === event.target));
  $("image-inputs").hidden = mode !== "img2img";
}

function loadInitImage() {
  const file = $("init_image").files[0];
  if (!file) return;
  const img = new Image();
  img.onload = () => {
    for (const id of ["image_canvas", "mask_canvas"]) {
      $(id).width = img.naturalWidth;
      $(id).height = img.naturalHeight;
    }
    $("image_canvas").getContext("2d").drawImage(img, 0, 0);
    $("width").value = img.naturalWidth - (img.naturalWidth % 8);
    $("height").value = img.naturalHeight - (img.naturalHeight % 8);
    URL.revokeObjectURL(img.src);
  };
  img.src = URL.createObjectURL(file);
}

function paint(event) {
  if (!(event.buttons & 1) || !$("use_mask").checked) return;
  const canvas = $("mask_canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.beginPath();
  context.arc(x, y, numberOf("brush") * canvas.width / box.width / 2, 0, 2 * Math.PI);
  context.fill();
}

function maskDataURL() {
  // white where painted (redraw), black elsewhere: the mask AUTOMATIC1111 takes
  const source = $("mask_canvas");
  const mask = document.createElement("canvas");
  mask.width = source.width;
  mask.height = source.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
  context.drawImage(source, 0, 0);
  return mask.toDataURL("image/png");
}

function clearMask() {
  const canvas = $("mask_canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));
$("model").addEventListener("change", switchModel);
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", chooseMode));
$("init_image").addEventListener("change", loadInitImage);
$("mask_canvas").addEventListener("pointerdown", paint);
$("mask_canvas").addEventListener("pointermove", paint);
$("clear_mask").addEventListener("click", clearMask);
loadChoices().catch((error) => { $("error").textContent = error.message; });
