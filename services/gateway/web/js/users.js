// Users and keys (the admin key only): create users, issue keys (the secret is shown once), revoke keys, delete users.
import { $, api, el, fill } from "./api.js";
import { t } from "./i18n.js";

export function setup() {
  $("#user-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("#user-name").value.trim(), tenant = $("#user-tenant").value.trim();
    await guard(async () => {
      await api.post("/v1/users", tenant ? { name, tenant } : { name });
      await issue(name);
      $("#user-name").value = $("#user-tenant").value = "";
    });
  });
}

export function enter() { return guard(refresh); }
export function leave() {}

async function guard(fn) {
  $("#user-error").textContent = "";
  try { await fn(); } catch (error) { if (error.name !== "AbortError") $("#user-error").textContent = error.message; }
}

async function issue(name) {
  const key = await api.post(`/v1/users/${encodeURIComponent(name)}/keys`, { label: "web" });
  $("#user-secret").textContent = t("users.secret", { name, key: key.key });
  await refresh();
}

async function refresh() {
  const { users } = await api.get("/v1/users?limit=1000");
  const rows = await Promise.all(users.map(async (user) => {
    const { keys } = await api.get(`/v1/users/${encodeURIComponent(user.name)}/keys`);
    const keyList = el("ul", { class: "keys" }, ...keys.map((key) => el("li", {},
      `${key.prefix}… ${key.label || ""} `,
      !key.active ? el("span", { class: "muted" }, t("users.revoked")) : el("button", {
        type: "button", "aria-label": t("users.revokeKey", { prefix: key.prefix }),
        on: { click: () => guard(async () => { await api.del(`/v1/users/${encodeURIComponent(user.name)}/keys/${key.id}`); await refresh(); }) },
      }, t("users.revoke")))));
    return el("tr", {}, el("td", {}, user.name), el("td", {}, user.tenant), el("td", {}, keyList),
      el("td", {},
        el("button", { type: "button", on: { click: () => guard(() => issue(user.name)) } }, t("users.issue", { name: user.name })), " ",
        el("button", { type: "button", on: { click: () => guard(async () => { await api.del(`/v1/users/${encodeURIComponent(user.name)}`); await refresh(); }) } }, t("users.remove", { name: user.name }))));
  }));
  fill($("#user-table tbody"), rows);
}
