// The transcript's DOM: one <article> per message, built with DOM APIs and textContent only.
import { renderMarkdown } from "./markdown.js";

const WHO = { user: "You", assistant: "Assistant", error: "Error", notice: "Notice" };

/** A new element with an optional class and text. */
export function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

/** Whether the transcript is scrolled to (nearly) its end: then new text keeps it there. */
function atEnd(log) {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
}

/** Run `change` on the transcript, keeping it scrolled to the end when it was. */
export function updating(log, change) {
  const follow = atEnd(log);
  change();
  if (follow) log.scrollTop = log.scrollHeight;
}

/** Append a message of `role` (user | assistant | error | notice); returns its parts. */
export function addMessage(log, role) {
  const article = el("article", "msg " + role);
  const body = el("div", "body");
  const meta = el("div", "meta");
  article.append(el("div", "who", WHO[role] || role), body, meta);
  updating(log, () => {
    log.querySelector(".empty")?.remove();
    log.appendChild(article);
  });
  return { article, body, meta };
}

const THUMB_PX = 64; // the longer side of a thumbnail, in CSS pixels

/** A thumbnail of `source` (an ImageBitmap or a canvas of `width` x `height`) named `label` for assistive
 * technology. Drawn on a canvas, not an <img>: no blob: or data: URL is loaded, so the page's
 * Content-Security-Policy (default-src 'self') needs no exception for images. */
export function thumbnail(source, width, height, label) {
  const scale = THUMB_PX / Math.max(width, height, 1); // small images are scaled up too
  const w = Math.max(1, Math.round(width * scale));
  const h = Math.max(1, Math.round(height * scale));
  const ratio = Math.min(window.devicePixelRatio || 1, 3);
  const canvas = el("canvas", "thumb");
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  canvas.setAttribute("role", "img"); // shown at most THUMB_PX wide and high by the style sheet
  canvas.setAttribute("aria-label", label);
  canvas.getContext("2d").drawImage(source, 0, 0, canvas.width, canvas.height);
  return canvas;
}

/** The user's message, shown as typed (line breaks kept, no Markdown), after the thumbnails of its
 * images (`images`: [{name, canvas}], the canvases of the composer's thumbnails, copied). */
export function addUserMessage(log, text, images = []) {
  const view = addMessage(log, "user");
  if (images.length) {
    const row = el("div", "thumbs");
    for (const image of images) {
      const { canvas } = image;
      row.appendChild(thumbnail(canvas, canvas.width, canvas.height, image.name));
    }
    view.body.appendChild(row);
  }
  if (text) view.body.appendChild(el("p", "plain", text));
  return view;
}

/** An error (or notice) message with `text`; returns its parts (the body's first <p> holds the text). */
export function addNotice(log, text, role = "error") {
  const view = addMessage(log, role);
  view.body.appendChild(el("p", "", text));
  return view;
}

/** Replace the transcript's messages with the empty-chat hint. */
export function clearTranscript(log) {
  log.replaceChildren(el("p", "empty", "New chat. Send a message to start."));
}

/** Draw an answer into `body`: Markdown text, or JSON (pretty-printed once it parses), then tool calls.
 * `answer` is {text, json, toolCalls: [{id, type, function: {name, arguments}}], done}. */
export function renderAnswer(body, answer) {
  const parts = [];
  if (answer.json) {
    if (answer.text || !answer.toolCalls.length) parts.push(jsonBlock(answer.text, answer.done));
  } else if (answer.text) {
    parts.push(renderMarkdown(answer.text));
  } else if (!answer.done && !answer.toolCalls.length) {
    parts.push(el("p", "typing", "…"));
  }
  if (answer.toolCalls.length) parts.push(toolCallsBlock(answer.toolCalls));
  body.replaceChildren(...parts);
}

/** The JSON of an answer in JSON mode: pretty-printed when complete and parseable, else as it came. */
function jsonBlock(text, done) {
  const pre = el("pre", "json");
  const code = el("code", "");
  code.textContent = done ? prettyJson(text) ?? text : text;
  pre.appendChild(code);
  return pre;
}

/** `text` re-indented by two spaces when it parses as JSON, else null. */
export function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return null;
  }
}

/** Tool calls as JSON: their name and arguments (parsed when the arguments are complete JSON). */
function toolCallsBlock(calls) {
  const box = el("div", "tool-calls");
  for (const call of calls) {
    if (!call) continue;
    box.appendChild(el("div", "tool-label", "Tool call: " + (call.function.name || "(unnamed)")));
    let args = call.function.arguments;
    try {
      args = JSON.parse(args);
    } catch {
      // still streaming, or not JSON: shown as the string it is
    }
    const pre = el("pre", "json");
    pre.appendChild(el("code", "", JSON.stringify({ id: call.id || undefined, name: call.function.name, arguments: args }, null, 2)));
    box.appendChild(pre);
  }
  return box;
}

const VERDICT_CLASS = { valid: "ok", invalid: "bad", truncated: "warn", incomplete: "warn", unverified: "warn", unchecked: "info" };

/** The guided-output badge of a JSON answer: the gateway's verdict ("JSON: valid" ...), or, without
 * one, whether the text parses. */
export function verdictBadge(verdict, text) {
  let label = verdict;
  if (!label) label = prettyJson(text) === null ? "does not parse" : "parses";
  const cls = VERDICT_CLASS[label] || (label === "parses" ? "ok" : "bad");
  const badge = el("span", "badge " + cls, "JSON: " + label);
  badge.dataset.verdict = label;
  badge.title = verdict ? "the gateway's check of the answer against the schema" : "checked in the page only";
  return badge;
}

/** The answer's figures: time to first token, tokens and tokens/s (over the whole request). */
export function statsText({ firstMs, totalMs, tokens }) {
  const parts = [];
  if (firstMs !== null) parts.push(`first token ${formatMs(firstMs)}`);
  if (tokens !== null) {
    parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
    if (totalMs > 0) parts.push(`${(tokens / (totalMs / 1000)).toFixed(1)} tokens/s`);
  }
  return parts.join(" · ");
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** Fill the answer's meta line: stats, then labels (e.g. "stopped"), then the badge if any. */
export function setMeta(meta, stats, labels, badge) {
  const parts = [];
  if (stats) parts.push(el("span", "stats", stats));
  for (const label of labels) parts.push(el("span", "label", label));
  if (badge) parts.push(badge);
  meta.replaceChildren(...parts);
}
