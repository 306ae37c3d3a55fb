// The network as a picture (peers, the relay, routing peers with their LANs, paths colored by
// type) and the page of one peer. SVG built here, no library.

import { get, put } from "./api.js";
import {
  h, ago, fmtTime, badge, table, dialog, field, input, checkbox, groupPicker, checkedValues, onSubmit, formError, notify,
  actorName, actionWords, fmtBytes,
} from "./ui.js";

const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.entries(v).forEach(([dk, dv]) => el.setAttribute(`data-${dk}`, String(dv)));
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const PATH_WORDS = { direct: "direct", turn_relay: "via TURN", tcp_relay: "via the TCP relay", connecting: "connecting" };
// What the server's WireGuard endpoint sees of a plain WireGuard device.
function wireguardCard(w) {
  return h("section", { class: "card wireguard", "aria-label": "WireGuard" },
    h("h2", {}, "WireGuard"),
    h("p", { class: "muted" }, "This device runs no agent: its tunnel ends on this server, which carries it to the other peers over the TCP relay, under the same policies and routes."),
    h("dl", { class: "facts" },
      h("dt", {}, "Its public key"), h("dd", {}, h("code", {}, w.public_key)),
      h("dt", {}, "Last handshake"), h("dd", { class: "handshake" }, w.last_handshake_secs != null ? `${w.last_handshake_secs} s ago` : "none since the server started"),
      h("dt", {}, "Received, sent"), h("dd", { class: "bytes" }, `${fmtBytes(w.rx_bytes)}, ${fmtBytes(w.tx_bytes)}`)));
}

export const REASON_WORDS = {
  hosted_device: "a WireGuard device the server hosts",
  ice_no_direct_pair: "no direct pair got through the NATs",
  no_common_family: "no address family in common (IPv4 only on one side, IPv6 only on the other)",
  nat_symmetric_both: "both NATs give a new port per destination (symmetric)",
  nat_symmetric_here: "this side's NAT gives a new port per destination (symmetric)",
  nat_symmetric_peer: "the other side's NAT gives a new port per destination (symmetric)",
  no_public_address_here: "no STUN answer on this side (UDP blocked?)",
  no_public_address_peer: "no STUN answer on the other side (UDP blocked?)",
  ice_failed: "direct attempts failed; retrying",
  ice_retrying: "retrying a direct path",
  ice_connecting: "trying a direct path",
  ice_waiting_for_offer: "waiting for the other side's offer",
  ice_starting: "starting a direct attempt",
  peer_offline: "the other peer is offline",
  direct: "direct ICE pair",
};

const inGroups = (p, groups) => groups.some((g) => p.groups.includes(g));
// Routes a peer serves: by name, or through a routing group it belongs to.
const servedBy = (routes, p) => routes.filter((r) => r.enabled && (r.routing_peer === p.id || (r.routing_group && p.groups.includes(r.routing_group))));

// Where a node's name goes (see the call).
function nameAt(at, router, few) {
  const c = Math.cos(at.a), sn = Math.sin(at.a);
  if (router && (few || Math.abs(c) > 0.5 || sn > 0.5)) return { x: at.x, y: at.y - 24, "text-anchor": "middle", class: "name" };
  if (router) return { x: at.x + 24, y: at.y + 5, "text-anchor": "start", class: "name" };
  return {
    x: at.x + 26 * c, y: at.y + 26 * sn + 5, class: "name",
    "text-anchor": c > 0.3 ? "start" : c < -0.3 ? "end" : "middle",
  };
}

