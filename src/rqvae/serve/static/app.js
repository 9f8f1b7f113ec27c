// rqvae serve: the page's logic (vanilla JS, no libraries).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, item: null, polling: 0 };

async function api(path, options) {
  const res = await fetch(path, options);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, attrs || {});
  for (const c of children) e.append(c);
  return e;
}

// ---------------------------------------------------------------------------------------- set-up
async function init() {
  const info = await api("/api/info");
  state.info = info;
  const v = info.vae;
  let text = `RQ-VAE ${v.image_size}×${v.image_size}, codes ${v.code_shape.join("×")}, K ${v.codebook_size}`;
  if (info.ar) text += ` · RQ-Transformer (${info.ar.cond_type})`;
  $("models").textContent = text;
  $("n").max = info.max_images;
  if (!info.ar) return;
  $("generate").hidden = false;
  $("class-row").hidden = info.ar.cond_type !== "class";
  $("prompt-row").hidden = info.ar.cond_type !== "text";
  $("cfg-row").hidden = !info.ar.has_null_cond;
  $("class").append(el("option", { value: "", textContent: "all classes" }));
  info.ar.classes.forEach((name, i) => {
    const label = name === String(i) ? name : `${i}: ${name}`;
    $("class").append(el("option", { value: String(i), textContent: label }));
  });
  $("n").value = Math.min(16, info.max_images);
}

// -------------------------------------------------------------------------------------- generate
function settings() {
  const num = (id) => $(id).value === "" ? null : Number($(id).value);
  const s = { n: num("n"), seed: num("seed"), temperature: num("temperature"), top_k: num("top_k"),
              top_p: num("top_p") };
  const ar = state.info.ar;
  if (ar.has_null_cond) s.cfg_scale = num("cfg_scale");
  if (ar.cond_type === "class" && $("class").value !== "") s.class_id = Number($("class").value);
  if (ar.cond_type === "text") s.prompt = $("prompt").value;
  return s;
}

function thumb(id) {
  const img = el("img", { src: `/api/items/${id}/image.png`, alt: "generated image", title: "inspect" });
  img.addEventListener("click", () => inspect(id));
  const links = el("span", {},
    el("a", { href: `/api/items/${id}/image.png`, download: `image-${id}.png`, textContent: "PNG" }), " ",
    el("a", { href: `/api/items/${id}/codes.safetensors`, download: `codes-${id}.safetensors`,
              textContent: "codes" }));
  return el("figure", { className: "thumb", id: `item-${id}` }, img, el("figcaption", {}, links));
}

async function generate(event) {
  event.preventDefault();
  $("gen-error").textContent = "";
  $("gen-button").disabled = true;
  try {
    const job = await api("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(settings()) });
    $("grid").replaceChildren();
    await poll(job.job);
  } catch (e) {
    $("gen-error").textContent = e.message;
  } finally {
    $("gen-button").disabled = false;
  }
}

async function poll(jobId) {
  let shown = 0;
  for (;;) {
    const s = await api(`/api/jobs/${jobId}`);
    $("progress").max = s.total;
    $("progress").value = s.done;
    $("gen-status").textContent = `${s.done} / ${s.total} images`;
    for (; shown < s.items.length; shown++) $("grid").append(thumb(s.items[shown]));
    if (s.state === "error") throw new Error(s.error);
    if (s.state === "done") {
      if (!state.item && s.items.length) inspect(s.items[0]);
      return;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

// ---------------------------------------------------------------------------------------- upload
async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  $("upload-error").textContent = "";
  const mb = state.info.max_upload_mb;
  if (file.size > mb * 1024 * 1024) {
    $("upload-error").textContent = `${file.name} is larger than ${mb} MB, the limit of this server`;
    return;
  }
  try {
    const item = await api(`/api/upload?name=${encodeURIComponent(file.name)}`,
                           { method: "POST", body: file });
    show(item);
  } catch (e) {
    $("upload-error").textContent = e.message;
  }
}

// ---------------------------------------------------------------------------------- coarse to fine
async function inspect(id) {
  show(await api(`/api/items/${id}`));
}

function show(item) {
  state.item = item;
  $("inspect").hidden = false;
  $("item-label").textContent = item.label;
  $("original-fig").hidden = item.kind !== "upload";
  if (item.kind === "upload") $("original").src = `/api/items/${item.id}/original.png`;
  $("depth").max = item.depth;
  $("depth").value = item.depth;
  const head = el("tr", {}, el("th", { textContent: "depth" }));
  const change = el("tr", {}, el("th", { textContent: "mean change" }));
  const psnr = el("tr", {}, el("th", { textContent: "PSNR (dB)" }));
  item.change.forEach((c, i) => {
    head.append(el("td", { textContent: String(i + 1) }));
    change.append(el("td", { textContent: c.toFixed(4) }));
    if (item.psnr) psnr.append(el("td", { textContent: item.psnr[i].toFixed(2) }));
  });
  $("per-depth").replaceChildren(head, change, ...(item.psnr ? [psnr] : []));
  $("dl-codes").href = `/api/items/${item.id}/codes.safetensors`;
  $("dl-codes").download = `codes-${item.id}.safetensors`;
  setDepth();
}

function setDepth() {
  const item = state.item;
  const d = Number($("depth").value);
  const D = item.depth;
  $("depth-value").textContent = `${d} / ${D}`;
  $("recon").src = `/api/items/${item.id}/image.png?depth=${d}`;
  $("heat").src = `/api/items/${item.id}/heat.png?depth=${d}`;
  let caption = `from the first ${d} of ${D} codes`;
  if (item.psnr) caption += ` · PSNR ${item.psnr[d - 1].toFixed(2)} dB`;
  $("recon-caption").textContent = caption;
  $("heat-caption").textContent = d === 1 ? "|x₁ − x₀| (x₀: no codes)" : `|x${sub(d)} − x${sub(d - 1)}|`;
  $("dl-png").href = $("recon").src;
  $("dl-png").download = `image-${item.id}-depth${d}.png`;
  $("codes").textContent = item.codes.map((row) => row.map((c) => String(c[d - 1]).padStart(4)).join(""))
    .join("\n");
}

function sub(n) {
  return String(n).split("").map((c) => "₀₁₂₃₄₅₆₇₈₉"[Number(c)]).join("");
}

$("gen-form").addEventListener("submit", generate);
$("upload").addEventListener("change", upload);
$("depth").addEventListener("input", setDepth);
init().catch((e) => { $("models").textContent = `could not load the models' info: ${e.message}`; });
