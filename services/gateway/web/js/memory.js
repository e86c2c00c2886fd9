// Memory: upload files and folders (drag and drop or pickers), see them ingested, list and delete documents, and
// search with the hybrid hits' scores.
import { $, api, bytes, el, fill, request } from "./api.js";
import { t } from "./i18n.js";

const SUPPORTED = /\.(txt|md|markdown|html?|pdf|docx)$/i;
const BATCH_FILES = 8; // one request per batch: progress moves, and one bad file does not hold the others back

export function setup() {
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const entries = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
    upload(entries.length ? (await Promise.all(entries.map(filesOf))).flat() : [...event.dataTransfer.files]);
  });
  for (const id of ["#upload-files", "#upload-folder"]) {
    $(id).addEventListener("change", (event) => { upload([...event.target.files]); event.target.value = ""; });
  }
  $("#search-form").addEventListener("submit", (event) => { event.preventDefault(); search(); });
}

export function enter() { return refresh(); }
export function leave() {}

// A dropped folder arrives as a directory entry: read it (in pages, as the API gives them) down to its files.
async function filesOf(entry) {
  if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
  const reader = entry.createReader();
  const found = [];
  for (;;) {
    const page = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!page.length) return found;
    for (const child of page) found.push(...(await filesOf(child)));
  }
}

async function upload(files) {
  const wanted = files.filter((file) => SUPPORTED.test(file.name));
  const status = $("#upload-status"), progress = $("#upload-progress");
  const skipped = files.length - wanted.length;
  const totals = { added: 0, unchanged: 0, failed: 0 };
  progress.hidden = false;
  progress.max = wanted.length || 1;
  progress.value = 0;
  for (let start = 0; start < wanted.length; start += BATCH_FILES) {
    status.textContent = t("memory.uploading", { done: start, total: wanted.length });
    const form = new FormData();
    form.append("collection", $("#upload-collection").value.trim() || "default");
    for (const file of wanted.slice(start, start + BATCH_FILES)) form.append("files", file, file.name);
    try {
      const report = await (await request("POST", "/v1/documents", { form })).json();
      for (const outcome of report.documents || []) count(totals, outcome.status);
    } catch (error) {
      totals.failed += Math.min(BATCH_FILES, wanted.length - start);
      status.textContent = error.message;
    }
    progress.value = Math.min(start + BATCH_FILES, wanted.length);
  }
  const parts = [t("memory.done", totals)];
  if (skipped) parts.push(t("memory.skipped", { count: skipped }));
  status.textContent = parts.join(" ");
  progress.hidden = true;
  await refresh();
}

function count(totals, status) {
  if (status === "failed") totals.failed += 1;
  else if (status === "unchanged" || status === "duplicate") totals.unchanged += 1;
  else totals.added += 1;
}

async function refresh() {
  const { documents, total } = await api.get("/v1/documents?limit=1000");
  $("#doc-count").textContent = `(${total})`;
  fill($("#doc-table tbody"), documents.map((doc) => el("tr", {},
    el("td", {}, doc.title || doc.source), el("td", {}, doc.collection), el("td", { class: "num" }, String(doc.chunks)),
    el("td", { class: "num" }, bytes(doc.size_bytes)),
    el("td", {}, el("button", {
      type: "button", "aria-label": t("memory.delete", { title: doc.title || doc.source }),
      on: { click: async () => { await api.del(`/v1/documents/${encodeURIComponent(doc.id)}`); await refresh(); } },
    }, t("common.delete"))))));
  const collections = [...new Set(["default", ...documents.map((doc) => doc.collection)])];
  $("#collections").replaceChildren(...collections.map((name) => el("option", { value: name })));
}

async function search() {
  const query = $("#search-query").value.trim();
  if (!query) return;
  const table = $("#search-hits");
  const { hits } = await api.post("/v1/search", { query, k: 10, mode: $("#search-mode").value });
  const score = (x) => (typeof x === "number" ? x.toFixed(3) : "—");
  fill(table.tBodies[0], hits.length ? hits.map((hit) => el("tr", {},
    el("td", {}, String(hit.rank)), el("td", {}, [hit.title, hit.heading].filter(Boolean).join(" · ")),
    el("td", { class: "passage" }, hit.text.length > 240 ? `${hit.text.slice(0, 240)}…` : hit.text),
    el("td", { class: "num" }, score(hit.score)), el("td", { class: "num" }, score(hit.vector_score)),
    el("td", { class: "num" }, score(hit.bm25_score)))) : [el("tr", {}, el("td", { colspan: 6 }, t("memory.nohits")))]);
  table.hidden = false;
}
