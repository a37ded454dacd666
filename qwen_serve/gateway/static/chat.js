// The chat page: wires the controls to the gateway's API.
//
// The API key lives in the "API key" input and is read from it for each request: it is never logged,
// never put in a URL, a cookie or localStorage. Only when "Remember in this tab" is checked is it kept in
// sessionStorage (this tab only, gone when the tab closes); unchecking removes it.
//
// The "API" setting picks chat completions or the Responses API; the page keeps one history of
// {role, content} turns and sends it whole to either (the Responses API without stored state: store false).
//
// "Attach image" adds images to the next message, sent inline as data: URLs: chat content parts
// {"type": "image_url", "image_url": {"url": ...}} or the Responses API's {"type": "input_image", ...}. The
// model list does not say which models accept images, so the button is always there and the gateway's
// answer decides: a text-only model's 400 names the image part, and the message and its images stay.
import { GatewayError, StreamError, isEventStream, isReady, listModels, postChat, readEvents } from "./api.js";
import {
  addMessage, addNotice, addUserMessage, clearTranscript, el, renderAnswer, setMeta, statsText, thumbnail,
  updating, verdictBadge,
} from "./view.js";

const STORAGE_KEY = "qwen-serve.api-key";
const MAX_FILE_BYTES = 256 * 1024; // the upload limit stated next to the button
// Images: the gateway's default limits (multimodal.max_images_per_request, multimodal.max_image_bytes and
// gateway.max_request_bytes); a gateway configured otherwise still answers with its own 400 or 413.
const MAX_IMAGES = 4; // counted over the whole chat: every request carries the history's images again
const MAX_IMAGE_BYTES = 10 * 1024 * 1024;
const MAX_IMAGES_ENCODED = 8 * 1024 * 1024 - 64 * 1024; // their data: URLs, with room for the text
const IMAGE_NAMES = { "image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WebP" };
const KEY_DEBOUNCE_MS = 350;
const READY_POLL_MS = 2000;
const READY_POLL_MAX = 300; // ~10 minutes of polling, then the page gives up and says so
const MAX_RETRY_AFTER_S = 3600;
const EXAMPLE_SCHEMA = {
  type: "object",
  properties: {
    title: { type: "string", maxLength: 32 },
    mood: { enum: ["happy", "neutral", "sad"] },
    score: { type: "integer", minimum: 1, maximum: 10 },
    tags: { type: "array", items: { type: "string", maxLength: 12 }, maxItems: 3 },
  },
  required: ["title", "mood", "score", "tags"],
  additionalProperties: false,
};

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"),
  remember: $("remember"),
  model: $("model"),
  newChat: $("new-chat"),
  log: $("transcript"),
  form: $("composer"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  regenerate: $("regenerate"),
  copy: $("copy"),
  file: $("file"),
  image: $("image"),
  attachments: $("attachments"),
  status: $("status"),
  api: $("api"),
  system: $("system"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  stream: $("stream"),
  jsonMode: $("json-mode"),
  schema: $("json-schema"),
};

const state = {
  history: [], // the chat's turns: {role: "user" | "assistant", content, images?: [{name, url}]}
  attachments: [], // the images of the next message: {name, size, url (data:), canvas (its thumbnail)}
  controller: null, // the AbortController of the request in flight (null when idle)
  lastAnswer: "", // the last answer's text, for Copy
  modelsSeq: 0, // the latest model-list request; older answers are ignored
  keyTimer: 0,
  readyPolling: false,
  countdownTimer: 0,
};

// -- status line ---------------------------------------------------------------------------------------

/** Show `text` in the status line (kind: "" | "error" | "busy"). */
function setStatus(text, kind = "") {
  ui.status.textContent = text;
  ui.status.className = "status" + (kind ? " " + kind : "");
}

/** The words for an error of a request: the gateway's message, or what went wrong on the way. */
function describe(err) {
  if (err instanceof GatewayError) return `${err.message} (HTTP ${err.status})`;
  if (err instanceof StreamError) return `The answer was cut short: ${err.message}`;
  if (err instanceof SyntaxError) return `The gateway sent something that is not JSON: ${err.message}`;
  return `Network error: the gateway could not be reached (${err.message || err}).`;
}

// -- API key and model list ----------------------------------------------------------------------------

function currentKey() {
  return ui.key.value.trim();
}

/** Keep the key in this tab's sessionStorage only while "Remember in this tab" is checked. */
function persistKey() {
  try {
    if (ui.remember.checked && currentKey()) sessionStorage.setItem(STORAGE_KEY, currentKey());
    else sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    // storage disabled: the key simply is not remembered
  }
}

/** Restore a remembered key (and fetch the models with it). */
function restoreKey() {
  let saved = null;
  try {
    saved = sessionStorage.getItem(STORAGE_KEY);
  } catch {
    saved = null;
  }
  if (saved) {
    ui.key.value = saved;
    ui.remember.checked = true;
    loadModels();
  }
}

/** A key was typed: remember it if asked, and fetch the model list once typing pauses. */
function onKeyInput() {
  persistKey();
  clearTimeout(state.keyTimer);
  if (currentKey()) state.keyTimer = setTimeout(loadModels, KEY_DEBOUNCE_MS);
}

/** Fill the Model list from GET /v1/models; returns {ok, error}. Keeps the chosen model when listed. */
async function loadModels() {
  clearTimeout(state.keyTimer);
  const seq = ++state.modelsSeq;
  let ids;
  try {
    ids = await listModels(currentKey());
  } catch (error) {
    if (seq === state.modelsSeq) {
      setStatus("Models: " + describe(error), "error");
      if (error instanceof GatewayError && error.status === 503) waitUntilReady();
    }
    return { ok: false, error };
  }
  if (seq !== state.modelsSeq) return { ok: ui.model.value !== "", error: null };
  const previous = ui.model.value;
  const options = ids.map((id) => new Option(id, id, false, id === previous));
  if (!options.length) options.push(new Option("no model for this key", ""));
  ui.model.replaceChildren(...options);
  setStatus(ids.length ? `${ids.length} model${ids.length === 1 ? "" : "s"} available.` : "This key may use no model.");
  return { ok: ids.length > 0, error: ids.length ? null : new Error("this key may use no model") };
}

// -- request ---------------------------------------------------------------------------------------------

/** The request options from the settings; throws an Error naming what is wrong. */
function readOptions() {
  const options = {
    api: ui.api.value === "responses" ? "responses" : "chat",
    stream: ui.stream.checked,
    json: ui.jsonMode.checked,
  };
  const temperature = ui.temperature.value.trim();
  if (temperature) {
    const t = Number(temperature);
    if (!Number.isFinite(t) || t < 0 || t > 2) throw new Error("Temperature must be a number from 0 to 2.");
    options.temperature = t;
  }
  const maxTokens = ui.maxTokens.value.trim();
  if (maxTokens) {
    const n = Number(maxTokens);
    if (!Number.isInteger(n) || n < 1) throw new Error("Max tokens must be a whole number of at least 1.");
    options.maxTokens = n;
  }
  if (options.json) {
    let schema;
    try {
      schema = JSON.parse(ui.schema.value);
    } catch (err) {
      throw new Error("The JSON schema is not valid JSON: " + err.message);
    }
    if (!schema || typeof schema !== "object" || Array.isArray(schema)) {
      throw new Error("The JSON schema must be a JSON object.");
    }
    options.schema = schema;
  }
  return options;
}

/** The name of a JSON-mode schema: its `title` when that is a valid name, else "answer". */
function schemaName(schema) {
  const title = typeof schema.title === "string" ? schema.title : "";
  return /^[A-Za-z0-9_-]{1,64}$/.test(title) ? title : "answer";
}

/** A turn as a chat message: its text, or with images a list of content parts (the images, then the text). */
function chatMessage(turn) {
  if (!turn.images?.length) return { role: turn.role, content: turn.content };
  const parts = turn.images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (turn.content) parts.push({ type: "text", text: turn.content });
  return { role: turn.role, content: parts };
}

/** A turn as a Responses API input item (input_image and input_text parts when it has images). */
function responsesItem(turn) {
  if (!turn.images?.length) return { role: turn.role, content: turn.content };
  const parts = turn.images.map((image) => ({ type: "input_image", image_url: image.url, detail: "auto" }));
  if (turn.content) parts.push({ type: "input_text", text: turn.content });
  return { role: turn.role, content: parts };
}

/** The request body for the current history: a chat completion, or a Responses API call. */
function requestBody(options) {
  const system = ui.system.value.trim();
  if (options.api === "responses") {
    const body = { model: ui.model.value, input: state.history.map(responsesItem),
                   stream: options.stream, store: false };
    if (system) body.instructions = system;
    if (options.temperature !== undefined) body.temperature = options.temperature;
    if (options.maxTokens !== undefined) body.max_output_tokens = options.maxTokens;
    if (options.json) body.text = { format: { type: "json_schema", name: schemaName(options.schema), schema: options.schema } };
    return body;
  }
  const messages = [];
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history.map(chatMessage));
  const body = { model: ui.model.value, messages, stream: options.stream };
  if (options.stream) body.stream_options = { include_usage: true };
  if (options.temperature !== undefined) body.temperature = options.temperature;
  if (options.maxTokens !== undefined) body.max_tokens = options.maxTokens;
  if (options.json) {
    body.response_format = { type: "json_schema", json_schema: { name: schemaName(options.schema), schema: options.schema } };
  }
  return body;
}

