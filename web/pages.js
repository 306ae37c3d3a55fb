// The console's pages. Each page renders into `main` and may return { poll } for live updates.

import { get, post, put, del } from "./api.js";
import {
  h, field, input, checkbox, select, groupPicker, checkedValues, onSubmit, formError, notify,
  dialog, confirmAction, secretBox, fmtTime, ago, table, badge, fmtBytes, actorName, actionWords, targetName,
} from "./ui.js";
import { networkPicture, editPeer as editPeerDialog, REASON_WORDS } from "./network.js";

const groupNames = (groups, ids) =>
  ids.map((id) => (groups.find((g) => g.id === id) || { name: id }).name);

const chips = (names) => h("span", { class: "chips" }, names.map((n) => badge(n)));

// A row action (approve, revoke, delete…), confirmed first when `question` is given; then the
// list is refreshed. A refusal is shown as a notice; returns whether the action went through.
async function rowAction(work, done, refresh, question, verb) {
  if (question && !(await confirmAction(question, verb))) return false;
  try {
    await work();
  } catch (e) {
    notify(e.message, "error");
    return false;
  }
  notify(done);
  await refresh().catch(() => {});
  return true;
}

function header(title, ...actions) {
  return h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, title), h("div", { class: "actions" }, actions));
}

function liveRegion(render, { search = "" } = {}) {
  const box = h("div", { class: "live" });
  const body = h("div", {});
  let last = "";
  // A search box above a long table: rows whose text does not contain every word are hidden,
  // also after each live update.
  const query = search ? h("input", { type: "search", class: "table-search", placeholder: search, "aria-label": search }) : null;
  const count = h("span", { class: "muted small search-count", "aria-live": "polite" });
  const apply = () => {
    if (!query) return;
    const words = query.value.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = [...body.querySelectorAll("tbody tr")];
    let shown = 0;
    for (const r of rows) {
      const hit = words.every((w) => r.textContent.toLowerCase().includes(w));
      r.hidden = !hit;
      if (hit) shown += 1;
    }
    count.textContent = words.length ? `${shown} of ${rows.length} shown` : "";
  };
  if (query) {
    query.addEventListener("input", apply);
    box.append(h("div", { class: "search" }, query, " ", count));
  }
  box.append(body);
  return {
    box,
    update(data, ...rest) {
      const key = JSON.stringify(data);
      if (key === last) return;
      last = key;
      body.replaceChildren(render(data, ...rest));
      apply();
    },
  };
}

const CONN_LABEL = { direct: "direct", turn_relay: "TURN relay", tcp_relay: "TCP relay", connecting: "connecting" };
const relayed = (k) => k === "turn_relay" || k === "tcp_relay";

// A plain WireGuard device: what the server's endpoint sees of it.
function wireguardSummary(w) {
  if (w.last_handshake_secs == null) return h("span", { class: "muted" }, "no handshake yet");
  return h("span", { class: "wg-live" },
    `handshake ${w.last_handshake_secs} s ago · ↓ ${fmtBytes(w.rx_bytes)} ↑ ${fmtBytes(w.tx_bytes)}`,
    w.endpoint ? h("div", { class: "muted small" }, `from ${w.endpoint}`) : null);
}

function connSummary(p, peers) {
  if (p.wireguard) return wireguardSummary(p.wireguard);
  const list = p.connections || [];
  if (!p.connected) return h("span", { class: "muted" }, "—");
  if (!list.length) return p.alone
    ? h("span", { class: "bad-text alone", title: "Its map lists no other peer: an admin puts it in a group an enabled policy covers (its page, or Settings: groups for devices added by sign-in)" }, "no other peer in reach: no policy covers its groups")
    : h("span", { class: "muted" }, "no paths reported yet");
  return h("ul", { class: "conns" }, list.map((c) => {
    const other = peers.find((x) => x.id === c.peer_id);
    return h("li", {},
      badge(CONN_LABEL[c.kind] || c.kind, c.kind === "direct" ? "ok" : relayed(c.kind) ? "relay" : "warn"),
      " ", other ? other.name : c.peer_name || "another peer",
      c.rtt_ms != null ? h("span", { class: "muted" }, ` ${c.rtt_ms} ms`) : null,
      c.loss_pct ? h("span", { class: "loss", title: "probes lost on this path over the last minute" }, ` ${c.loss_pct}% loss`) : null,
      relayed(c.kind) && c.reason && REASON_WORDS[c.reason]
        ? h("div", { class: "muted why", title: c.reason }, REASON_WORDS[c.reason]) : null);
  }));
}

// ------------------------------------------------------------------------------------------------
// Overview

// The relay's own load, e.g. "relaying 12.4 Mbit/s (1,530 datagrams/s) · uplink queue 380 ms · 210 drops/s".
function relayLoadWords(l) {
  const mbit = (l.bits_per_sec / 1e6).toFixed(l.bits_per_sec >= 1e7 ? 0 : 1);
  const parts = [`relaying ${mbit} Mbit/s (${Math.round(l.datagrams_per_sec).toLocaleString("en")} datagrams/s)`];
  if (l.queue_ms != null && l.queue_ms >= 1) parts.push(`uplink queue ${Math.round(l.queue_ms)} ms`);
  const drops = l.send_drops_per_sec + l.receive_drops_per_sec;
  parts.push(drops >= 1 ? `${Math.round(drops).toLocaleString("en")} drops/s` : "no drops");
  return parts.join(" · ");
}

export async function overview(main) {
  const cards = liveRegion((status) => {
    const total = status.peers_total, online = status.peers_online;
    const { direct, relayed: viaRelay, connecting } = status.connections;
    const relay = status.relay;
    return h("div", { class: "cards" },
      h("section", { class: "card", "aria-label": "Peers online" },
        h("h2", {}, "Peers online"),
        h("p", { class: "big", id: "peers-online" }, `${online} / ${total}`),
        h("p", { class: "muted" }, total ? `${total - online} offline` : "No peers yet: create a setup key")),
      h("section", { class: "card", "aria-label": "Connections" },
        h("h2", {}, "Connections"),
        h("p", { class: "big" }, `${direct} direct · ${viaRelay} relayed`),
        h("p", { class: "muted" }, connecting ? `${connecting} still connecting` : "peer-to-peer paths reported by agents")),
      h("section", { class: "card", "aria-label": "Relay" },
        h("h2", {}, "Relay"),
        relay ? h("div", {},
          h("p", { class: "big", id: "relay-health" }, relay.healthy === false ? badge("not answering STUN", "bad")
            : relay.load && relay.load.overloaded ? badge("overloaded", "bad")
            : relay.healthy === true ? badge("healthy", "ok") : badge("external, not monitored")),
          relay.load ? h("p", { id: "relay-load" }, relayLoadWords(relay.load)) : null,
          relay.load && relay.load.overloaded ? h("p", { class: "bad-text", id: "relay-overload" }, `Overloaded: ${relay.load.why}. Agents relayed through it see delay and loss; direct paths or a second relay take load off it.`) : null,
          h("p", { class: "muted" }, `${relay.allocations} TURN allocations · ${relay.tcp_clients} TCP relay clients`),
          relay.urls.length ? h("ul", { class: "plain" }, relay.urls.map((u) => h("li", {}, h("code", {}, u)))) : null)
          : h("p", { class: "muted" }, "No relay status available")),
      // Several management replicas on one PostgreSQL: which are alive and whom they serve.
      (status.replicas || []).length > 1 ? h("section", { class: "card", "aria-label": "Replicas", id: "replicas" },
        h("h2", {}, "Replicas"),
        h("p", { class: "big" }, `${status.replicas.length} live`),
        h("ul", { class: "plain" }, status.replicas.map((r) => h("li", {},
          h("code", {}, r.id), ` · ${r.peers} ${r.peers === 1 ? "peer" : "peers"}`,
          r.id === status.replica ? h("span", { class: "muted" }, " (this console)") : null)))) : null);
  });
  const picture = liveRegion(([peers, routes]) => networkPicture(peers, routes));
  main.append(header("Overview"), cards.box, picture.box);
  const poll = async () => {
    const [status, peers, routes] = await Promise.all([get("/api/status"), get("/api/peers"), get("/api/routes")]);
    cards.update(status);
    picture.update([peers.map(({ id, name, overlay_ip, connected, connections, groups }) => ({ id, name, overlay_ip, connected, connections, groups })), routes]);
  };
  await poll();
  return { poll };
}

