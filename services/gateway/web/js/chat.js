// Chat: streamed answers (SSE) from a model or adapter, from memory or not, with numbered sources that open beside
// the answer. Conversations are kept in this browser (localStorage, per tenant); the server keeps none.
import { $, ApiError, api, el, readEvents, request, session } from "./api.js";
import { t } from "./i18n.js";

const MARKER = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
let conversations = [];
let active = null; // the conversation shown
let controller = null; // the answer being streamed, to stop it

const storageKey = () => `baton.chats.${session.me?.tenant}`;
const save = (key = storageKey()) => localStorage.setItem(key, JSON.stringify(conversations.slice(0, 50)));

export function setup() {
  $("#chat-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  $("#chat-stop").addEventListener("click", () => controller?.abort());
  $("#chat-new").addEventListener("click", () => { newConversation(); render(); $("#chat-input").focus(); });
  $("#chat-history").addEventListener("change", (event) => {
    active = conversations.find((c) => c.id === event.target.value) ?? active;
    render();
  });
  $("#chat-source-close").addEventListener("click", () => { $("#chat-source").hidden = true; });
}

export async function enter() {
  conversations = JSON.parse(localStorage.getItem(storageKey()) || "[]");
  active = conversations[0] ?? null;
  if (!active) newConversation();
  render();
  try {
    const models = await api.get("/v1/models");
    const select = $("#chat-model");
    const chosen = select.value;
    select.replaceChildren(...models.data.map((m) => el("option", { value: m.id }, m.baton?.kind === "adapter" ? `${m.id} (v${m.baton.version})` : m.id)));
    if (models.data.some((m) => m.id === chosen)) select.value = chosen;
  } catch (error) {
    if (error.name !== "AbortError") $("#chat-error").textContent = error.message;
  }
}

export function leave() {}

function newConversation() {
  active = { id: crypto.randomUUID(), title: "", messages: [] };
  conversations.unshift(active);
}

function render() {
  $("#chat-history").replaceChildren(
    ...conversations.map((c) => el("option", { value: c.id }, c.title || t("chat.untitled"))),
  );
  $("#chat-history").value = active.id;
  $("#chat-log").replaceChildren(...active.messages.map(messageNode));
}

function messageNode(message) {
  const node = el("div", { class: `msg ${message.role}` });
  fillMessage(node, message);
  return node;
}

// The answer's text with its [n] markers as buttons, then every source as a numbered button.
function fillMessage(node, message) {
  const text = el("div", { class: "text" });
  const citations = message.citations || [];
  let last = 0;
  for (const match of message.content.matchAll(MARKER)) {
    text.append(message.content.slice(last, match.index));
    for (const n of match[1].split(",").map(Number)) text.append(citationButton(citations[n - 1], n));
    last = match.index + match[0].length;
  }
  text.append(message.content.slice(last));
  if (message.stopped) text.append(" ", el("span", { class: "muted" }, t("chat.stopped")));
  node.replaceChildren(text);
  if (citations.length) {
    const list = el("div", { class: "sources" }, `${t("chat.sources")}: `);
    citations.forEach((c, i) => list.append(citationButton(c, i + 1, true)));
    node.append(list);
  }
}

function citationButton(citation, n, long = false) {
  if (!citation) return `[${n}]`;
  const where = [citation.title, citation.heading].filter(Boolean).join(" · ");
  return el("button", {
    type: "button", class: `cite${citation.cited ? " cited" : ""}`, "aria-label": `[${n}] ${where}`,
    on: { click: () => openSource(citation, n) },
  }, long ? `[${n}] ${citation.title || citation.source}` : `[${n}]`);
}

function openSource(citation, n) {
  $("#chat-source-title").textContent = `[${n}] ${citation.title || citation.source}`;
  const where = [citation.heading, citation.page ? t("chat.page", { page: citation.page }) : "", citation.collection];
  $("#chat-source-where").textContent = where.filter(Boolean).join(" · ");
  $("#chat-source-text").textContent = citation.snippet;
  $("#chat-source").hidden = false;
  $("#chat-source-close").focus();
}

async function send() {
  const question = $("#chat-input").value.trim();
  if (!question || controller) return;
  $("#chat-error").textContent = "";
  $("#chat-input").value = "";
  const history = active.messages.map(({ role, content }) => ({ role, content }));
  active.messages.push({ role: "user", content: question });
  active.title ||= question.slice(0, 60);
  const answer = { role: "assistant", content: "", citations: [] };
  active.messages.push(answer);
  const tenantKey = storageKey(); // signing out mid-answer stops it; it is still saved to this tenant's chats
  render();
  const node = $("#chat-log").lastElementChild;
  const text = node.querySelector(".text");
  controller = new AbortController();
  setBusy(true);
  try {
    const collection = $("#chat-collection").value.trim();
    const body = {
      model: $("#chat-model").value, stream: true, messages: [...history, { role: "user", content: question }],
      baton: { rag: $("#chat-rag").checked, ...(collection ? { collection } : {}) },
    };
    const response = await request("POST", "/v1/chat/completions", { json: body, signal: controller.signal });
    await readEvents(response, ({ data }) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) { answer.content += delta; text.append(delta); } // appended at once: no re-render per token
      if (chunk.baton) answer.citations = chunk.baton.citations || [];
    });
  } catch (error) {
    if (error.name === "AbortError") answer.stopped = true;
    else $("#chat-error").textContent = error.message;
  } finally {
    controller = null;
    setBusy(false);
    save(tenantKey);
    render();
  }
}

function setBusy(busy) {
  $("#chat-send").disabled = busy;
  $("#chat-stop").disabled = !busy;
  if (!busy) $("#chat-input").focus();
}