// -- answers ---------------------------------------------------------------------------------------------

/** Fold one streamed chunk into `answer`; returns whether it carried generated output. */
function applyChunk(answer, chunk) {
  let output = false;
  if (chunk.usage) answer.usage = chunk.usage;
  if (typeof chunk.guided_output === "string") answer.verdict = chunk.guided_output;
  for (const choice of chunk.choices || []) {
    if ((choice.index ?? 0) !== 0) continue;
    const delta = choice.delta || {};
    if (typeof delta.content === "string" && delta.content) {
      answer.text += delta.content;
      output = true;
    }
    for (const call of delta.tool_calls || []) {
      const slot = (answer.toolCalls[call.index ?? 0] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
      if (call.id) slot.id = call.id;
      if (call.function?.name) slot.function.name = call.function.name;
      if (call.function?.arguments) slot.function.arguments += call.function.arguments;
      output = true;
    }
    if (choice.finish_reason) answer.finish = choice.finish_reason;
  }
  return output;
}

/** The finish of a Responses API `response`: "length" when cut at max_output_tokens, else its status. */
function responseFinish(response) {
  if (response.status === "incomplete") {
    const reason = response.incomplete_details?.reason;
    return !reason || reason === "max_output_tokens" ? "length" : reason;
  }
  return response.status || null;
}

/** Fold one Responses API stream event into `answer`; returns whether it carried generated output.
 * Function calls are kept by output index: opened by response.output_item.added, their arguments grown
 * by response.function_call_arguments.delta. The final event brings usage, finish and the verdict. */
function applyEvent(answer, event) {
  switch (event.type) {
    case "response.output_text.delta":
      if (typeof event.delta === "string" && event.delta) {
        answer.text += event.delta;
        return true;
      }
      return false;
    case "response.output_item.added":
      if (event.item?.type === "function_call") {
        answer.calls[event.output_index ?? 0] = answer.toolCalls.length;
        answer.toolCalls.push({ id: event.item.call_id || "", type: "function",
                                function: { name: event.item.name || "", arguments: event.item.arguments || "" } });
      }
      return false;
    case "response.function_call_arguments.delta": {
      const slot = answer.toolCalls[answer.calls[event.output_index ?? 0]];
      if (slot && typeof event.delta === "string") slot.function.arguments += event.delta;
      return Boolean(slot);
    }
    case "response.completed":
    case "response.incomplete":
    case "response.failed":
      if (event.response) {
        answer.usage = event.response.usage || null;
        answer.finish = responseFinish(event.response);
      }
      if (typeof event.guided_output === "string") answer.verdict = event.guided_output;
      return false;
    default:
      return false;
  }
}

/** Fold a whole Responses API answer into `answer`. */
function applyWholeResponse(answer, body, resp) {
  answer.text = "";
  answer.toolCalls = [];
  for (const item of body.output || []) {
    if (item.type === "message") {
      for (const part of item.content || []) if (part.type === "output_text") answer.text += part.text || "";
    } else if (item.type === "function_call") {
      answer.toolCalls.push({ id: item.call_id || "", type: "function",
                              function: { name: item.name || "", arguments: item.arguments || "" } });
    }
  }
  answer.finish = responseFinish(body);
  answer.usage = body.usage || null;
  answer.verdict = resp.headers.get("x-guided-output");
}

/** The generated tokens of an answer's usage (chat: completion_tokens, Responses API: output_tokens). */
function usageTokens(usage) {
  if (!usage) return null;
  const n = usage.completion_tokens ?? usage.output_tokens;
  return Number.isInteger(n) ? n : null;
}

/** A stream's error event (chat's {"error": {...}}, or the Responses API's {"type": "error", ...}) as a
 * StreamError; null for any other event. */
function streamError(event) {
  if (event.error) return new StreamError(event.error.message || "unknown error", event.error.code);
  if (event.type === "error") return new StreamError(event.message || "unknown error", event.code ?? null);
  return null;
}

/** Fold a whole (non-streamed) answer into `answer`. */
function applyWhole(answer, body, resp) {
  const choice = (body.choices || [])[0] || {};
  const message = choice.message || {};
  answer.text = typeof message.content === "string" ? message.content : "";
  answer.toolCalls = (message.tool_calls || []).map((c) => ({
    id: c.id || "", type: c.type || "function",
    function: { name: c.function?.name || "", arguments: c.function?.arguments || "" },
  }));
  answer.finish = choice.finish_reason || null;
  answer.usage = body.usage || null;
  answer.verdict = resp.headers.get("x-guided-output");
}

/** Calls `draw` at most once per animation frame while text streams in; flush() draws now. */
function frameDrawer(draw) {
  let queued = false;
  return {
    schedule() {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        if (queued) {
          queued = false;
          draw();
        }
      });
    },
    flush() {
      queued = false;
      draw();
    },
  };
}