// Peers on a circle around the relay; relayed paths run through the relay, direct ones straight
// across; each routing peer's LANs hang off it, outwards.
export function networkPicture(peers, routes) {
  const few = peers.length <= 2;
  const lanRows = Math.max(0, ...peers.map((p) => servedBy(routes, p).length));
  const W = 720, H = few ? 120 + lanRows * 60 : 460, cx = W / 2, cy = few ? 60 : H / 2;
  const r = few ? 200 : Math.min(W, H) / 2 - 80;
  const pos = new Map();
  peers.forEach((p, i) => {
    // One or two peers side by side with the relay (one left of it); more around the circle
    // from the top.
    const start = few ? Math.PI : -Math.PI / 2;
    const a = start + (2 * Math.PI * i) / Math.max(peers.length, 1);
    pos.set(p.id, { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a), a });
  });
  const edges = [];
  const seen = new Set();
  for (const p of peers) {
    if (!p.connected) continue;
    for (const c of p.connections || []) {
      const q = pos.get(c.peer_id);
      const key = [p.id, c.peer_id].sort().join("|");
      if (!q || seen.has(key)) continue;
      seen.add(key);
      const a = pos.get(p.id);
      const cls = `edge ${c.kind}`;
      const data = { from: p.id, to: c.peer_id, kind: c.kind };
      const title = s("title", {}, `${p.name} ↔ ${(peers.find((x) => x.id === c.peer_id) || {}).name || ""}: ${PATH_WORDS[c.kind] || c.kind}${c.rtt_ms != null ? `, ${c.rtt_ms} ms` : ""}`);
      if (c.kind === "turn_relay" || c.kind === "tcp_relay") {
        edges.push(s("path", { class: cls, dataset: data, d: `M${a.x},${a.y} L${cx},${cy} L${q.x},${q.y}` }, title));
      } else {
        edges.push(s("line", { class: cls, dataset: data, x1: a.x, y1: a.y, x2: q.x, y2: q.y }, title));
      }
    }
  }
  const lans = [];
  for (const p of peers) {
    const at = pos.get(p.id);
    servedBy(routes, p).forEach((route, i) => {
      // Outwards on the circle; below the node when the picture holds one or two peers.
      const d = 54 + i * 26;
      const x = few ? at.x : cx + (r + d) * Math.cos(at.a);
      const y = few ? at.y + 16 + d : cy + (r + d) * Math.sin(at.a);
      lans.push(s("g", { class: "lan", dataset: { network: route.network, peer: p.id } },
        s("line", { class: "lan-link", x1: at.x, y1: at.y, x2: x, y2: y }),
        s("rect", { x: x - 58, y: y - 11, width: 116, height: 22, rx: 4 }),
        s("text", { x, y: y + 4, "text-anchor": "middle" }, route.network)));
    });
  }
  const nodes = peers.map((p) => {
    const at = pos.get(p.id);
    const router = servedBy(routes, p).length > 0;
    return s("a", { href: `#/peer/${p.id}`, class: `node ${p.connected ? "online" : "offline"}${router ? " router" : ""}`, dataset: { peer: p.id } },
      s("title", {}, `${p.name} (${p.overlay_ip}), ${p.connected ? "online" : "offline"}`),
      s("circle", { cx: at.x, cy: at.y, r: 16 }),
      // The name outside the circle, away from the relay and the paths; a routing peer's LANs
      // hang outwards (below it when the picture holds one or two peers), so its name goes
      // where they are not: above it when they go sideways or down, beside it when up.
      s("text", nameAt(at, router, few), p.name));
  });
  const relay = s("g", { class: "relay-node" },
    s("rect", { x: cx - 30, y: cy - 14, width: 60, height: 28, rx: 6 }),
    s("text", { x: cx, y: cy + 5, "text-anchor": "middle" }, "relay"));
  const legend = h("p", { class: "legend muted small" },
    h("span", { class: "key direct" }, "direct"), " ", h("span", { class: "key turn_relay" }, "via TURN"), " ",
    h("span", { class: "key tcp_relay" }, "via the TCP relay"), " ", h("span", { class: "key connecting" }, "connecting"),
    " · click a peer for its page");
  return h("section", { class: "card network", "aria-label": "Network" },
    h("h2", {}, "Network"),
    peers.length
      ? s("svg", { class: "network", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${peers.length} peers and their paths` },
        lans, edges, relay, nodes)
      : h("p", { class: "muted" }, "No peers yet."),
    legend);
}

// ------------------------------------------------------------------------------------------------
// One peer

const protoWords = (pol) => (pol.protocol === "any" ? "everything" : `${pol.protocol}${pol.ports.length ? ` ${pol.ports.join(", ")}` : ""}`);
const ROUTE_STATE = { installed: "installed", conflict: "skipped: overlaps a network it is attached to", unserved: "no routing peer reachable", failed: "the kernel refused it", no_access: "installed, but no policy lets it use the network" };

export function editPeer(p, groups, after) {
  const form = h("form", { novalidate: true },
    formError(),
    field("Name", input("name", { value: p.name, required: true })),
    h("fieldset", {}, h("legend", {}, "Groups"), groupPicker("groups", groups, p.groups, { skipAll: true }),
      h("p", { class: "field-error", hidden: true })),
    checkbox("login_expiration_enabled", "Require re-login when the login expires", p.login_expiration_enabled),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save")));
  const d = dialog(`Edit ${p.name}`, form);
  onSubmit(form, async (f) => {
    const keep = p.groups.filter((g) => groups.find((x) => x.id === g && x.builtin));
    await put(`/api/peers/${p.id}`, {
      name: f.elements.name.value,
      groups: [...keep, ...checkedValues(f, "groups")],
      login_expiration_enabled: f.elements.login_expiration_enabled.checked,
    });
    d.close();
    notify("Peer saved");
    await after();
  });
}

export async function peerPage(main) {
  const id = decodeURIComponent((location.hash.match(/^#\/peer\/([\w-]+)/) || [])[1] || "");
  const box = h("div", { class: "live" });
  const heading = h("h1", { tabindex: -1 }, "Peer");
  let last = "";
  let current = null;
  let groups = [];
  const gname = (gid) => (groups.find((g) => g.id === gid) || { name: gid }).name;
  const load = async () => {
    const [peers, routes, policies, events, gs] = await Promise.all([
      get("/api/peers"), get("/api/routes"), get("/api/policies"),
      get(`/api/audit?target=${encodeURIComponent(id)}&limit=20`), get("/api/groups")]);
    groups = gs;
    const key = JSON.stringify([peers, routes, policies, events, gs]);
    if (key === last) return;
    last = key;
    box.replaceChildren(render(peers, routes, policies, events));
  };
  function render(peers, routes, policies, events) {
    const p = peers.find((x) => x.id === id);
    current = p;
    if (p) {
      heading.textContent = p.name;
      document.title = `${p.name} · Tern`;
    }
    if (!p) return h("p", { class: "form-error", role: "alert" }, "This peer does not exist (any more): it may have been deleted. ", h("a", { href: "#/peers" }, "Back to the peers"));
    const name = (pid) => (peers.find((x) => x.id === pid) || { name: "a removed peer" }).name;
    const serves = servedBy(routes, p);
    const uses = routes.filter((r) => r.enabled && !serves.includes(r) && inGroups(p, r.groups));
    const on = policies.filter((x) => x.enabled);
    const out = on.filter((x) => inGroups(p, x.sources) || (x.bidirectional && inGroups(p, x.destinations)));
    const inn = on.filter((x) => inGroups(p, x.destinations) || (x.bidirectional && inGroups(p, x.sources)));
    return h("div", { class: "peer-page", dataset: { peer: p.id } },
      h("section", { class: "card", "aria-label": "Summary" },
        h("h2", {}, p.name, " ", p.connected ? badge("online", "ok") : badge("offline", "off"), p.approved ? null : badge("awaiting approval", "warn")),
        h("dl", { class: "facts" },
          h("dt", {}, "Overlay address"), h("dd", {}, h("code", {}, p.overlay_ip)),
          h("dt", {}, "DNS name"), h("dd", { class: "dns-name" }, p.dns_name ? h("code", {}, p.dns_name) : "—"),
          h("dt", {}, "Public address"), h("dd", { class: "endpoint", title: "where its connection to this server comes from" },
            p.wireguard ? (p.wireguard.endpoint ? h("code", {}, p.wireguard.endpoint) : "— (no handshake since the server started)")
              : p.endpoint ? h("code", {}, p.endpoint) : "— (offline)"),
          p.wireguard ? null : h("dt", {}, "Host name"), p.wireguard ? null : h("dd", {}, p.hostname || "—"),
          h("dt", {}, "OS, agent"), h("dd", {}, p.wireguard ? "a plain WireGuard device (no agent)" : `${p.os || "—"}, ${p.agent_version || "—"}`),
          h("dt", {}, "Last seen"), h("dd", { title: fmtTime(p.last_seen) }, p.connected ? "now" : ago(p.last_seen)),
          h("dt", {}, "Joined"), h("dd", { title: fmtTime(p.created_at) }, ago(p.created_at)),
          h("dt", {}, "Groups"), h("dd", { class: "groups" }, h("span", { class: "chips" }, p.groups.map((g) => badge(gname(g)))), " ",
            h("button", { type: "button", onclick: () => editPeer(current, groups, async () => { last = ""; await load(); }) }, "Edit")))),
      p.wireguard ? wireguardCard(p.wireguard) : h("section", { class: "card", "aria-label": "Paths" },
        h("h2", {}, "Paths"),
        p.connected
          ? table(["To", "Path", "Round trip", "Loss", "Why"], (p.connections || []).map((c) => h("tr", { dataset: { to: c.peer_id, kind: c.kind } },
            h("td", {}, h("a", { href: `#/peer/${c.peer_id}` }, name(c.peer_id))),
            h("td", {}, badge(PATH_WORDS[c.kind] || c.kind, c.kind === "direct" ? "ok" : c.kind === "connecting" ? "warn" : "relay")),
            h("td", {}, c.rtt_ms != null ? `${c.rtt_ms} ms` : "—"),
            h("td", {}, c.loss_pct != null ? `${c.loss_pct}%` : "—"),
            h("td", {}, c.reason ? (REASON_WORDS[c.reason] || c.reason) : "—"))),
            p.alone ? "No other peer is in reach: no enabled policy connects its groups with anyone. Put it in a group a policy covers (Edit, above)." : "No paths reported yet.")
          : h("p", { class: "muted" }, "Offline: no paths.")),
      h("section", { class: "card", "aria-label": "Routes" },
        h("h2", {}, "Routes"),
        serves.length ? h("div", {}, h("h3", {}, "Serves"), h("ul", { class: "plain" }, serves.map((r) =>
          h("li", { dataset: { network: r.network } }, h("code", {}, r.network), " ", h("span", { class: `small serving ${r.serving && r.serving.startsWith("served") ? "ok" : "bad"}` }, r.serving || ""))))) : null,
        uses.length ? h("div", {}, h("h3", {}, "Uses"), h("ul", { class: "plain" }, uses.map((r) => {
          const mine = (r.clients || []).find((c) => c.peer_id === p.id);
          return h("li", { dataset: { network: r.network } }, h("code", {}, r.network), " ",
            h("span", { class: `small ${mine && mine.state !== "installed" ? "bad" : "muted"}`, title: mine ? mine.detail || "" : "" },
              mine ? ROUTE_STATE[mine.state] || mine.state : p.connected ? "not reported yet" : "offline"));
        }))) : null,
        !serves.length && !uses.length ? h("p", { class: "muted" }, "It neither serves nor uses a route.") : null),
      h("section", { class: "card", "aria-label": "Access" },
        h("h2", {}, "What it can reach, and who can reach it"),
        out.length ? h("ul", { class: "plain reach-out" }, out.map((x) => h("li", {}, `${protoWords(x)} to ${x.destinations.map(gname).join(", ")} (policy ${x.name})`)))
          : h("p", { class: "muted reach-out" }, "No enabled policy lets it reach anyone."),
        inn.length ? h("ul", { class: "plain reach-in" }, inn.map((x) => h("li", {}, `${x.sources.map(gname).join(", ")} may use ${protoWords(x)} (policy ${x.name})`)))
          : h("p", { class: "muted reach-in" }, "No enabled policy lets anyone reach it.")),
      h("section", { class: "card", "aria-label": "Recent events" },
        h("h2", {}, "Recent events"),
        events.length ? h("ul", { class: "plain events" }, events.map((e) => h("li", {}, h("span", { title: fmtTime(e.created_at) }, ago(e.created_at)), ` · ${actorName(e.actor)} ${actionWords(e.action)}`)))
          : h("p", { class: "muted" }, "No events.")));
  }
  main.append(h("div", { class: "page-head" }, heading, h("div", { class: "actions" }, h("a", { href: "#/peers" }, "All peers"))), box);
  await load();
  return { poll: load };
}
