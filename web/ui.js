// Small DOM helpers: element builder, form fields with inline errors, dialogs, notices, formats.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

let uid = 0;

// A labelled input with a place for its error message (shown by showErrors).
export function field(label, input, hint) {
  const id = input.id || `f${++uid}`;
  input.id = id;
  const err = h("p", { class: "field-error", id: `${id}-err`, role: "alert", hidden: true });
  input.setAttribute("aria-describedby", `${id}-err`);
  const wrap = h("div", { class: "field", dataset: { field: input.name || "" } },
    h("label", { for: id }, label), input, hint ? h("p", { class: "hint" }, hint) : null, err);
  return wrap;
}

export function input(name, attrs = {}) {
  return h("input", { name, type: "text", autocomplete: "off", ...attrs });
}

export function checkbox(name, label, checked) {
  return h("label", { class: "check" },
    h("input", { type: "checkbox", name, checked: !!checked }), " ", label);
}

export function select(name, options, value) {
  return h("select", { name },
    options.map(([v, t]) => h("option", { value: v, selected: v === value }, t)));
}

// A set of checkboxes for choosing groups; value read with checkedValues(form, name).
export function groupPicker(name, groups, selected = [], { skipAll = false } = {}) {
  const list = groups.filter((g) => !(skipAll && g.builtin));
  if (!list.length) return h("p", { class: "hint" }, "No groups yet: create one on the Groups page.");
  return h("div", { class: "picker", role: "group", dataset: { field: name } },
    list.map((g) => h("label", { class: "chip-check" },
      h("input", { type: "checkbox", name, value: g.id, checked: selected.includes(g.id) }),
      " ", g.name)));
}

export function checkedValues(form, name) {
  return [...form.querySelectorAll(`input[name="${name}"]:checked`)].map((i) => i.value);
}

export function clearErrors(form) {
  form.querySelectorAll(".field-error, .form-error").forEach((e) => { e.hidden = true; e.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

// Puts an API error next to the field it names, or at the form's top; focuses the culprit.
export function showError(form, err) {
  const fieldName = err.field;
  if (fieldName) {
    const box = form.querySelector(`.field[data-field="${fieldName}"], [data-field="${fieldName}"]`);
    const slot = box && (box.querySelector(".field-error") || box.parentElement.querySelector(".field-error"));
    if (slot) {
      slot.textContent = err.message;
      slot.hidden = false;
      const control = box.matches("input,select,textarea") ? box : box.querySelector("input,select,textarea");
      if (control) { control.setAttribute("aria-invalid", "true"); control.focus(); }
      return;
    }
  }
  const top = form.querySelector(".form-error");
  if (top) {
    top.textContent = fieldName ? `${fieldName}: ${err.message}` : err.message;
    top.hidden = false;
  } else {
    notify(err.message, "error");
  }
}

export function formError() {
  return h("p", { class: "form-error", role: "alert", hidden: true });
}

// Runs an async submit handler with the button disabled and errors shown in the form.
export function onSubmit(form, handler) {
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form);
    const btn = form.querySelector("button[type=submit]");
    if (btn) btn.disabled = true;
    try {
      await handler(form);
    } catch (err) {
      showError(form, err);
    } finally {
      if (btn) btn.disabled = false;
    }
  });
  return form;
}

export function notify(message, kind = "ok") {
  let box = document.getElementById("notices");
  if (!box) {
    box = h("div", { id: "notices", "aria-live": "polite" });
    document.body.append(box);
  }
  const n = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  box.append(n);
  setTimeout(() => n.remove(), kind === "error" ? 8000 : 3500);
}