/** Ask for the next answer to the history; draws it as it streams. Returns {ok, output}: `output` says
 * whether any answer text arrived (a request that failed before that leaves no trace in the transcript). */
async function runTurn(options) {
  const view = addMessage(ui.log, "assistant");
  view.article.setAttribute("aria-busy", "true");
  const answer = { text: "", toolCalls: [], calls: {}, json: options.json, verdict: null, finish: null, usage: null,
                   done: false };
  const responses = options.api === "responses";
  const drawer = frameDrawer(() => updating(ui.log, () => renderAnswer(view.body, answer)));
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus("Waiting for the answer…", "busy");
  drawer.flush();
  const t0 = performance.now();
  let firstMs = null;
  let output = false;
  const labels = [];
  try {
    const resp = await postChat(currentKey(), requestBody(options), controller.signal, options.api);
    if (isEventStream(resp)) {
      for await (const chunk of readEvents(resp.body)) {
        const failure = streamError(chunk);
        if (failure) throw failure;
        if (responses ? applyEvent(answer, chunk) : applyChunk(answer, chunk)) {
          output = true;
          if (firstMs === null) firstMs = performance.now() - t0;
          drawer.schedule();
        }
      }
    } else {
      (responses ? applyWholeResponse : applyWhole)(answer, await resp.json(), resp);
      firstMs = performance.now() - t0;
      output = true;
    }
    if (answer.finish === "length") labels.push("cut at max tokens");
    setStatus("");
    return { ok: true, output: true };
  } catch (err) {
    if (err.name === "AbortError") {
      if (!output) view.article.remove(); // stopped before any text: as if never sent
      labels.push("stopped");
      setStatus("Stopped.");
      return { ok: true, output };
    }
    if (!output) {
      view.article.remove();
      showError(err);
      return { ok: false, output: false };
    }
    labels.push("interrupted");
    showError(err);
    return { ok: false, output: true };
  } finally {
    answer.done = true;
    drawer.flush();
    view.article.removeAttribute("aria-busy");
    if (view.article.isConnected) {
      const tokens = usageTokens(answer.usage);
      const stats = output ? statsText({ firstMs, totalMs: performance.now() - t0, tokens }) : "";
      const badge = options.json && (answer.text || answer.verdict) ? verdictBadge(answer.verdict, answer.text) : null;
      setMeta(view.meta, stats, labels, badge);
      if (output) {
        state.history.push({ role: "assistant", content: answer.text });
        state.lastAnswer = answer.text || JSON.stringify(answer.toolCalls);
      }
    }
    state.controller = null;
    setBusy(false);
  }
}

