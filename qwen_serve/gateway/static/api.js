// The gateway's HTTP API as the page uses it: the model list, chat completions and the Responses API
// (streamed as server-sent events or whole), the readiness probe and the OpenAI-shaped errors. No DOM
// access here.

/** An error answer of the gateway: its HTTP status, the message of its {"error": {...}} body and the
 * Retry-After delay in seconds (null when absent). */
export class GatewayError extends Error {
  constructor(status, message, retryAfter = null, code = null) {
    super(message);
    this.name = "GatewayError";
    this.status = status;
    this.retryAfter = retryAfter;
    this.code = code;
  }
}

/** An error event inside a stream that had started (e.g. the engine failed mid-answer). */
export class StreamError extends Error {
  constructor(message, code = null) {
    super(message);
    this.name = "StreamError";
    this.code = code;
  }
}

/** The Authorization header for `key` (none when the key is empty: a gateway without auth). */
function authHeaders(key) {
  return key ? { authorization: "Bearer " + key } : {};
}

/** Seconds to wait from a Retry-After value (delta-seconds or an HTTP date); null when unusable. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return parseInt(text, 10);
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

/** A GatewayError from a non-2xx response, with the message of its OpenAI-shaped body when it has one. */
export async function errorFromResponse(resp) {
  let message = `HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
  let code = null;
  try {
    const body = await resp.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      code = body.error.code ?? null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new GatewayError(resp.status, message, parseRetryAfter(resp.headers.get("retry-after")), code);
}

/** The ids of the models `key` may use (GET /v1/models); throws GatewayError or a network TypeError. */
export async function listModels(key, signal) {
  const resp = await fetch("/v1/models", { headers: authHeaders(key), cache: "no-store", signal });
  if (!resp.ok) throw await errorFromResponse(resp);
  const body = await resp.json();
  return (Array.isArray(body.data) ? body.data : []).map((m) => String(m.id));
}

/** The route of each API the page can use. */
export const API_PATHS = { chat: "/v1/chat/completions", responses: "/v1/responses" };

/** POST /v1/chat/completions (or, with api "responses", /v1/responses); resolves to the response once its
 * headers are in (throws GatewayError). */
export async function postChat(key, body, signal, api = "chat") {
  const resp = await fetch(API_PATHS[api] || API_PATHS.chat, {
    method: "POST",
    headers: { ...authHeaders(key), "content-type": "application/json" },
    body: JSON.stringify(body),
    cache: "no-store",
    signal,
  });
  if (!resp.ok) throw await errorFromResponse(resp);
  return resp;
}

/** Whether `resp` is a server-sent event stream (else it is one JSON answer). */
export function isEventStream(resp) {
  return (resp.headers.get("content-type") || "").startsWith("text/event-stream");
}

/** The parsed JSON objects of the `data:` events of an SSE body, up to "[DONE]" or the end. */
export async function* readEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n/g, "\n");
      let cut = buffer.indexOf("\n\n");
      while (cut >= 0) {
        const data = eventData(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (data === "[DONE]") return;
        if (data !== null) yield JSON.parse(data);
        cut = buffer.indexOf("\n\n");
      }
      if (done) {
        const data = eventData(buffer);
        if (data !== null && data !== "[DONE]") yield JSON.parse(data);
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a reader left early (error event, exception) closes the body
  }
}

/** The data of one SSE event block (its `data:` lines joined), or null when it has none. */
function eventData(block) {
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}

/** Whether the gateway says it is ready (GET /ready answers 200). Network errors count as not ready. */
export async function isReady(signal) {
  try {
    const resp = await fetch("/ready", { cache: "no-store", signal });
    return resp.ok;
  } catch (err) {
    if (err.name === "AbortError") throw err;
    return false;
  }
}