// A modal dialog built from `content`; resolves when closed. Escape closes (native <dialog>).
export function dialog(title, content, { wide = false } = {}) {
  const d = h("dialog", { class: wide ? "wide" : "", "aria-labelledby": "dlg-title" },
    h("div", { class: "dlg-head" },
      h("h2", { id: "dlg-title" }, title),
      h("button", { type: "button", class: "icon", "aria-label": "Close", onclick: () => d.close() }, "×")),
    content);
  document.body.append(d);
  d.addEventListener("close", () => d.remove());
  d.showModal();
  const first = d.querySelector("input:not([type=hidden]),select,textarea,button.primary");
  if (first) first.focus();
  return d;
}

export async function confirmAction(message, verb = "Delete") {
  return new Promise((resolve) => {
    let ok = false;
    const d = dialog("Please confirm", h("div", {},
      h("p", {}, message),
      h("div", { class: "actions" },
        h("button", { type: "button", onclick: () => d.close() }, "Cancel"),
        h("button", { type: "button", class: "danger", onclick: () => { ok = true; d.close(); } }, verb))));
    d.addEventListener("close", () => resolve(ok));
  });
}

// A secret shown once, with a copy button.
export function secretBox(label, secret, warning) {
  const code = h("code", { class: "secret", tabindex: 0 }, secret);
  const copy = h("button", { type: "button", class: "primary", "data-action": "copy" }, "Copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(secret);
      copy.textContent = "Copied";
    } catch (_) {
      const r = document.createRange();
      r.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(r);
      copy.textContent = "Selected: press Ctrl+C";
    }
  });
  return h("div", { class: "secret-box", role: "region", "aria-label": label },
    h("p", { class: "warn" }, warning), h("div", { class: "secret-row" }, code, copy));
}

export function fmtTime(ms) {
  if (!ms) return "never";
  return new Date(ms).toLocaleString();
}

export function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 45) return "just now";
  if (s < 90 * 60) return `${Math.round(s / 60)} min ago`;
  if (s < 36 * 3600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

export function fmtBytes(n) {
  if (n < 1000) return `${n} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let v = n;
  let i = -1;
  do { v /= 1000; i++; } while (v >= 1000 && i < units.length - 1);
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}

// Audit events in words (the audit page and a peer's page).
export const actorName = (a) => {
  const [kind, name] = a.includes(":") ? [a.slice(0, a.indexOf(":")), a.slice(a.indexOf(":") + 1)] : ["", a];
  return { user: name, token: `${name} (access token)`, setup_key: `setup key ${name}`, peer: "a peer", system: "Tern" }[kind] || a;
};
export const actionWords = (a) => ({
  "policy.create": "created policy", "policy.update": "changed policy", "policy.enabled": "enabled policy",
  "policy.disabled": "disabled policy", "policy.delete": "deleted policy", "policy.put": "saved policy",
  "group.create": "created group", "group.update": "changed group", "group.delete": "deleted group",
  "group.members": "set the members of group",
  "route.put": "saved route", "route.delete": "deleted route", "peer.register": "registered peer",
  "peer.update": "changed peer", "peer.delete": "deleted peer", "setup_key.create": "created setup key",
  "setup_key.update": "changed setup key", "setup_key.revoke": "revoked setup key", "setup_key.delete": "deleted setup key",
  "settings.update": "changed settings", "user.create": "created admin", "user.update": "changed admin",
  "user.delete": "deleted admin", "service.put": "saved public service", "service.delete": "deleted public service",
  "service.expose": "exposed a port", "service.unexpose": "stopped exposing a port", "auth.login": "signed in",
  "auth.logout": "signed out", "token.create": "created access token", "token.delete": "deleted access token",
  "wireguard_device.create": "added WireGuard device", "wireguard_device.rekey": "issued a new configuration for",
}[a] || a);
export const targetName = (e) => {
  const d = e.detail || {};
  const name = d.name || d.username || d.network || d.hostname;
  if (name) return `${e.target_type === "service" ? "public service" : e.target_type.replace("_", " ")} ${name}`;
  if (e.target_type === "service") return "public service";
  return e.target_type.replace("_", " ");
};

