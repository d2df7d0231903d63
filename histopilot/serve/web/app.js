// The page: pick a slide, view it, chat about it, run an analysis and export its report.
// Everything goes through the same HTTP API other clients use; nothing here needs a build.

import { DeepZoomViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const state = { slide: null, thread: null, analysis: null, token: sessionStorage.getItem("histopilot-token") };

// -- API --------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("token-button").hidden = false;
    throw new Error("This server needs a token: use Sign in.");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();

// Server-sent events from a fetch response (EventSource cannot send a bearer token).
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event.event = line.slice(7);
        else if (line.startsWith("data: ")) event.data += line.slice(6);
      }
      if (event.data) yield event;
    }
  }
}

// -- viewer -----------------------------------------------------------------------------------
const viewer = new DeepZoomViewer($("canvas"), async (url) => {
  const response = await api(url);
  return createImageBitmap(await response.blob());
});
window.histopilot = { viewer, state };

viewer.onChange((view) => {
  $("viewer-status").textContent = state.slide
    ? `${state.slide.name} · centre ${Math.round(view.x)}, ${Math.round(view.y)} · ${(view.scale * 100).toPrecision(3)} %`
    : "";
});
$("zoom-in").onclick = () => viewer.zoomBy(1.5);
$("zoom-out").onclick = () => viewer.zoomBy(1 / 1.5);
$("zoom-home").onclick = () => viewer.home();
for (const name of ["tissue", "heatmap", "regions"]) {
  $(`show-${name}`).onchange = async (event) => {
    viewer.show[name] = event.target.checked;
    if (name === "heatmap" && event.target.checked && !viewer.overlays.heatmap) await loadHeatmap();
    viewer.draw();
  };
}

async function loadHeatmap() {
  const slide = state.slide;
  $("viewer-status").textContent = "computing the importance map…";
  try {
    const importance = await json(`/v1/slides/${slide.id}/importance`);
    if (state.slide === slide) await viewer.setHeatmap(importance);
  } catch (error) {
    $("viewer-status").textContent = `importance map: ${error.message}`;
  }
}

async function openSlide(slide) {
  state.slide = slide;
  state.thread = null;
  state.analysis = null;
  $("messages").replaceChildren();
  $("progress").replaceChildren();
  $("report").textContent = "";
  $("exports").hidden = true;
  location.hash = `slide=${encodeURIComponent(slide.id)}`;
  const base = `/v1/slides/${slide.id}`;
  const descriptor = await (await api(`${base}/dzi`)).text();
  if (state.slide !== slide) return; // another slide was picked meanwhile
  viewer.open(base, descriptor);
  json(`${base}/tissue`).then((tissue) => state.slide === slide && viewer.setTissue(tissue)).catch(() => {});
  if (viewer.show.heatmap) loadHeatmap();
}

async function loadSlides(selectId) {
  const { data } = await json("/v1/slides");
  const select = $("slide-select");
  select.replaceChildren(...data.map((slide) => new Option(slide.name, slide.id)));
  const wanted = selectId || new URLSearchParams(location.hash.slice(1)).get("slide");
  const slide = data.find((s) => s.id === wanted || s.name === wanted) || data[0];
  if (slide) {
    select.value = slide.id;
    await openSlide(slide);
  }
  select.onchange = () => openSlide(data.find((s) => s.id === select.value));
}

$("upload").onchange = async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  $("viewer-status").textContent = `uploading ${file.name}…`;
  try {
    const slide = await json("/v1/slides", { method: "POST", body: form });
    await loadSlides(slide.id);
  } catch (error) {
    $("viewer-status").textContent = `upload failed: ${error.message}`;
  }
};

// -- chat -------------------------------------------------------------------------------------
function addMessage(role, text = "") {
  const item = document.createElement("li");
  item.className = role;
  const steps = document.createElement("div");
  steps.className = "steps";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(steps, body);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, steps, body };
}

// Replace region ids in the answer with buttons that move the viewer there.
function linkCitations(body, citations) {
  if (!citations.length) return;
  const byId = new Map(citations.map((c) => [c.region_id, c]));
  const escaped = [...byId.keys()].sort((a, b) => b.length - a.length).map((id) => id.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const pattern = new RegExp(`(?<![\\w.])(${escaped.join("|")})(?!\\w)`, "g");
  const text = body.textContent;
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    parts.push(document.createTextNode(text.slice(last, match.index)));
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cite";
    button.dataset.region = match[1];
    button.textContent = match[1];
    button.onclick = () => goToRegion(byId.get(match[1]));
    parts.push(button);
    last = match.index + match[0].length;
  }
  parts.push(document.createTextNode(text.slice(last)));
  body.replaceChildren(...parts);
}

