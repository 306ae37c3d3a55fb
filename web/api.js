// The console's only way to the server: the public REST API, with the session token kept in
// sessionStorage (gone when the tab closes) and every error turned into an ApiError.

const KEY = "tern.session";

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `request failed (HTTP ${status})`);
    this.status = status;
    this.kind = body && body.error ? body.error : "error";
    this.field = body && body.field ? body.field : null;
  }
}

export const session = {
  get() {
    try {
      const s = JSON.parse(sessionStorage.getItem(KEY) || "null");
      if (s && s.expires_at * 1000 > Date.now()) return s;
    } catch (_) { /* corrupt entry: treated as signed out */ }
    sessionStorage.removeItem(KEY);
    return null;
  },
  set(reply) {
    sessionStorage.setItem(KEY, JSON.stringify({
      token: reply.token, expires_at: reply.expires_at, user: reply.user,
    }));
  },
  clear() { sessionStorage.removeItem(KEY); },
};

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export async function api(method, path, body, { anonymous = false } = {}) {
  const headers = { Accept: "application/json" };
  const s = session.get();
  if (s && !anonymous) headers.Authorization = `Bearer ${s.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      // Revalidate every time: the peer list answers 304 when nothing changed.
      cache: "no-cache", credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, { error: "network", message: "cannot reach the server; check your connection" });
  }
  if (resp.status === 204) return null;
  let data = null;
  const text = await resp.text();
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { message: text.slice(0, 200) }; }
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, data);
    if (resp.status === 401 && !anonymous) onUnauthorized(err);
    throw err;
  }
  return data;
}

export const get = (p) => api("GET", p);
export const post = (p, b) => api("POST", p, b === undefined ? {} : b);
export const put = (p, b) => api("PUT", p, b);
export const del = (p) => api("DELETE", p);
