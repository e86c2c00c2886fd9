// The gateway's HTTP API, with the signed-in key. The key lives in sessionStorage: this tab only, gone when it closes.
import { t } from "./i18n.js";

const KEY = "baton.key";

// Signing out aborts every request still under way with the key, so none of them lands after (or sends a second
// request without the key and gets a 401): a page left mid-refresh stops there.
let signedIn = new AbortController();

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
  me: null,
  end() {
    signedIn.abort(new DOMException("signed out", "AbortError"));
    signedIn = new AbortController();
    this.key = null;
    this.me = null;
  },
};

// A request cut off by signing out is not an error, wherever its promise ends up.
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason?.name === "AbortError") event.preventDefault();
});

export class ApiError extends Error {
  constructor(status, body) {
    super(plainWords(status, body));
    this.status = status;
    this.body = body;
  }
}

// baton's errors are {error, reason}; the OpenAI routes' are {error: {message}}: either way, a sentence for people.
function plainWords(status, body) {
  const detail = typeof body?.error === "string" ? body.error : body?.error?.message || body?.detail;
  if (status === 401) return t("error.key");
  if (status === 0) return t("error.offline");
  const text = typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : "";
  return text || t("error.status", { status });
}

export async function request(method, path, { json, form, signal, key, headers: extra = {} } = {}) {
  if (key === undefined) {  // the session's key: the request ends with the session
    if (!session.key) throw new DOMException("signed out", "AbortError");
    signal = signal ? AbortSignal.any([signal, signedIn.signal]) : signedIn.signal;
  }
  const headers = { ...extra, Authorization: `Bearer ${key ?? session.key}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, null);
  }
  if (response.status === 401 && key === undefined) window.dispatchEvent(new Event("baton:unauthenticated"));
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return response;
}

export const api = {
  get: async (path, opts) => (await request("GET", path, opts)).json(),
  post: async (path, json, opts) => (await request("POST", path, { ...opts, json })).json(),
  del: async (path) => (await request("DELETE", path)).json(),
};

// Server-Sent Events over fetch (EventSource cannot send the Authorization header): calls onEvent({event, data, id}).
export async function readEvents(response, onEvent) {
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
      const event = { event: "message", data: "", id: null };
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = line.slice(0, colon), text = line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data += (event.data ? "\n" : "") + text;
        else if (field === "event" || field === "id") event[field] = text;
      }
      if (event.data) onEvent(event);
    }
  }
}

// Small DOM helpers shared by the pages.
export const $ = (selector) => document.querySelector(selector);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "on") for (const [type, fn] of Object.entries(value)) node.addEventListener(type, fn);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

export function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function seconds(s) {
  if (s === undefined || s === null || s < 0) return "—";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// Runs fn every period_ms while the page is shown; returns a stop function.
export function every(period_ms, fn) {
  let timer = null, stopped = false;
  const tick = async () => {
    if (stopped) return;
    try { await fn(); } catch (error) { if (error.status !== 401 && error.name !== "AbortError") console.warn(error.message); }
    if (!stopped) timer = setTimeout(tick, period_ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