/** Show an error in the transcript, with what to do about it: a countdown for 429, a readiness wait for
 * 503, the key field for 401/403. */
function showError(err) {
  const view = addNotice(ui.log, describe(err));
  if (!(err instanceof GatewayError)) return;
  if (err.status === 401 || err.status === 403) {
    setStatus(err.status === 401 ? "Check the API key." : "This key may not do that.", "error");
  } else if (err.code === "images_not_supported") {
    setStatus("This model does not accept images: remove them to send the text alone.", "error");
  } else if (err.status === 429) {
    countdown(view.body, err.retryAfter);
  } else if (err.status === 503) {
    const note = view.body.appendChild(document.createElement("p"));
    note.className = "loading";
    note.textContent = "Model loading…";
    waitUntilReady(note);
  }
}

/** "Try again in N s", counting down once a second from Retry-After to zero. */
function countdown(container, seconds) {
  clearInterval(state.countdownTimer);
  const line = container.appendChild(document.createElement("p"));
  line.className = "countdown";
  let left = Math.min(seconds ?? 0, MAX_RETRY_AFTER_S);
  const tick = () => {
    line.textContent = left > 0 ? `Rate limited: you can send again in ${left} s.` : "You can send again now.";
    if (left <= 0) clearInterval(state.countdownTimer);
    left -= 1;
  };
  tick();
  if (left >= 0) state.countdownTimer = setInterval(tick, 1000);
}

