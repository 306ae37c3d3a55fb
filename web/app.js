// Console shell: sign-in, navigation (hash routes), live refresh, session expiry and sign-out.

import { api, session, setUnauthorizedHandler } from "./api.js";
import { h, field, input, formError, onSubmit, notify } from "./ui.js";
import * as pages from "./pages.js";
import { startSso, finishSso } from "./sso.js";

// [id, title, page, options]: `roles` limits who sees a page (default: owners, admins and
// auditors); `hidden` keeps it out of the menu.
const STAFF = ["owner", "admin", "auditor"];
const ROUTES = [
  ["overview", "Overview", pages.overview],
  ["devices", "My devices", pages.myDevices, { roles: ["user"] }],
  ["peers", "Peers", pages.peers],
  ["setup-keys", "Setup keys", pages.setupKeys],
  ["groups", "Groups", pages.groupsPage],
  ["policies", "Access policies", pages.policies],
  ["routes", "Routes", pages.routes],
  ["dns", "DNS", pages.dnsPage],
  ["services", "Public services", pages.services],
  ["audit", "Audit log", pages.audit],
  ["settings", "Settings", pages.settings],
  ["users", "Users & tokens", pages.users],
  ["device", "Add a device", pages.approveDevice, { roles: ["user", ...STAFF], menuRoles: ["user"] }],
  // Reached from the peers list and the network picture, not from the menu.
  ["peer", "Peer", pages.peerPage, { hidden: true, nav: "peers" }],
];
const allowed = (r, role) => ((r[3] && r[3].roles) || STAFF).includes(role);
const inMenu = (r, role) => allowed(r, role) && !(r[3] && r[3].hidden)
  && (!(r[3] && r[3].menuRoles) || r[3].menuRoles.includes(role));
const home = (role) => (role === "user" ? "devices" : "overview");
// Where a signed-out visitor was going (e.g. a device's approval link), kept across sign-in.
const AFTER = "tern.after-sign-in";
const POLL_MS = 3000;

const app = document.getElementById("app");
let pollTimer = null;
let expiryTimer = null;
let generation = 0;

function stopTimers() {
  clearInterval(pollTimer);
  clearTimeout(expiryTimer);
  pollTimer = expiryTimer = null;
}

function signedOut(message) {
  stopTimers();
  session.clear();
  renderSignIn(message);
}

setUnauthorizedHandler((err) => signedOut(`Your session has ended (${err.message}).`));

async function renderSignIn(message) {
  document.title = "Sign in · Tern";
  if (location.hash.startsWith("#/device")) sessionStorage.setItem(AFTER, location.hash);
  if (location.hash) history.replaceState(null, "", location.pathname);
  const form = h("form", { class: "signin", id: "signin-form", novalidate: true },
    h("div", { class: "brand" }, h("img", { src: "/assets/icon.svg", alt: "", width: 40, height: 40 }), h("h1", {}, "Tern")),
    h("p", { class: "muted" }, sessionStorage.getItem(AFTER)
      ? "Sign in to approve your device." : "Sign in to manage your network."),
    message ? h("p", { class: "info", role: "status" }, message) : null,
    formError(),
    field("Username", input("username", { autocomplete: "username", required: true, autofocus: true })),
    field("Password", input("password", { type: "password", autocomplete: "current-password", required: true })),
    h("button", { type: "submit", class: "primary wide" }, "Sign in"));
  onSubmit(form, async (f) => {
    const reply = await api("POST", "/api/auth/login",
      { username: f.elements.username.value, password: f.elements.password.value }, { anonymous: true });
    session.set(reply);
    start();
  });
  app.replaceChildren(h("main", { class: "signin-page", id: "main" }, form));
  form.elements.username.focus();
  try {
    const cfg = await api("GET", "/api/auth/config", undefined, { anonymous: true });
    if (cfg.oidc) {
      form.append(h("div", { class: "or" }, "or"),
        h("button", { type: "button", class: "wide", id: "sso", onclick: () => startSso(cfg.oidc).catch((e) => notify(e.message, "error")) },
          "Sign in with single sign-on"));
    }
  } catch (_) { /* password sign-in still works */ }
}

