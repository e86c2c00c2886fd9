// The page's shell: sign-in, the page switcher (by URL hash), the language switch. Each page is its own module with
// setup() (once, wires its controls) and enter()/leave() (start and stop its polling while it is shown).
import { $, api, ApiError, session } from "./api.js";
import { lang, setLang, t, translate } from "./i18n.js";
import * as chat from "./chat.js";
import * as memory from "./memory.js";
import * as views from "./views.js";
import * as gpu from "./gpu.js";
import * as users from "./users.js";

const PAGES = { chat, memory, views, gpu, users };
const USER_PAGES = ["chat", "memory", "views", "gpu"];
let current = null;

function allowed() {
  if (!session.me) return ["signin"];
  return session.me.admin ? ["users"] : USER_PAGES;
}

function show(name) {
  const pages = allowed();
  if (!pages.includes(name)) name = pages[0];
  if (current === name) return;
  PAGES[current]?.leave?.();
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${name}`;
  for (const link of document.querySelectorAll("#nav a")) {
    link.hidden = !pages.includes(link.dataset.page);
    link.toggleAttribute("aria-current", link.dataset.page === name);
  }
  current = name;
  PAGES[name]?.enter?.();
}

async function signIn(key) {
  const me = await api.get("/v1/me", { key });
  session.key = key;
  session.me = me;
  $("#whoami").textContent = me.admin ? t("signin.admin") : t("signin.as", { user: me.user, tenant: me.tenant });
  $("#nav").hidden = false;
  $("#sign-out").hidden = false;
  show(location.hash.slice(1));
}

function signOut() {
  PAGES[current]?.leave?.();
  session.end();
  current = null;
  $("#whoami").textContent = "";
  $("#nav").hidden = true;
  $("#sign-out").hidden = true;
  $("#signin-key").value = "";
  show("signin");
  $("#signin-key").focus();
}

function setup() {
  translate();
  $("#lang").value = lang;
  $("#lang").addEventListener("change", (event) => {
    setLang(event.target.value);
    if (session.me) $("#whoami").textContent = session.me.admin ? t("signin.admin") : t("signin.as", session.me);
    PAGES[current]?.enter?.(); // redraw what the page built in JavaScript
  });
  for (const page of Object.values(PAGES)) page.setup();
  $("#signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#signin-error").textContent = "";
    try {
      await signIn($("#signin-key").value.trim());
    } catch (error) {
      $("#signin-error").textContent = error instanceof ApiError ? error.message : String(error);
    }
  });
  $("#sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  // A key expired or revoked while signed in: back to the sign-in page with the reason.
  window.addEventListener("baton:unauthenticated", () => {
    signOut();
    $("#signin-error").textContent = t("error.key");
  });
  show("signin");
  if (session.key) signIn(session.key).catch(() => signOut());
}

setup();