/** Poll GET /ready while the engine loads ("Model loading…"), then say it is ready (bounded). */
async function waitUntilReady(note = null) {
  if (state.readyPolling) return;
  state.readyPolling = true;
  setStatus("Model loading…", "busy");
  try {
    for (let i = 0; i < READY_POLL_MAX; i += 1) {
      if (await isReady()) {
        if (note) note.textContent = "The model is ready: send again.";
        setStatus("The model is ready.");
        if (!ui.model.value) loadModels();
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, READY_POLL_MS));
    }
    setStatus("The model is still loading; try again later.", "error");
  } finally {
    state.readyPolling = false;
  }
}

// -- actions ---------------------------------------------------------------------------------------------

/** Enable the controls that fit: Send while idle, Stop while a request runs. */
function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.regenerate.disabled = busy || !state.history.some((t) => t.role === "user");
  ui.copy.disabled = !state.lastAnswer;
}

/** Send the typed message. On a failure before any answer the message goes back into the box. */
async function send() {
  if (state.controller) return;
  const text = ui.message.value;
  if (!text.trim() && !state.attachments.length) {
    ui.message.focus();
    return;
  }
  let options;
  try {
    options = readOptions();
  } catch (err) {
    setStatus(err.message, "error");
    return;
  }
  if (!ui.model.value) {
    const models = await loadModels();
    if (!models.ok) {
      if (models.error) showError(models.error);
      return; // the message stays in the box
    }
  }
  ui.message.value = "";
  const attached = state.attachments;
  setAttachments([]);
  const turn = { role: "user", content: text };
  if (attached.length) turn.images = attached.map(({ name, url }) => ({ name, url }));
  state.history.push(turn);
  const userView = addUserMessage(ui.log, text, attached);
  const result = await runTurn(options);
  if (!result.output) {
    state.history.pop();
    userView.article.remove();
    ui.message.value = ui.message.value ? text + "\n" + ui.message.value : text;
    setAttachments([...attached, ...state.attachments]);
    setBusy(false);
  }
}