function goToRegion(citation) {
  viewer.setRegions([citation]);
  viewer.flyTo(citation, { highlight: citation.region_id });
}

async function refreshThreadRegions() {
  if (!state.thread) return;
  try {
    const history = await json(`/v1/threads/${state.thread}`);
    viewer.setRegions(history.regions);
  } catch (_) { /* the answer is shown either way */ }
}

$("chat-form").onsubmit = async (event) => {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || !state.slide) return;
  input.value = "";
  $("send").disabled = true;
  addMessage("user", text);
  const answer = addMessage("assistant");
  const metadata = { slide: state.slide.id };
  if (state.thread) metadata.thread_id = state.thread;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: "histopilot", stream: true, metadata,
        messages: [{ role: "user", content: text }] }),
    });
    for await (const { data } of serverEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const extra = chunk.histopilot || {};
      if (extra.event === "thread" && state.slide?.id === extra.slide) state.thread = extra.thread_id;
      if (extra.event === "progress") answer.steps.textContent = extra.text;
      if (extra.event === "citations") {
        answer.steps.textContent = "";
        linkCitations(answer.body, extra.citations);
      }
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) answer.body.append(document.createTextNode(delta));
      answer.item.scrollIntoView({ block: "end" });
    }
    answer.item.dataset.done = "true";
    await refreshThreadRegions();
  } catch (error) {
    answer.item.className = "error";
    answer.body.textContent = error.message;
  } finally {
    $("send").disabled = false;
  }
};

$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

// -- analysis and report ---------------------------------------------------------------------
$("analyse").onclick = async () => {
  if (!state.slide) return;
  const slide = state.slide;
  $("analyse").disabled = true;
  $("progress").replaceChildren();
  $("exports").hidden = true;
  $("report").textContent = "";
  try {
    const started = await json("/v1/analyses", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ slide: slide.id }),
    });
    state.analysis = started.id;
    let final = null;
    for await (const event of serverEvents(await api(`/v1/analyses/${started.id}/events`))) {
      if (event.event === "progress") {
        const item = document.createElement("li");
        item.textContent = JSON.parse(event.data);
        $("progress").append(item);
        item.scrollIntoView({ block: "end" });
      } else if (event.event === "status") {
        final = JSON.parse(event.data);
      }
    }
    if (!final || final.status !== "done") throw new Error(final?.error || "the analysis did not finish");
    const report = await (await api(`/v1/analyses/${started.id}/report?format=md`)).text();
    if (state.slide !== slide) return;
    $("report").textContent = report;
    $("exports").hidden = false;
    const regions = await json(`/v1/analyses/${started.id}/regions`);
    viewer.setRegions(regions.features.map((feature) => {
      const [[x0, y0], , [x1, y1]] = feature.geometry.coordinates[0];
      return { region_id: feature.id, x: x0, y: y0, width: x1 - x0, height: y1 - y0,
        magnification: feature.properties.classification.name.split(" ")[0] };
    }));
  } catch (error) {
    $("report").textContent = `Analysis failed: ${error.message}`;
  } finally {
    $("analyse").disabled = false;
  }
};

for (const button of $("exports").querySelectorAll("button")) {
  button.onclick = async () => {
    const format = button.dataset.format;
    try {
      const response = await api(`/v1/analyses/${state.analysis}/report?format=${format}`);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = `${state.analysis}-report.${format === "fhir" ? "fhir.json" : format}`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    } catch (error) {
      $("viewer-status").textContent = `export failed: ${error.message}`;
    }
  };
}

// -- tabs and sign-in -------------------------------------------------------------------------
for (const [tab, panel] of [["tab-chat", "panel-chat"], ["tab-report", "panel-report"]]) {
  $(tab).onclick = () => {
    for (const [other, otherPanel] of [["tab-chat", "panel-chat"], ["tab-report", "panel-report"]]) {
      $(other).setAttribute("aria-selected", String(other === tab));
      $(otherPanel).hidden = otherPanel !== panel;
    }
  };
}

$("token-button").onclick = () => {
  const token = prompt("Bearer token for this server");
  if (!token) return;
  state.token = token;
  sessionStorage.setItem("histopilot-token", token);
  $("token-button").hidden = true;
  loadSlides().catch(showStartupError);
};

function showStartupError(error) {
  $("viewer-status").textContent = error.message;
}

loadSlides().catch(showStartupError);
