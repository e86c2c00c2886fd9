// GPU: who holds the lease now, who waits and when each is expected to be done, and who held it over the last hour.
import { $, api, bytes, el, every, fill, seconds } from "./api.js";
import { t } from "./i18n.js";
import { timeline } from "./plot.js";

const KINDS = ["serving", "training", "embedding_bulk"];
let stop = null;

export function setup() {}

export function enter() {
  stop?.();
  stop = every(2000, refresh);
}

export function leave() {
  stop?.();
  stop = null;
}

async function refresh() {
  const [state, history] = await Promise.all([api.get("/v1/gpu"), api.get("/v1/gpu/history?window_s=3600")]);
  $("#gpu-summary").textContent = t("gpu.summary", {
    used: bytes(state.used_bytes), capacity: bytes(state.capacity_bytes), source: state.capacity_source,
    policy: state.policy.gpu_policy,
  });
  const holders = state.holders.map((h) => el("tr", { "data-kind": h.kind },
    el("td", {}, h.kind), el("td", {}, h.holder_id), el("td", { class: "num" }, seconds(h.held_s)),
    el("td", { class: "num" }, seconds(h.eta_s)), el("td", { class: "num" }, bytes(h.vram_bytes))));
  fill($("#gpu-holders tbody"), holders.length ? holders : [el("tr", {}, el("td", { colspan: 5 }, t("gpu.free")))]);
  const queue = state.queue.map((w) => el("tr", {},
    el("td", {}, String(w.position)), el("td", {}, w.kind), el("td", {}, w.holder_id),
    el("td", { class: "num" }, seconds(w.waited_s)), el("td", { class: "num" }, seconds(w.eta_s))));
  fill($("#gpu-queue tbody"), queue.length ? queue : [el("tr", {}, el("td", { colspan: 5 }, t("gpu.nobody")))]);
  const now = history.now_unix_s;
  const intervals = history.intervals.map((iv) => ({
    kind: iv.kind, label: `${iv.holder_id} (${iv.end ?? "held"})`,
    start: now - iv.granted_unix_s, end: iv.ended_unix_s ? Math.max(0, now - iv.ended_unix_s) : 0,
  }));
  timeline($("#gpu-timeline"), KINDS, intervals, history.window_s, {
    now: t("gpu.now"), ago: (n) => t("gpu.minago", { n }),
  });
}