/** Ask again for the last answer: drops it and re-sends the history up to the last user message. */
async function regenerate() {
  if (state.controller || !state.history.length) return;
  let options;
  try {
    options = readOptions();
  } catch (err) {
    setStatus(err.message, "error");
    return;
  }
  if (state.history[state.history.length - 1].role === "assistant") {
    state.history.pop();
    const answers = ui.log.querySelectorAll(".msg.assistant");
    answers[answers.length - 1]?.remove();
  }
  await runTurn(options);
}

/** Start over: stop any answer, forget the history, clear the transcript. */
function newChat() {
  state.controller?.abort();
  state.history = [];
  state.lastAnswer = "";
  clearInterval(state.countdownTimer);
  clearTranscript(ui.log);
  setStatus("");
  setBusy(false);
  ui.message.focus();
}

/** Copy the last answer to the clipboard (with a fallback for pages served over plain http). */
async function copyLast() {
  if (!state.lastAnswer) return;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(state.lastAnswer);
    } else {
      const area = document.createElement("textarea");
      area.value = state.lastAnswer;
      area.className = "offscreen";
      document.body.appendChild(area);
      area.select();
      const ok = document.execCommand("copy");
      area.remove();
      if (!ok) throw new Error("the browser refused");
    }
    setStatus("Copied the last answer.");
  } catch (err) {
    setStatus("Could not copy: " + (err.message || err), "error");
  }
}