// ------------------------------------------------------------------------------------------------
// Peers

export async function peers(main) {
  let groups = await get("/api/groups");
  const region = liveRegion((list) => table(
    ["Name", "Owner", "Overlay IP", "Status", "Last seen", "System", "Groups", "Connections", ""],
    list.map((p) => h("tr", { dataset: { peer: p.id } },
      h("td", {}, h("a", { href: `#/peer/${p.id}`, class: "peer-link" }, h("strong", {}, p.name)), h("div", { class: "muted small dns-name" }, p.dns_name || p.hostname)),
      h("td", { class: "owner" }, p.owner || (p.wireguard
        ? h("span", { class: "muted", title: "a plain WireGuard device the server hosts" }, "WireGuard device")
        : h("span", { class: "muted", title: "joined with a setup key" }, "setup key"))),
      h("td", {}, h("code", {}, p.overlay_ip)),
      h("td", { class: "status" }, p.connected ? badge("online", "ok") : badge("offline", "off"),
        p.approved ? null : h("div", {}, badge("awaiting approval", "warn")),
        p.owner_disabled ? h("div", {}, badge("owner disabled", "bad")) : null),
      h("td", { title: fmtTime(p.last_seen) }, p.connected ? "now" : ago(p.last_seen)),
      h("td", {}, p.os || "—", p.agent_version ? h("div", { class: "muted small" }, p.agent_version) : null),
      h("td", {}, chips(groupNames(groups, p.groups))),
      h("td", {}, connSummary(p, list)),
      h("td", { class: "row-actions" },
        p.approved ? null : h("button", { type: "button", class: "primary", "data-action": "approve", onclick: () => approve(p) }, "Approve"),
        p.wireguard ? h("button", { type: "button", "data-action": "reissue", title: "New keys and a new configuration (the old one stops working)", onclick: () => reissue(p) }, "New config") : null,
        h("button", { type: "button", onclick: () => editPeer(p) }, "Edit"),
        h("button", { type: "button", class: "danger", onclick: () => removePeer(p) }, "Delete")))),
    "No peers yet. Create a setup key and run `tern up` on a machine."), { search: "Search peers (name, address, group, OS…)" });

  const refresh = async () => region.update(await get("/api/peers"));

  const editPeer = (p) => editPeerDialog(p, groups, refresh);

  async function approve(p) {
    await rowAction(() => put(`/api/peers/${p.id}`, { approved: true }), `${p.name} approved`, refresh);
  }

  async function removePeer(p) {
    await rowAction(() => del(`/api/peers/${p.id}`), "Peer deleted", refresh, `Delete ${p.name} (${p.overlay_ip})? It must join again (a setup key, or its user signs in).`);
  }

  const shown = h("div", { id: "new-wireguard-device" });
  /// Shows a device's configuration (and QR code) once.
  function showConfig(reply) {
    const blob = new Blob([reply.config], { type: "text/plain" });
    const link = h("a", { class: "button primary", href: URL.createObjectURL(blob), download: reply.file_name }, `Download ${reply.file_name}`);
    const qr = h("img", { class: "qr", alt: "QR code of the configuration", width: 256, height: 256,
      src: `data:image/svg+xml;charset=utf-8,${encodeURIComponent(reply.qr_svg)}` });
    shown.replaceChildren(h("section", { class: "card" },
      h("h2", {}, `WireGuard device “${reply.peer.name}” (${reply.peer.overlay_ip})`),
      h("div", { class: "secret-box" }, h("p", { class: "warn" }, `This configuration holds the device's private key: it is shown only once. Scan the QR code with the WireGuard app, or download the file (wg-quick up ./${reply.file_name}).`)),
      h("div", { class: "wg-config" }, qr, h("pre", { tabindex: 0 }, h("code", {}, reply.config))),
      h("div", { class: "actions" }, link,
        h("button", { type: "button", onclick: () => shown.replaceChildren() }, "Done, hide it"))));
    shown.scrollIntoView({ block: "start" });
  }
  function addWireguard() {
    const form = h("form", { novalidate: true, id: "wireguard-device-form" },
      formError(),
      field("Name", input("name", { required: true, placeholder: "gina-phone" }), "Its name in the mesh: letters, digits and dashes"),
      h("fieldset", { "data-field": "groups" }, h("legend", {}, "Groups (policies and routes follow them)"),
        groupPicker("groups", groups, [], { skipAll: true }), h("p", { class: "field-error", hidden: true })),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Add device")));
    const d = dialog("New WireGuard device", form);
    onSubmit(form, async (f) => {
      const reply = await post("/api/wireguard-devices", { name: f.elements.name.value, groups: checkedValues(f, "groups") });
      d.close();
      showConfig(reply);
      await refresh();
    });
  }
  async function reissue(p) {
    if (!await confirmAction(`Issue a new configuration for ${p.name}? The one it uses now stops working at once.`, "New configuration")) return;
    try {
      showConfig(await post(`/api/wireguard-devices/${p.id}/config`, {}));
      await refresh();
    } catch (e) {
      notify(e.message, "error");
    }
  }

  main.append(header("Peers", h("button", { type: "button", class: "primary", onclick: addWireguard }, "Add WireGuard device")), shown, region.box);
  await refresh();
  return { poll: async () => { groups = await get("/api/groups"); await refresh(); } };
}

// ------------------------------------------------------------------------------------------------
// Setup keys

/// How a machine joins with `key`: once by hand, then as a service; or in Docker.
function joinHint(url, key) {
  const up = `sudo tern up --management-url ${url} --setup-key ${key}`;
  return h("div", { class: "join-hint" },
    h("p", { class: "muted" }, "On a Linux machine, to try it (it stays in the foreground; later starts need no key):"),
    h("pre", {}, h("code", {}, up)),
    h("p", { class: "muted" }, "Or join and run it as a service that starts at boot:"),
    h("pre", {}, h("code", {}, `sudo tern service install --management-url ${url} --setup-key ${key}`)),
    h("p", { class: "muted" }, "Or in Docker:"),
    h("pre", {}, h("code", {}, `docker run -d --name tern --cap-add NET_ADMIN --device /dev/net/tun -v tern-state:/var/lib/tern tern/agent:local up --management-url ${url} --setup-key ${key}`)));
}

export async function setupKeys(main) {
  let groups = await get("/api/groups");
  const publicUrl = (await get("/api/auth/config")).public_url || location.origin;
  const shown = h("div", { id: "new-key" });
  const region = liveRegion((keys) => table(
    ["Name", "Key", "State", "Type", "Used", "Expires", "Auto groups", ""],
    keys.map((k) => h("tr", { dataset: { key: k.id } },
      h("td", {}, k.name),
      h("td", {}, h("code", {}, `${k.key_prefix}…`)),
      h("td", {}, badge(k.state, k.state === "valid" ? "ok" : "bad")),
      h("td", {}, k.reusable ? "reusable" : "one-off", k.ephemeral ? " · ephemeral" : ""),
      h("td", {}, k.usage_limit ? `${k.used_count} / ${k.usage_limit}` : `${k.used_count}`),
      h("td", {}, k.expires_at ? fmtTime(k.expires_at) : "never"),
      h("td", {}, chips(groupNames(groups, k.auto_groups))),
      h("td", { class: "row-actions" },
        k.state === "valid" && k.expires_at ? h("button", { type: "button", onclick: () => keep(k), title: "Remove the expiry: the key works until revoked" }, "Never expire") : null,
        k.revoked ? null : h("button", { type: "button", onclick: () => revoke(k) }, "Revoke"),
        h("button", { type: "button", class: "danger", onclick: () => remove(k) }, "Delete")))),
    "No setup keys."), { search: "Search setup keys" });
  const refresh = async () => region.update(await get("/api/setup-keys"));

  async function keep(k) {
    await rowAction(() => put(`/api/setup-keys/${k.id}`, { keep: true }), "The key no longer expires", refresh, `Let ${k.name} never expire? Anyone holding it can join until you revoke it.`, "Never expire");
  }
  async function revoke(k) {
    await rowAction(() => put(`/api/setup-keys/${k.id}`, { revoked: true }), "Key revoked", refresh, `Revoke ${k.name}? Machines can no longer join with it; joined peers stay.`, "Revoke");
  }
  async function remove(k) {
    await rowAction(() => del(`/api/setup-keys/${k.id}`), "Key deleted", refresh, `Delete ${k.name}? Peers that joined with it stay.`);
  }

  function create() {
    const form = h("form", { novalidate: true, id: "setup-key-form" },
      formError(),
      field("Name", input("name", { required: true, placeholder: "Factory gateway" })),
      checkbox("reusable", "Reusable (for many machines)", false),
      field("Usage limit", input("usage_limit", { type: "number", min: 0, value: 0 }), "Reusable keys only; 0 = unlimited"),
      field("Expires in days", input("expires_in_days", { type: "number", min: 0, value: 30 }), "0 = never"),
      checkbox("ephemeral", "Ephemeral peers (removed some minutes after they disconnect)", false),
      h("fieldset", { "data-field": "auto_groups" }, h("legend", {}, "Auto groups: peers that join are put in"),
        groupPicker("auto_groups", groups, [], { skipAll: true }), h("p", { class: "field-error", hidden: true })),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create key")));
    const d = dialog("New setup key", form);
    onSubmit(form, async (f) => {
      const days = Number(f.elements.expires_in_days.value || 0);
      const reply = await post("/api/setup-keys", {
        name: f.elements.name.value,
        reusable: f.elements.reusable.checked,
        usage_limit: Number(f.elements.usage_limit.value || 0),
        expires_in_secs: days > 0 ? Math.round(days * 86400) : null,
        ephemeral: f.elements.ephemeral.checked,
        auto_groups: checkedValues(f, "auto_groups"),
      });
      d.close();
      shown.replaceChildren(h("section", { class: "card" },
        h("h2", {}, `Setup key “${reply.setup_key.name}”`),
        secretBox("New setup key", reply.key, "Copy this key now: it is shown only once and cannot be read again."),
        joinHint(publicUrl, reply.key),
        h("button", { type: "button", onclick: () => shown.replaceChildren() }, "Done, hide it")));
      shown.querySelector("code.secret").focus();
      await refresh();
    });
  }

  main.append(header("Setup keys", h("button", { type: "button", class: "primary", onclick: create }, "New setup key")), shown, region.box);
  await refresh();
  return { poll: async () => { groups = await get("/api/groups"); await refresh(); } };
}

// ------------------------------------------------------------------------------------------------
// Groups

export async function groupsPage(main) {
  const region = liveRegion((groups) => table(["Name", "Peers", ""],
    groups.map((g) => h("tr", { dataset: { group: g.id } },
      h("td", {}, g.name, g.builtin ? h("span", { class: "muted" }, " (built in: every peer)") : null),
      h("td", {}, String(g.peers)),
      h("td", { class: "row-actions" }, g.builtin ? null : [
        h("button", { type: "button", onclick: () => members(g) }, "Members"),
        h("button", { type: "button", onclick: () => edit(g) }, "Rename"),
        h("button", { type: "button", class: "danger", onclick: () => remove(g) }, "Delete")]))),
    "No groups."), { search: "Search groups" });
  const refresh = async () => region.update(await get("/api/groups"));

  function edit(g) {
    const form = h("form", { novalidate: true }, formError(),
      field("Name", input("name", { value: g ? g.name : "", required: true })),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, g ? "Save" : "Create group")));
    const d = dialog(g ? `Rename ${g.name}` : "New group", form);
    onSubmit(form, async (f) => {
      const body = { name: f.elements.name.value };
      if (g) await put(`/api/groups/${g.id}`, body); else await post("/api/groups", body);
      d.close();
      notify(g ? "Group renamed" : "Group created");
      await refresh();
    });
  }
  async function members(g) {
    const peers = await get("/api/peers");
    const rows = peers.map((p) => h("label", { class: "chip-check member", dataset: { name: `${p.name} ${p.overlay_ip} ${p.hostname}`.toLowerCase() } },
      h("input", { type: "checkbox", name: "peers", value: p.id, checked: p.groups.includes(g.id) }),
      ` ${p.name} `, h("span", { class: "muted" }, p.overlay_ip)));
    const filter = input("filter", { placeholder: "Filter by name or address", autocomplete: "off" });
    filter.addEventListener("input", () => {
      const q = filter.value.trim().toLowerCase();
      for (const r of rows) r.hidden = q !== "" && !r.dataset.name.includes(q);
    });
    const form = h("form", { novalidate: true, id: "members-form" }, formError(),
      peers.length > 8 ? field("Filter", filter) : null,
      h("fieldset", { "data-field": "peers" }, h("legend", {}, "Peers in this group"),
        peers.length ? h("div", { class: "picker" }, rows) : h("p", { class: "muted" }, "No peers yet."),
        h("p", { class: "field-error", hidden: true })),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save members")));
    const d = dialog(`Members of ${g.name}`, form);
    onSubmit(form, async (f) => {
      const chosen = checkedValues(f, "peers");
      await put(`/api/groups/${g.id}/members`, { peers: chosen });
      d.close();
      notify(`${g.name}: ${chosen.length} ${chosen.length === 1 ? "peer" : "peers"}`);
      await refresh();
    });
  }
  async function remove(g) {
    await rowAction(() => del(`/api/groups/${g.id}`), "Group deleted", refresh, `Delete group ${g.name}?`);
  }
  main.append(header("Groups", h("button", { type: "button", class: "primary", onclick: () => edit(null) }, "New group")), region.box);
  await refresh();
  return { poll: refresh };
}

// ------------------------------------------------------------------------------------------------
// Access policies

export async function policies(main) {
  let groups = await get("/api/groups");
  const region = liveRegion((list) => table(
    ["Name", "Sources", "", "Destinations", "Protocol", "Ports", "Enabled", ""],
    list.map((p) => h("tr", { dataset: { policy: p.id }, class: p.enabled ? null : "disabled" },
      h("td", {}, h("strong", {}, p.name), p.enabled ? null : h("span", { class: "muted" }, " (disabled)"),
        p.description ? h("div", { class: "muted small" }, p.description) : null),
      h("td", {}, chips(groupNames(groups, p.sources))),
      h("td", { "aria-label": p.bidirectional ? "both ways" : "one way" }, p.bidirectional ? "⇄" : "→"),
      h("td", {}, chips(groupNames(groups, p.destinations))),
      h("td", {}, p.protocol.toUpperCase()),
      h("td", {}, p.ports.length ? p.ports.join(", ") : "all"),
      h("td", {}, h("label", { class: "switch" },
        h("input", { type: "checkbox", checked: p.enabled, "aria-label": `Policy ${p.name} enabled`, onchange: (e) => toggle(p, e.target) }))),
      h("td", { class: "row-actions" },
        h("button", { type: "button", onclick: () => edit(p) }, "Edit"),
        h("button", { type: "button", class: "danger", onclick: () => remove(p) }, "Delete")))),
    "No policies: peers cannot reach each other."), { search: "Search policies" });
  const refresh = async () => region.update(await get("/api/policies"));
  const body = (p, patch) => ({
    name: p.name, description: p.description, enabled: p.enabled, protocol: p.protocol,
    ports: p.ports, bidirectional: p.bidirectional, sources: p.sources, destinations: p.destinations, ...patch,
  });

  // A policy between "All" and "All" is what lets peers reach each other at all.
  const catchAll = (p) => p.sources.includes("all") || p.destinations.includes("all");
  const everyone = (p) => p.sources.includes("all") && p.destinations.includes("all")
    ? "every peer can reach every other peer through it"
    : "it applies to every peer";

  async function toggle(p, box) {
    const question = !box.checked && catchAll(p)
      ? `Disable ${p.name}? ${everyone(p)[0].toUpperCase()}${everyone(p).slice(1)}; without it, peers reach only what other policies allow.`
      : undefined;
    const ok = await rowAction(() => put(`/api/policies/${p.id}`, body(p, { enabled: box.checked })),
      box.checked ? `${p.name} enabled` : `${p.name} disabled`, refresh, question, "Disable");
    if (!ok) box.checked = !box.checked;
  }

  function edit(p) {
    const form = h("form", { novalidate: true, id: "policy-form" }, formError(),
      field("Name", input("name", { value: p ? p.name : "", required: true })),
      field("Description", input("description", { value: p ? p.description : "" })),
      h("fieldset", { "data-field": "sources" }, h("legend", {}, "Sources"),
        groupPicker("sources", groups, p ? p.sources : []), h("p", { class: "field-error", hidden: true })),
      h("fieldset", { "data-field": "destinations" }, h("legend", {}, "Destinations"),
        groupPicker("destinations", groups, p ? p.destinations : []), h("p", { class: "field-error", hidden: true })),
      field("Protocol", select("protocol", [["any", "Any"], ["tcp", "TCP"], ["udp", "UDP"], ["icmp", "ICMP"]], p ? p.protocol : "any")),
      field("Ports", input("ports", { value: p ? p.ports.join(", ") : "", placeholder: "22, 8000-8080" }), "TCP/UDP only; empty = all ports"),
      checkbox("bidirectional", "Both directions", p ? p.bidirectional : true),
      checkbox("enabled", "Enabled", p ? p.enabled : true),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, p ? "Save" : "Create policy")));
    const d = dialog(p ? `Edit ${p.name}` : "New access policy", form, { wide: true });
    onSubmit(form, async (f) => {
      const b = {
        name: f.elements.name.value,
        description: f.elements.description.value,
        protocol: f.elements.protocol.value,
        ports: f.elements.ports.value.split(",").map((s) => s.trim()).filter(Boolean),
        bidirectional: f.elements.bidirectional.checked,
        enabled: f.elements.enabled.checked,
        sources: checkedValues(f, "sources"),
        destinations: checkedValues(f, "destinations"),
      };
      if (p) await put(`/api/policies/${p.id}`, b); else await post("/api/policies", b);
      d.close();
      notify(p ? "Policy saved" : "Policy created");
      await refresh();
    });
  }
  async function remove(p) {
    const why = catchAll(p) ? ` ${everyone(p)[0].toUpperCase()}${everyone(p).slice(1)}; without it, peers reach only what other policies allow.` : "";
    await rowAction(() => del(`/api/policies/${p.id}`), "Policy deleted", refresh, `Delete policy ${p.name}?${why}`);
  }
  main.append(header("Access policies", h("button", { type: "button", class: "primary", onclick: () => edit(null) }, "New policy")), region.box);
  await refresh();
  return { poll: async () => { groups = await get("/api/groups"); await refresh(); } };
}