function layout(user) {
  document.body.dataset.role = user.role;
  const nav = h("nav", { "aria-label": "Main" },
    h("ul", {}, ROUTES.filter((r) => inMenu(r, user.role)).map(([id, title]) => h("li", {}, h("a", { href: `#/${id}`, dataset: { route: id } }, title)))));
  const menu = h("button", { type: "button", class: "menu icon", "aria-label": "Menu", "aria-expanded": "false" }, "☰");
  const shell = h("div", { class: "shell" },
    h("header", { class: "top" },
      menu,
      h("a", { class: "brand", href: `#/${home(user.role)}` }, h("img", { src: "/assets/icon.svg", alt: "", width: 24, height: 24 }), "Tern"),
      h("span", { class: "spacer" }),
      h("span", { class: "who", id: "who" }, user.username, " ", h("span", { class: "muted small", id: "role" }, user.role)),
      h("button", { type: "button", id: "signout", onclick: signOut }, "Sign out")),
    nav,
    h("main", { id: "main", tabindex: -1 }));
  menu.addEventListener("click", () => {
    const open = shell.classList.toggle("nav-open");
    menu.setAttribute("aria-expanded", String(open));
  });
  nav.addEventListener("click", () => { shell.classList.remove("nav-open"); menu.setAttribute("aria-expanded", "false"); });
  app.replaceChildren(shell);
  return shell;
}

async function signOut() {
  try { await api("POST", "/api/auth/logout", {}); } catch (_) { /* signing out locally anyway */ }
  signedOut("You have signed out.");
}

async function show(shell, user) {
  const id = (location.hash.match(/^#\/([\w-]+)/) || [])[1] || home(user.role);
  const route = ROUTES.find((r) => r[0] === id && allowed(r, user.role))
    || ROUTES.find((r) => r[0] === home(user.role));
  const gen = ++generation;
  clearInterval(pollTimer);
  shell.querySelectorAll("nav a").forEach((a) => {
    const current = (route[3] && route[3].nav) || route[0];
    if (a.dataset.route === current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
  document.title = `${route[1]} · Tern`;
  const main = shell.querySelector("main");
  main.replaceChildren(h("p", { class: "loading" }, "Loading…"));
  const content = h("div", { class: "page", dataset: { page: route[0] } });
  let handle = {};
  try {
    handle = (await route[2](content, { user })) || {};
  } catch (e) {
    if (gen !== generation) return;
    if (e.status === 401) return;
    content.append(h("p", { class: "form-error", role: "alert" }, `Cannot load this page: ${e.message}`));
  }
  if (gen !== generation) return;
  main.replaceChildren(content);
  const h1 = main.querySelector("h1");
  if (h1) h1.focus({ preventScroll: true });
  if (handle.poll) {
    let failing = false;
    pollTimer = setInterval(async () => {
      if (document.hidden || gen !== generation) return;
      try { await handle.poll(); failing = false; } catch (e) {
        if (!failing && e.status !== 401) notify(`Live update failed: ${e.message}`, "error");
        failing = true;
      }
    }, POLL_MS);
  }
}

async function start() {
  const s = session.get();
  if (!s) return renderSignIn();
  let user;
  try { user = await api("GET", "/api/auth/me"); } catch (e) {
    if (e.status !== 401) renderSignIn(`Cannot reach the server: ${e.message}`);
    return;
  }
  const shell = layout(user);
  clearTimeout(expiryTimer);
  expiryTimer = setTimeout(() => signedOut("Your session has expired; please sign in again."),
    Math.max(0, s.expires_at * 1000 - Date.now()));
  window.onhashchange = () => show(shell, user);
  const after = sessionStorage.getItem(AFTER);
  sessionStorage.removeItem(AFTER);
  if (after) history.replaceState(null, "", after);
  if (!location.hash) history.replaceState(null, "", `#/${home(user.role)}`);
  await show(shell, user);
}

async function boot() {
  const params = new URLSearchParams(location.search);
  if (params.has("code") || params.has("error")) {
    try {
      const reply = await finishSso(params);
      session.set(reply);
    } catch (e) {
      history.replaceState(null, "", "/");
      return renderSignIn(`Single sign-on failed: ${e.message}`);
    }
    history.replaceState(null, "", "/");
  }
  await start();
}

boot();