/** Add a chosen text file (at most MAX_FILE_BYTES) to the message as a fenced block. */
async function attachFile() {
  const file = ui.file.files && ui.file.files[0];
  ui.file.value = "";
  if (!file) return;
  if (file.size > MAX_FILE_BYTES) {
    setStatus(`${file.name} is ${Math.ceil(file.size / 1024)} KB: the limit is 256 KB.`, "error");
    return;
  }
  let text;
  try {
    text = await file.text();
  } catch (err) {
    setStatus(`Could not read ${file.name}: ${err.message || err}`, "error");
    return;
  }
  if (text.includes("\u0000")) {
    setStatus(`${file.name} is not a text file.`, "error");
    return;
  }
  const longest = Math.max(2, ...Array.from(text.matchAll(/`+/g), (m) => m[0].length));
  const fence = "`".repeat(longest + 1);
  const block = `${file.name}:\n${fence}\n${text.replace(/\n$/, "")}\n${fence}\n`;
  const current = ui.message.value;
  ui.message.value = current ? current.replace(/\n*$/, "\n\n") + block : block;
  setStatus(`Added ${file.name} (${Math.ceil(file.size / 1024)} KB) to the message.`);
  ui.message.focus();
}

/** The images of the chat so far (sent again with every request) and of the next message. */
function imagesInChat() {
  const sent = state.history.flatMap((turn) => turn.images || []);
  return [...sent, ...state.attachments];
}

/** Show `attachments` as the next message's images: a thumbnail, the name and size, and a Remove button. */
function setAttachments(attachments) {
  state.attachments = attachments;
  const items = attachments.map((image) => {
    const item = el("li", "attachment");
    const remove = el("button", "remove", "Remove");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.addEventListener("click", () => {
      setAttachments(state.attachments.filter((other) => other !== image));
      setStatus(`Removed ${image.name}.`);
      (ui.attachments.querySelector("button.remove") || ui.message).focus();
    });
    item.append(image.canvas, el("span", "name", `${image.name} (${formatSize(image.size)})`), remove);
    return item;
  });
  ui.attachments.replaceChildren(...items);
  ui.attachments.hidden = !items.length;
}

/** A size in KB or MB (of 1024), rounded up: a file just over a limit never shows as the limit. */
function formatSize(bytes) {
  if (bytes < 1024 * 1024) return `${Math.max(1, Math.ceil(bytes / 1024))} KB`;
  return `${(Math.ceil(bytes / (1024 * 1024 / 10)) / 10).toFixed(1)} MB`;
}

/** The image type of `file` from its first bytes (PNG, JPEG, GIF or WebP), or null. */
async function sniffImage(file) {
  const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
  const ascii = (from, to) => String.fromCharCode(...head.subarray(from, to));
  if (head[0] === 0x89 && ascii(1, 4) === "PNG") return "image/png";
  if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return "image/jpeg";
  if (ascii(0, 6) === "GIF87a" || ascii(0, 6) === "GIF89a") return "image/gif";
  if (ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "image/webp";
  return null;
}

/** `file` as a base64 data: URL of media type `type`. */
function dataUrl(file, type) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(`data:${type};base64,` + String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(file);
  });
}

/** One chosen image as an attachment; throws an Error saying why it cannot be attached. */
async function readImage(file) {
  if (file.size > MAX_IMAGE_BYTES) {
    throw new Error(`${file.name} is ${formatSize(file.size)}: an image may be at most 10 MB.`);
  }
  const type = await sniffImage(file);
  if (!type) throw new Error(`${file.name} is not a PNG, JPEG, GIF or WebP image.`);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    throw new Error(`${file.name} could not be read as a ${IMAGE_NAMES[type]} image.`);
  }
  let canvas;
  try {
    canvas = thumbnail(bitmap, bitmap.width, bitmap.height, file.name);
  } finally {
    bitmap.close();
  }
  return { name: file.name, size: file.size, url: await dataUrl(file, type), canvas };
}

/** Add the chosen images to the next message, within the limits stated next to the button. */
async function attachImages() {
  const files = Array.from(ui.image.files || []);
  ui.image.value = "";
  const added = [];
  const refused = [];
  for (const file of files) {
    const inChat = imagesInChat();
    if (inChat.length + added.length >= MAX_IMAGES) {
      const sent = inChat.length - state.attachments.length;
      refused.push(`${file.name} not attached: at most ${MAX_IMAGES} images per chat` +
                   (sent ? ` (${sent} already sent; New chat starts over).` : "."));
      continue;
    }
    let image;
    try {
      image = await readImage(file);
    } catch (err) {
      refused.push(err.message || String(err));
      continue;
    }
    const encoded = [...inChat, ...added, image].reduce((sum, other) => sum + other.url.length, 0);
    if (encoded > MAX_IMAGES_ENCODED) {
      refused.push(`${file.name} not attached: the images would add up to ${formatSize(encoded)} as sent, ` +
                   `more than a request may carry (8 MB).`);
      continue;
    }
    added.push(image);
  }
  if (added.length) setAttachments([...state.attachments, ...added]);
  if (refused.length) {
    setStatus(refused.join(" "), "error");
  } else if (added.length) {
    setStatus(`Attached ${added.map((image) => image.name).join(", ")}.`);
  }
}

// -- wiring ----------------------------------------------------------------------------------------------

function init() {
  ui.schema.value = JSON.stringify(EXAMPLE_SCHEMA, null, 2);
  ui.key.addEventListener("input", onKeyInput);
  ui.key.addEventListener("change", () => {
    if (currentKey()) loadModels();
  });
  ui.remember.addEventListener("change", persistKey);
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault(); // Enter sends; Shift+Enter keeps the newline
      send();
    }
  });
  ui.stop.addEventListener("click", () => state.controller?.abort());
  ui.regenerate.addEventListener("click", regenerate);
  ui.newChat.addEventListener("click", newChat);
  ui.copy.addEventListener("click", copyLast);
  ui.file.addEventListener("change", attachFile);
  ui.image.addEventListener("change", attachImages);
  setBusy(false);
  restoreKey();
}

init();