// ------------------------------------------------------------------------------------------------
// Routes

// What each online client made of a route (their reports): installed, or skipped and why.
const CLIENT_STATE = { installed: "installed", conflict: "skipped: overlaps its own network", unserved: "no routing peer reachable", failed: "the kernel refused it", no_access: "installed, but no policy lets it use the network" };
function routeClients(list) {
  if (!list.length) return null;
  const ok = list.filter((c) => c.state === "installed");
  const rest = list.filter((c) => c.state !== "installed");
  return h("div", { class: "small route-clients" },
    ok.length ? h("div", { class: "ok" }, `installed on ${ok.map((c) => c.peer_name).join(", ")}`) : null,
    rest.map((c) => h("div", { class: "bad", title: c.detail || "", dataset: { client: c.peer_name, state: c.state } },
      `${c.peer_name}: ${CLIENT_STATE[c.state] || c.state}`)));
}

export async function routes(main) {
  let [groups, peerList] = await Promise.all([get("/api/groups"), get("/api/peers")]);
  const peerName = (id) => (peerList.find((p) => p.id === id) || { name: id }).name;
  const region = liveRegion((list) => table(
    ["Network", "Routed by", "Metric", "Masquerade", "Distribution", "Access", "Enabled", ""],
    list.map((r) => h("tr", { dataset: { route: r.id } },
      h("td", {}, h("code", {}, r.network), r.description ? h("div", { class: "muted small" }, r.description) : null),
      h("td", {}, r.routing_peer ? peerName(r.routing_peer) : `group ${groupNames(groups, [r.routing_group])[0]}`,
        r.serving ? h("div", { class: `small serving ${r.serving.startsWith("served") ? "ok" : "bad"}` }, r.serving) : null),
      h("td", {}, String(r.metric)),
      h("td", {}, r.masquerade ? "yes" : "no"),
      h("td", {}, chips(groupNames(groups, r.groups)), routeClients(r.clients || [])),
      h("td", { class: "route-access" }, r.access_groups.length ? chips(groupNames(groups, r.access_groups))
        : r.open_to_groups ? badge("open to distribution groups", "warn")
        : h("span", { class: "muted" }, "as policies towards the routing peer allow")),
      h("td", {}, r.enabled ? badge("on", "ok") : badge("off", "off")),
      h("td", { class: "row-actions" },
        h("button", { type: "button", onclick: () => edit(r) }, "Edit"),
        h("button", { type: "button", class: "danger", onclick: () => remove(r) }, "Delete")))),
    "No routes. A route lets peers reach a LAN behind a routing peer."), { search: "Search routes (network, peer, group…)" });
  const refresh = async () => region.update(await get("/api/routes"));

  function edit(r) {
    const by = r && r.routing_group ? "group" : "peer";
    const peerSel = select("routing_peer", [["", "— choose a peer —"], ...peerList.map((p) => [p.id, `${p.name} (${p.overlay_ip})`])], r ? r.routing_peer || "" : "");
    const groupSel = select("routing_group", [["", "— choose a group —"], ...groups.map((g) => [g.id, g.name])], r ? r.routing_group || "" : "");
    const peerField = field("Routing peer", peerSel);
    const groupField = field("Routing group (high availability)", groupSel);
    const mode = select("routed_by", [["peer", "One routing peer"], ["group", "A group of routing peers"]], by);
    const sync = () => { peerField.hidden = mode.value !== "peer"; groupField.hidden = mode.value !== "group"; };
    mode.addEventListener("change", sync);
    const form = h("form", { novalidate: true, id: "route-form" }, formError(),
      field("Network (CIDR)", input("network", { value: r ? r.network : "", required: true, placeholder: "192.168.50.0/24" })),
      field("Description", input("description", { value: r ? r.description : "" })),
      field("Routed by", mode), peerField, groupField,
      field("Metric", input("metric", { type: "number", min: 1, max: 9999, value: r ? r.metric : 9999 }), "Lower wins when several peers route the network"),
      checkbox("masquerade", "Masquerade (LAN hosts see the routing peer's address)", r ? r.masquerade : true),
      checkbox("enabled", "Enabled", r ? r.enabled : true),
      h("fieldset", { "data-field": "groups" }, h("legend", {}, "Distribution groups: peers that get this route"),
        groupPicker("groups", groups, r ? r.groups : []), h("p", { class: "field-error", hidden: true })),
      h("fieldset", { "data-field": "access_groups" }, h("legend", {}, "Access groups (optional): only policies towards these groups open the network"),
        groupPicker("access_groups", groups, r ? r.access_groups : [], { skipAll: true }), h("p", { class: "field-error", hidden: true })),
      checkbox("open_to_groups", "Open to everyone in the distribution groups: the whole network, all ports, whatever the policies say (without access groups only; otherwise policies towards the routing peer decide)", r ? r.open_to_groups : false),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, r ? "Save" : "Create route")));
    sync();
    const d = dialog(r ? `Edit route ${r.network}` : "New route", form, { wide: true });
    onSubmit(form, async (f) => {
      const b = {
        network: f.elements.network.value,
        description: f.elements.description.value,
        routing_peer: mode.value === "peer" ? (peerSel.value || null) : null,
        routing_group: mode.value === "group" ? (groupSel.value || null) : null,
        metric: Number(f.elements.metric.value || 9999),
        masquerade: f.elements.masquerade.checked,
        enabled: f.elements.enabled.checked,
        groups: checkedValues(f, "groups"),
        access_groups: checkedValues(f, "access_groups"),
        open_to_groups: f.elements.open_to_groups.checked,
      };
      const send = () => (r ? put(`/api/routes/${r.id}`, b) : post("/api/routes", b));
      try {
        await send();
      } catch (err) {
        // Probably a mistake, but allowed: say why and let the admin decide.
        if (err.kind !== "needs_confirmation" || !(await confirmAction(err.message, r ? "Save anyway" : "Create anyway"))) throw err;
        b.confirm_overlap = true;
        await send();
      }
      d.close();
      notify(r ? "Route saved" : "Route created");
      await refresh();
    });
  }
  async function remove(r) {
    await rowAction(() => del(`/api/routes/${r.id}`), "Route deleted", refresh, `Delete route ${r.network}?`);
  }
  main.append(header("Routes", h("button", { type: "button", class: "primary", onclick: () => edit(null) }, "New route")), region.box);
  await refresh();
  return { poll: async () => { [groups, peerList] = await Promise.all([get("/api/groups"), get("/api/peers")]); await refresh(); } };
}

