// OIDC sign-in for the console: authorization code flow with PKCE (public client), then the
// provider's ID token is exchanged for a Tern session at /api/auth/oidc.

import { api } from "./api.js";

const STATE_KEY = "tern.sso";

function b64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function random(n) {
  return b64url(crypto.getRandomValues(new Uint8Array(n)));
}

export async function startSso(cfg) {
  if (!crypto.subtle) throw new Error("single sign-on needs HTTPS (or localhost)");
  const verifier = random(48);
  const state = random(24);
  const nonce = random(24);
  const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const redirect = `${location.origin}/`;
  sessionStorage.setItem(STATE_KEY, JSON.stringify({ verifier, state, nonce, redirect, token_endpoint: cfg.token_endpoint, client_id: cfg.client_id }));
  const url = new URL(cfg.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: "code", client_id: cfg.client_id, redirect_uri: redirect, scope: cfg.scopes,
    state, nonce, code_challenge: challenge, code_challenge_method: "S256",
  }).toString();
  location.assign(url.toString());
}

export async function finishSso(params) {
  const saved = JSON.parse(sessionStorage.getItem(STATE_KEY) || "null");
  sessionStorage.removeItem(STATE_KEY);
  if (params.has("error")) throw new Error(params.get("error_description") || params.get("error"));
  if (!saved || saved.state !== params.get("state")) throw new Error("the sign-in response does not match a sign-in this browser started");
  let resp;
  try {
    resp = await fetch(saved.token_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "authorization_code", code: params.get("code"), redirect_uri: saved.redirect,
        client_id: saved.client_id, code_verifier: saved.verifier,
      }),
    });
  } catch (_) {
    throw new Error("cannot reach the identity provider's token endpoint");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error_description || body.error || `token endpoint answered HTTP ${resp.status}`);
  const token = body.id_token || body.access_token;
  if (!token) throw new Error("the identity provider returned no token");
  if (body.id_token) {
    // The nonce ties the ID token to this sign-in (no replayed or injected tokens).
    let claims = {};
    try { claims = JSON.parse(atob(body.id_token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))); } catch (_) { /* checked below */ }
    if (claims.nonce !== undefined && claims.nonce !== saved.nonce) throw new Error("the ID token was not issued for this sign-in (nonce mismatch)");
  }
  return api("POST", "/api/auth/oidc", { token }, { anonymous: true });
}
