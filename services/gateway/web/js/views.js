// Views: train an adapter on a collection (the planner's estimate first), follow its loss live from the job's event
// stream, cancel it; the adapter registry with versions and perplexity before/after.
import { $, api, bytes, el, fill, readEvents, request, seconds } from "./api.js";
import { t } from "./i18n.js";
import { linePlot } from "./plot.js";

let follow = null; // {id, controller, loss: [[step, loss]], evalLoss: [[step, loss]]}
let estimateTimer = null;
const num = (value) => Number(value ?? 0); // protobuf's JSON writes 64-bit integers as strings

export function setup() {
  $("#train-form").addEventListener("submit", (event) => { event.preventDefault(); start(); });
  $("#train-estimate").addEventListener("click", estimate);
  $("#train-form").addEventListener("input", () => {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(estimate, 800);
  });
  $("#job-cancel").addEventListener("click", async () => {
    if (follow) await api.del(`/v1/training/jobs/${follow.id}`).catch((e) => { $("#train-error").textContent = e.message; });
  });
}

export async function enter() {
  const jobs = await refresh();
  const running = jobs.find((job) => !job.terminal);
  if (follow) draw();
  else if (running) watch(running.id);
  estimate();
}

export function leave() {
  clearTimeout(estimateTimer);
}

function spec(validateOnly) {
  const collection = $("#train-collection").value.trim();
  return {
    name: $("#train-name").value.trim(), collections: collection ? [collection] : [],
    max_steps: num($("#train-steps").value), rank: num($("#train-rank").value),
    learning_rate: num($("#train-lr").value), seq_len: num($("#train-seq").value),
    quantization: $("#train-qlora").checked ? "nf4" : "none", validate_only: validateOnly,
  };
}

async function estimate() {
  if (!$("#train-form").checkValidity()) return;
  try {
    const job = await api.post("/v1/training/jobs", spec(true));
    const e = job.estimate || {}, d = job.dataset || {};
    $("#train-estimate-text").textContent = t("views.estimated", {
      vram: bytes(num(e.vram_bytes)), ram: bytes(num(e.ram_bytes)), disk: bytes(num(e.disk_bytes)),
      time: seconds(e.duration_s || -1), docs: num(d.documents), tokens: num(d.train_tokens),
    });
    $("#train-error").textContent = "";
  } catch (error) {
    $("#train-estimate-text").textContent = "";
    $("#train-error").textContent = error.message;
  }
}

async function start() {
  $("#train-error").textContent = "";
  try {
    const job = await api.post("/v1/training/jobs", spec(false));
    watch(job.id);
    await refresh();
  } catch (error) {
    $("#train-error").textContent = error.message;
  }
}

// Stored events are replayed after seq 1 (the submission), so the plot has every step even when opened late.
async function watch(id) {
  follow?.controller.abort();
  follow = { id, controller: new AbortController(), loss: [], evalLoss: [], job: await api.get(`/v1/training/jobs/${id}`) };
  const mine = follow;
  draw();
  try {
    const response = await request("GET", `/v1/training/jobs/${id}/events`, { signal: mine.controller.signal, headers: { "Last-Event-ID": "1" } });
    await readEvents(response, ({ event, data }) => onEvent(mine, event, JSON.parse(data)));
  } catch (error) {
    if (error.name !== "AbortError") $("#train-error").textContent = error.message;
  }
  if (follow === mine) { mine.job = await api.get(`/v1/training/jobs/${id}`); draw(); await refresh(); }
}

function onEvent(mine, type, event) {
  const p = event.progress || {};
  if (type === "step" && p.loss !== undefined) mine.loss.push([p.step, p.loss]);
  if (type === "eval" && p.eval_loss !== undefined) mine.evalLoss.push([p.step || 0, p.eval_loss]);
  if (type === "error") { $("#train-error").textContent = event.error; return; }
  mine.job = { ...mine.job, state: event.state || mine.job.state, progress: { ...mine.job.progress, ...p } };
  if (event.adapter) {
    mine.job.adapter = event.adapter;
    // The base model's eval loss, measured before the first step, starts the eval curve at step 0.
    const before = event.adapter.eval_loss_before;
    if (before !== undefined && !mine.evalLoss.some(([step]) => step === 0)) mine.evalLoss.unshift([0, before]);
  }
  if (follow === mine) draw();
}

function draw() {
  const job = follow.job, p = job.progress || {};
  $("#job-card").hidden = false;
  $("#job-id").textContent = follow.id;
  $("#job-state").textContent = job.state;
  $("#job-cancel").disabled = job.terminal || ["succeeded", "failed", "cancelled"].includes(job.state);
  $("#job-progress").textContent = t("views.progress", {
    step: p.step ?? 0, total: p.total_steps ?? "?", loss: p.loss?.toFixed(3) ?? "—",
    rate: Math.round(p.tokens_per_s ?? 0), eta: seconds(p.eta_s),
  });
  linePlot($("#loss-plot"), [
    { label: t("views.loss"), className: "loss", points: follow.loss },
    { label: t("views.evalloss"), className: "eval", points: follow.evalLoss },
  ]);
  const a = job.adapter;
  $("#job-result").textContent = a
    ? t("views.result", { name: a.name, version: a.version, before: fmt(a.eval_perplexity_before), after: fmt(a.eval_perplexity_after) })
    : job.error?.message || "";
}

const fmt = (x) => (typeof x === "number" ? x.toFixed(2) : "—");

async function refresh() {
  const [{ jobs }, { adapters }] = await Promise.all([api.get("/v1/training/jobs?page_size=10"), api.get("/v1/adapters")]);
  fill($("#job-table tbody"), jobs.map((job) => el("tr", {},
    el("td", {}, job.id), el("td", {}, job.spec?.name ?? ""), el("td", {}, job.state),
    el("td", { class: "num" }, `${job.progress?.step ?? 0}/${job.progress?.total_steps ?? "?"}`),
    el("td", {}, el("button", { type: "button", "aria-label": t("views.follow", { id: job.id }), on: { click: () => watch(job.id) } }, "↗")))));
  fill($("#adapter-table tbody"), adapters.map((a) => el("tr", {},
    el("td", {}, a.name), el("td", { class: "num" }, `v${a.version}`), el("td", { class: "num" }, String(a.steps ?? "")),
    el("td", { class: "num" }, `${fmt(a.eval_perplexity_before)} → ${fmt(a.eval_perplexity_after)}`),
    el("td", {}, a.served === null ? "?" : t(a.served ? "views.yes" : "views.no")))));
  return jobs;
}