// ------------------------------------------------------------------------------------------------
// Public services

const EVERYONE = ["0.0.0.0/0", "::/0"];

function activity(st) {
  const refused = st.refused_allowlist + st.refused_limit;
  return h("div", {},
    h("div", {}, h("strong", {}, String(st.active)), ` open · ${st.connections_total} total`),
    h("div", { class: "muted" }, `${fmtBytes(st.bytes_in)} in · ${fmtBytes(st.bytes_out)} out`),
    refused ? h("div", { class: "muted", title: "outside the allowed sources / over the connection limits" },
      `refused ${st.refused_allowlist} by source, ${st.refused_limit} by limit`) : null);
}

function sourcesText(list) {
  if (list.some((n) => EVERYONE.includes(n))) return h("span", {}, badge("everyone", "warn"));
  return h("span", { class: "small" }, list.join(", "));
}

export async function services(main) {
  let peerList = await get("/api/peers");
  const region = liveRegion((list) => table(
    ["Name", "Public address", "Target", "Allowed sources", "Activity", "Last error", "Enabled", ""],
    list.map((s) => h("tr", { dataset: { service: s.id } },
      h("td", {}, h("strong", {}, s.name), s.ephemeral ? h("div", {}, badge("tern expose", "relay")) : null),
      h("td", {}, h("code", {}, s.public_address), h("div", { class: "muted small" }, s.protocol.toUpperCase())),
      h("td", {}, h("code", {}, `${s.target_ip}:${s.target_port}`),
        h("div", { class: "muted small" }, s.reached_via), s.proxy_protocol ? h("div", { class: "muted small" }, "PROXY protocol v2") : null),
      h("td", {}, sourcesText(s.allowed_sources)),
      h("td", { class: "num small" }, activity(s.stats)),
      h("td", { class: "small" }, s.stats.last_error
        ? h("span", {}, h("span", { class: "bad-text" }, s.stats.last_error), h("div", { class: "muted" }, ago(s.stats.last_error_at)))
        : h("span", { class: "muted" }, "none")),
      h("td", {}, s.ephemeral ? badge("on", "ok") : h("label", { class: "switch" },
        h("input", { type: "checkbox", checked: s.enabled, "aria-label": `Service ${s.name} enabled`, onchange: (e) => toggle(s, e.target) }))),
      h("td", { class: "row-actions" },
        s.ephemeral ? null : h("button", { type: "button", onclick: () => edit(s) }, "Edit"),
        h("button", { type: "button", class: "danger", onclick: () => remove(s) }, s.ephemeral ? "End" : "Delete")))),
    "No public services. A public service lets a device without an agent (a supplier's server, a phone app) reach one port inside your network through this server."), { search: "Search public services" });
  const refresh = async () => region.update(await get("/api/services"));
  const body = (s, patch) => ({
    name: s.name, protocol: s.protocol, public_port: s.public_port, target_ip: s.target_ip,
    target_port: s.target_port, allowed_sources: s.allowed_sources, enabled: s.enabled,
    proxy_protocol: s.proxy_protocol, idle_timeout_secs: s.idle_timeout_secs, ...patch,
  });

  async function toggle(s, box) {
    const question = box.checked ? null
      : `Disable ${s.name}? Port ${s.public_address} closes${s.stats.active ? ` and its ${s.stats.active} open connection(s) end` : ""}.`;
    const ok = await rowAction(() => put(`/api/services/${s.id}`, body(s, { enabled: box.checked })),
      box.checked ? `${s.name} enabled` : `${s.name} disabled`, refresh, question, "Disable");
    if (!ok) box.checked = !box.checked;
  }

  function edit(s) {
    const targets = h("datalist", { id: "service-targets" },
      peerList.map((p) => h("option", { value: p.overlay_ip }, `peer ${p.name}`)));
    const proto = select("protocol", [["tcp", "TCP"], ["udp", "UDP"]], s ? s.protocol : "tcp");
    const proxy = checkbox("proxy_protocol", "Send a PROXY protocol v2 header (the target sees the client's address)", s ? s.proxy_protocol : false);
    const proxyField = h("div", { class: "field", dataset: { field: "proxy_protocol" } }, proxy, h("p", { class: "field-error", hidden: true }));
    const sync = () => { proxyField.hidden = proto.value !== "tcp"; };
    proto.addEventListener("change", sync);
    const form = h("form", { novalidate: true, id: "service-form" }, formError(), targets,
      field("Name", input("name", { value: s ? s.name : "", required: true, placeholder: "plc-modbus" })),
      field("Protocol", proto),
      field("Public port", input("public_port", { type: "number", min: 1, max: 65535, value: s ? s.public_port : "", required: true }),
        "Outside devices connect to this port on the server; it must be within the server's --public-ports range"),
      field("Target address", input("target_ip", { value: s ? s.target_ip : "", required: true, list: "service-targets", placeholder: "192.168.50.10" }),
        "A peer's overlay address, or an address inside a route's network (reached through its routing peer)"),
      field("Target port", input("target_port", { type: "number", min: 1, max: 65535, value: s ? s.target_port : "", required: true, placeholder: "502" })),
      field("Allowed sources", input("allowed_sources", { value: s ? s.allowed_sources.join(", ") : "", required: true, placeholder: "198.51.100.0/24, 203.0.113.7/32" }),
        "Networks or addresses that may connect, comma-separated. 0.0.0.0/0 opens the port to everyone on the internet."),
      proxyField,
      field("Idle timeout (seconds)", input("idle_timeout_secs", { type: "number", min: 10, value: s ? s.idle_timeout_secs : "", placeholder: "3600 for TCP, 60 for UDP" })),
      checkbox("enabled", "Enabled", s ? s.enabled : true),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, s ? "Save" : "Publish")));
    sync();
    const d = dialog(s ? `Edit ${s.name}` : "New public service", form, { wide: true });
    onSubmit(form, async (f) => {
      const num = (v) => (v.trim() === "" ? null : Number(v));
      const b = {
        name: f.elements.name.value,
        protocol: proto.value,
        public_port: num(f.elements.public_port.value) ?? 0,
        target_ip: f.elements.target_ip.value,
        target_port: num(f.elements.target_port.value) ?? 0,
        allowed_sources: f.elements.allowed_sources.value.split(",").map((x) => x.trim()).filter(Boolean),
        proxy_protocol: proto.value === "tcp" && f.elements.proxy_protocol.checked,
        idle_timeout_secs: num(f.elements.idle_timeout_secs.value),
        enabled: f.elements.enabled.checked,
      };
      const saved = s ? await put(`/api/services/${s.id}`, b) : await post("/api/services", b);
      d.close();
      notify(s ? "Service saved" : `Published at ${saved.public_address}`);
      await refresh();
    });
  }
  async function remove(s) {
    const what = s.ephemeral ? `End ${s.name}, published by its agent with tern expose?` : `Delete ${s.name}? Port ${s.public_address} closes.`;
    await rowAction(() => del(`/api/services/${s.id}`), s.ephemeral ? "Service ended" : "Service deleted", refresh, what, s.ephemeral ? "End" : "Delete");
  }
  main.append(header("Public services", h("button", { type: "button", class: "primary", onclick: () => edit(null) }, "New public service")), region.box);
  await refresh();
  return { poll: async () => { peerList = await get("/api/peers"); await refresh(); } };
}

// ------------------------------------------------------------------------------------------------
// Audit log

export async function audit(main) {
  const toMs = (v) => (v ? new Date(v).getTime() : undefined);
  const results = h("div", {});
  const form = h("form", { class: "filters", novalidate: true, id: "audit-filter" }, formError(),
    field("Actor", input("actor", { placeholder: "user:admin" })),
    field("Action", input("action", { placeholder: "peer. or policy.disabled" })),
    field("Since", input("since", { type: "datetime-local" })),
    field("Until", input("until", { type: "datetime-local" })),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Filter")));
  const load = async () => {
    const q = new URLSearchParams();
    const f = form.elements;
    if (f.actor.value.trim()) q.set("actor", f.actor.value.trim());
    if (f.action.value.trim()) q.set("action", f.action.value.trim());
    if (toMs(f.since.value)) q.set("since", toMs(f.since.value));
    if (toMs(f.until.value)) q.set("until", toMs(f.until.value));
    q.set("limit", "300");
    const events = await get(`/api/audit?${q}`);
    results.replaceChildren(table(["Time", "Who", "What", "On", ""],
      events.map((e) => h("tr", {},
        h("td", { title: fmtTime(e.created_at) }, ago(e.created_at)),
        h("td", {}, actorName(e.actor)),
        h("td", {}, actionWords(e.action)),
        h("td", {}, targetName(e)),
        h("td", { class: "detail" }, h("details", {}, h("summary", {}, "details"),
          h("pre", {}, JSON.stringify(e.detail, null, 2)))))),
      "No events match."));
  };
  onSubmit(form, load);
  main.append(header("Audit log"), form, results);
  await load();
  return {};
}

// ------------------------------------------------------------------------------------------------
// Settings

export async function settings(main, ctx) {
  const [s, groups] = await Promise.all([get("/api/settings"), get("/api/groups")]);
  const form = h("form", { novalidate: true, id: "settings-form", class: "narrow" }, formError(),
    field("Overlay range", input("overlay_range", { value: s.overlay_range }), "Peers get addresses from it; must contain every existing peer"),
    field("MTU", input("mtu", { type: "number", value: s.mtu, min: 1280, max: 9000 }), "Tunnel MTU; 1280 is safe on mobile and IPv6-only lines"),
    field("Login expiry (seconds)", input("peer_login_expiry_secs", { type: "number", value: s.peer_login_expiry_secs, min: 0 }),
      "Devices added by a person's sign-in must sign in again after this (setup-key appliances only where turned on per peer); 0 = never"),
    field("Ephemeral peer lifetime (seconds)", input("ephemeral_ttl_secs", { type: "number", value: s.ephemeral_ttl_secs, min: 0 })),
    field("DNS domain", input("dns_domain", { value: s.dns_domain }), "Peers answer to NAME.this-domain on every agent"),
    checkbox("peer_approval_required", "New peers need an admin's approval before they can reach anyone", s.peer_approval_required),
    h("fieldset", { "data-field": "expose_groups" }, h("legend", {}, "Groups allowed to use tern expose"),
      h("p", { class: "hint" }, "Peers in these groups may publish a port of their own host on the server while `tern expose` runs."),
      groupPicker("expose_groups", groups, s.expose_groups), h("p", { class: "field-error", hidden: true })),
    h("fieldset", { "data-field": "sign_in_groups" }, h("legend", {}, "Groups for devices added by sign-in"),
      h("p", { class: "hint" }, "A laptop or phone someone adds with `tern up` (signing in) joins these groups, besides its owner's groups, so the policies for them apply at once."),
      groupPicker("sign_in_groups", groups, s.sign_in_groups || [], { skipAll: true }), h("p", { class: "field-error", hidden: true })),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save settings")));
  onSubmit(form, async (f) => {
    await put("/api/settings", {
      overlay_range: f.elements.overlay_range.value,
      mtu: Number(f.elements.mtu.value),
      peer_login_expiry_secs: Number(f.elements.peer_login_expiry_secs.value),
      ephemeral_ttl_secs: Number(f.elements.ephemeral_ttl_secs.value),
      peer_approval_required: f.elements.peer_approval_required.checked,
      expose_groups: checkedValues(f, "expose_groups"),
      sign_in_groups: checkedValues(f, "sign_in_groups"),
      dns_domain: f.elements.dns_domain.value,
    });
    notify("Settings saved");
  });
  if (!canChange(ctx)) {
    // Auditors read the settings; nothing here changes them.
    form.querySelectorAll("input").forEach((i) => { i.disabled = true; });
    form.querySelector(".actions").remove();
    form.prepend(h("p", { class: "muted", id: "read-only" }, "You can read the settings; only an admin changes them."));
  }
  main.append(header("Settings"), form);
  return {};
}

// ------------------------------------------------------------------------------------------------
// Admin users and personal access tokens

const ROLE_WORDS = {
  owner: "owner — everything, including roles",
  admin: "admin — the whole network",
  auditor: "auditor — reads everything, changes nothing",
  user: "user — only their own devices",
};
const canChange = (ctx) => ctx.user.role === "owner" || ctx.user.role === "admin";

export async function users(main, ctx) {
  const newToken = h("div", {});
  const owner = ctx.user.role === "owner";
  // Only an owner acts on admins and owners; admins manage auditors and users.
  const mayManage = (u) => canChange(ctx) && (owner || u.id === ctx.user.id || !["owner", "admin"].includes(u.role));
  const userRegion = liveRegion((list) => table(["User", "Role", "Sign-in", "Devices", "State", "Created", ""],
    list.map((u) => h("tr", { dataset: { user: u.id } },
      h("td", {}, h("strong", {}, u.username), u.id === ctx.user.id ? h("span", { class: "muted" }, " (you)") : null),
      h("td", { class: "role" }, u.role),
      h("td", {}, u.source === "oidc" ? "single sign-on" : "password"),
      h("td", {}, String(u.devices || 0)),
      h("td", {}, u.disabled ? badge("disabled", "bad") : badge("active", "ok")),
      h("td", {}, fmtTime(u.created_at)),
      h("td", { class: "row-actions" },
        owner ? h("button", { type: "button", "data-action": "role", onclick: () => changeRole(u) }, "Role") : null,
        u.source === "oidc" || !mayManage(u) ? null : h("button", { type: "button", onclick: () => password(u) }, "Change password"),
        mayManage(u) && u.id !== ctx.user.id ? h("button", { type: "button", onclick: () => setDisabled(u, !u.disabled) }, u.disabled ? "Enable" : "Disable") : null,
        mayManage(u) && u.id !== ctx.user.id ? h("button", { type: "button", class: "danger", onclick: () => removeUser(u) }, "Delete") : null))),
    "No users."));
  function changeRole(u) {
    const form = h("form", { novalidate: true }, formError(),
      field("Role", select("role", Object.entries(ROLE_WORDS).map(([v, t]) => [v, t]), u.role)),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save role")));
    const d = dialog(`Role of ${u.username}`, form);
    onSubmit(form, async (f) => {
      await put(`/api/users/${u.id}`, { role: f.elements.role.value });
      d.close(); notify("Role changed"); await refresh();
    });
  }
  const tokenRegion = liveRegion((list) => table(["Name", "Expires", "Last used", ""],
    list.map((t) => h("tr", {},
      h("td", {}, t.name), h("td", {}, t.expires_at ? fmtTime(t.expires_at) : "never"),
      h("td", {}, ago(t.last_used_at)),
      h("td", { class: "row-actions" }, h("button", { type: "button", class: "danger", onclick: () => removeToken(t) }, "Delete")))),
    "You have no access tokens."));
  const refresh = async () => {
    const [u, t] = await Promise.all([get("/api/users"), get("/api/tokens")]);
    userRegion.update(u);
    tokenRegion.update(t);
  };

  function createUser() {
    const form = h("form", { novalidate: true }, formError(),
      field("Username", input("username", { required: true, autocomplete: "off" })),
      field("Password", input("password", { type: "password", autocomplete: "new-password" }), "At least 10 characters"),
      field("Role", select("role", Object.entries(ROLE_WORDS).filter(([v]) => owner || v !== "owner"), "user")),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create user")));
    const d = dialog("New user", form);
    onSubmit(form, async (f) => {
      await post("/api/users", { username: f.elements.username.value, password: f.elements.password.value, role: f.elements.role.value });
      d.close(); notify("User created"); await refresh();
    });
  }
  function password(u) {
    const own = u.id === ctx.user.id;
    const form = h("form", { novalidate: true }, formError(),
      own ? field("Current password", input("current_password", { type: "password", autocomplete: "current-password" })) : null,
      field("New password", input("password", { type: "password", autocomplete: "new-password" }), "At least 10 characters"),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Change password")));
    const d = dialog(own ? "Your password" : `Password of ${u.username}`, form);
    onSubmit(form, async (f) => {
      const body = { password: f.elements.password.value };
      if (own) body.current_password = f.elements.current_password.value;
      await put(`/api/users/${u.id}`, body);
      d.close(); notify("Password changed");
    });
  }
  async function setDisabled(u, disabled) {
    await rowAction(() => put(`/api/users/${u.id}`, { disabled }), disabled ? "User disabled" : "User enabled", refresh);
  }
  async function removeUser(u) {
    await rowAction(() => del(`/api/users/${u.id}`), "User deleted", refresh,
      `Delete ${u.username}?${u.devices ? ` Their ${u.devices} device(s) are removed from the network too.` : ""}`);
  }
  function createToken() {
    const form = h("form", { novalidate: true }, formError(),
      field("Name", input("name", { required: true, placeholder: "backup script" })),
      field("Expires in days", input("expires_in_days", { type: "number", min: 0, value: 90 }), "0 = never"),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create token")));
    const d = dialog("New personal access token", form);
    onSubmit(form, async (f) => {
      const days = Number(f.elements.expires_in_days.value || 0);
      const r = await post("/api/tokens", { name: f.elements.name.value, expires_in_days: days > 0 ? days : null });
      d.close();
      newToken.replaceChildren(h("section", { class: "card" }, h("h2", {}, `Token “${r.access_token.name}”`),
        secretBox("New access token", r.token, "Copy this token now: it is shown only once. Use it as: Authorization: Bearer <token>"),
        h("button", { type: "button", onclick: () => newToken.replaceChildren() }, "Done, hide it")));
      await refresh();
    });
  }
  async function removeToken(t) {
    await rowAction(() => del(`/api/tokens/${t.id}`), "Token deleted", refresh, `Delete token ${t.name}? Scripts using it stop working.`);
  }
  main.append(
    header("Users", h("button", { type: "button", class: "primary", onclick: createUser }, "New user")), userRegion.box,
    h("div", { class: "page-head" }, h("h2", {}, "Your access tokens"),
      h("div", { class: "actions" }, h("button", { type: "button", onclick: createToken }, "New token"))),
    newToken, tokenRegion.box);
  await refresh();
  return { poll: refresh };
}

// ------------------------------------------------------------------------------------------------
// A user's own devices, and approving a device's sign-in

const joinCommand = () => `sudo tern up --management-url ${location.origin}`;

export async function myDevices(main, ctx) {
  const region = liveRegion((list) => table(
    ["Device", "Overlay IP", "Status", "Last seen", "OS", "Paths", ""],
    list.map((p) => h("tr", { dataset: { peer: p.id } },
      h("td", {}, h("strong", {}, p.name), h("div", { class: "muted small" }, p.dns_name || p.hostname)),
      h("td", {}, h("code", {}, p.overlay_ip)),
      h("td", { class: "status" }, p.connected ? badge("online", "ok") : badge("offline", "off"),
        p.approved ? null : h("div", {}, badge("awaiting an admin's approval", "warn"))),
      h("td", { title: fmtTime(p.last_seen) }, p.connected ? "now" : ago(p.last_seen)),
      h("td", {}, p.os || "—"),
      h("td", {}, connSummary(p, [])),
      h("td", { class: "row-actions" },
        h("button", { type: "button", onclick: () => rename(p) }, "Rename"),
        h("button", { type: "button", class: "danger", onclick: () => remove(p) }, "Remove")))),
    "You have no devices yet."));
  const refresh = async () => region.update(await get("/api/peers"));
  function rename(p) {
    const form = h("form", { novalidate: true }, formError(),
      field("Name", input("name", { value: p.name, required: true })),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save")));
    const d = dialog(`Rename ${p.name}`, form);
    onSubmit(form, async (f) => {
      await put(`/api/peers/${p.id}`, { name: f.elements.name.value });
      d.close(); notify("Device renamed"); await refresh();
    });
  }
  async function remove(p) {
    await rowAction(() => del(`/api/peers/${p.id}`), `${p.name} removed`, refresh,
      `Remove ${p.name} from the network? To add it again, run tern up on it and sign in.`, "Remove");
  }
  main.append(header("My devices", h("a", { class: "button", href: "#/device" }, "Add a device")),
    h("p", { class: "muted" }, "To add a laptop, run ", h("code", {}, joinCommand()), " on it and approve the code it shows."),
    region.box);
  await refresh();
  return { poll: refresh };
}

export async function approveDevice(main, ctx) {
  const given = decodeURIComponent((location.hash.match(/^#\/device\/([\w-]+)/) || [])[1] || "");
  const result = h("div", { id: "device-result", "aria-live": "polite" });
  const form = h("form", { novalidate: true, id: "device-form", class: "narrow" }, formError(),
    field("Code shown by the device", input("code", { value: given, required: true, autocomplete: "off", placeholder: "BCDF-GHJK", autocapitalize: "characters" }),
      "8 letters, e.g. BCDF-GHJK; the dash is optional"),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Continue")));
  const mine = ctx.user.role === "user" ? "your device" : `${ctx.user.username}'s device`;
  const show = (d) => {
    const left = Math.max(0, Math.round((d.expires_at - Date.now()) / 60000));
    const facts = h("dl", { class: "facts" },
      h("dt", {}, "Device"), h("dd", { id: "device-host" }, d.hostname || "—"),
      h("dt", {}, "System"), h("dd", {}, `${d.os || "—"}, agent ${d.agent_version || "—"}`),
      h("dt", {}, "Asked from"), h("dd", {}, d.source ? h("code", {}, d.source) : "—"),
      h("dt", {}, "Asked"), h("dd", { title: fmtTime(d.created_at) }, ago(d.created_at)),
      d.existing_peer ? h("dt", {}, "Already known as") : null, d.existing_peer ? h("dd", {}, d.existing_peer) : null);
    if (d.state !== "pending") {
      return h("section", { class: "card", "aria-label": "Device" }, h("h2", {}, `Code ${d.user_code}`), facts,
        h("p", { class: d.state === "approved" ? "ok" : "form-error", id: "device-outcome" },
          d.state === "approved"
            ? `Approved by ${d.decided_by}: ${d.hostname} joins the network as ${mine}. It continues on its own within seconds.`
            : `Denied by ${d.decided_by}: ${d.hostname} was told so and does not join.`));
    }
    const decide = async (verb) => {
      try {
        show2(await post(`/api/device/${encodeURIComponent(d.user_code)}/${verb}`, {}));
      } catch (e) {
        result.replaceChildren(h("p", { class: "form-error", role: "alert", id: "device-error" }, e.message));
      }
    };
    return h("section", { class: "card", "aria-label": "Device" },
      h("h2", {}, `Add ${d.hostname} to the network?`), facts,
      h("p", { class: "muted" }, `Only approve a device you are setting up right now. The code expires in ${left} min.`),
      h("div", { class: "actions" },
        h("button", { type: "button", class: "danger", id: "device-deny", onclick: () => decide("deny") }, "Deny"),
        h("button", { type: "button", class: "primary", id: "device-approve", onclick: () => decide("approve") }, `Approve as ${mine}`)));
  };
  const show2 = (d) => result.replaceChildren(show(d));
  const lookup = async (code) => show2(await get(`/api/device/${encodeURIComponent(code.trim())}`));
  onSubmit(form, async (f) => lookup(f.elements.code.value));
  main.append(header("Add a device"),
    h("p", { class: "muted" }, "On the device, run ", h("code", {}, joinCommand()),
      ". It shows a code; enter it here to approve the device."), form, result);
  if (given) {
    try { await lookup(given); } catch (e) {
      result.replaceChildren(h("p", { class: "form-error", role: "alert", id: "device-error" }, e.message));
    }
  }
  return {};
}

// ------------------------------------------------------------------------------------------------
// DNS: peer names and nameserver groups

export async function dnsPage(main) {
  let [groups, settings] = await Promise.all([get("/api/groups"), get("/api/settings")]);
  const region = liveRegion((list) => table(
    ["Name", "Domains", "Nameservers", "Used by", "Enabled", ""],
    list.map((n) => h("tr", { dataset: { nameserver: n.id }, class: n.enabled ? null : "disabled" },
      h("td", {}, h("strong", {}, n.name), n.description ? h("div", { class: "muted small" }, n.description) : null),
      h("td", {}, n.domains.join(", ")),
      h("td", {}, h("code", {}, n.nameservers.join(", "))),
      h("td", {}, chips(groupNames(groups, n.groups))),
      h("td", {}, n.enabled ? badge("on", "ok") : badge("off", "off")),
      h("td", { class: "row-actions" },
        h("button", { type: "button", onclick: () => edit(n) }, "Edit"),
        h("button", { type: "button", class: "danger", onclick: () => remove(n) }, "Delete")))),
    "No nameserver groups: peers resolve other names with their usual nameservers."));
  const refresh = async () => region.update(await get("/api/nameservers"));
  const words = (v) => v.split(/[,\s]+/).map((x) => x.trim()).filter(Boolean);
  function edit(n) {
    const form = h("form", { novalidate: true, id: "nameserver-form" }, formError(),
      field("Name", input("name", { value: n ? n.name : "", required: true, placeholder: "factory DNS" })),
      field("Description", input("description", { value: n ? n.description : "" })),
      field("Domains", input("domains", { value: n ? n.domains.join(", ") : "", placeholder: "factory.local" }),
        "Names under these domains go to the nameservers below"),
      field("Nameservers", input("nameservers", { value: n ? n.nameservers.join(", ") : "", placeholder: "192.168.50.2" }),
        "Inside a routed network or a peer's address; IP or IP:PORT"),
      h("fieldset", { "data-field": "groups" }, h("legend", {}, "Used by the peers of"),
        groupPicker("groups", groups, n ? n.groups : ["all"]), h("p", { class: "field-error", hidden: true })),
      checkbox("enabled", "Enabled", n ? n.enabled : true),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, n ? "Save" : "Create nameserver group")));
    const d = dialog(n ? `Edit ${n.name}` : "New nameserver group", form, { wide: true });
    onSubmit(form, async (f) => {
      const b = {
        name: f.elements.name.value,
        description: f.elements.description.value,
        domains: words(f.elements.domains.value),
        nameservers: words(f.elements.nameservers.value),
        groups: checkedValues(f, "groups"),
        enabled: f.elements.enabled.checked,
      };
      if (n) await put(`/api/nameservers/${n.id}`, b); else await post("/api/nameservers", b);
      d.close();
      notify(n ? "Nameserver group saved" : "Nameserver group created");
      await refresh();
    });
  }
  async function remove(n) {
    await rowAction(() => del(`/api/nameservers/${n.id}`), "Nameserver group deleted", refresh,
      `Delete ${n.name}? Peers stop resolving ${n.domains.join(", ")} through it.`);
  }
  main.append(header("DNS", h("button", { type: "button", class: "primary", onclick: () => edit(null) }, "New nameserver group")),
    h("p", { class: "muted", id: "dns-domain" }, "Every peer answers to its name under ", h("code", {}, settings.dns_domain),
      " (e.g. ", h("code", {}, `gateway.${settings.dns_domain}`), ") on every agent; change the domain under ", h("a", { href: "#/settings" }, "Settings"), "."),
    region.box);
  await refresh();
  return { poll: async () => { groups = await get("/api/groups"); await refresh(); } };
}

export { peerPage } from "./network.js";
