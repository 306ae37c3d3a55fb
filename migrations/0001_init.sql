-- Tern management schema. Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Times are unix milliseconds (BIGINT); ids are random text; booleans are BIGINT 0/1 (sqlx's Any
-- driver cannot decode SQLite BOOLEAN columns).

CREATE TABLE settings (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    overlay_range TEXT NOT NULL,
    mtu BIGINT NOT NULL,
    peer_login_expiry_secs BIGINT NOT NULL,
    ephemeral_ttl_secs BIGINT NOT NULL,
    network_serial BIGINT NOT NULL
);
INSERT INTO settings (id, overlay_range, mtu, peer_login_expiry_secs, ephemeral_ttl_secs, network_serial)
VALUES (1, '100.64.0.0/10', 1280, 2592000, 600, 1);

-- Server-owned secrets (management X25519 key, token signing keys, relay secret).
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    disabled BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE access_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    UNIQUE (user_id, name)
);

CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    builtin BIGINT NOT NULL
);
INSERT INTO groups (id, name, builtin) VALUES ('all', 'All', 1);

CREATE TABLE setup_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    reusable BIGINT NOT NULL,
    usage_limit BIGINT NOT NULL,
    used_count BIGINT NOT NULL,
    expires_at BIGINT,
    ephemeral BIGINT NOT NULL,
    revoked BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT
);

CREATE TABLE setup_key_groups (
    setup_key_id TEXT NOT NULL REFERENCES setup_keys(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (setup_key_id, group_id)
);

CREATE TABLE peers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    wg_public_key TEXT NOT NULL UNIQUE,
    overlay_ip TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    setup_key_id TEXT REFERENCES setup_keys(id) ON DELETE SET NULL,
    ephemeral BIGINT NOT NULL,
    connected BIGINT NOT NULL,
    login_expiration_enabled BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    last_login BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE peer_groups (
    peer_id TEXT NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (peer_id, group_id)
);

CREATE TABLE policies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    protocol TEXT NOT NULL,
    ports TEXT NOT NULL,
    bidirectional BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE policy_groups (
    policy_id TEXT NOT NULL REFERENCES policies(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    side TEXT NOT NULL CHECK (side IN ('src', 'dst')),
    PRIMARY KEY (policy_id, group_id, side)
);

CREATE TABLE routes (
    id TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    description TEXT NOT NULL,
    routing_peer_id TEXT REFERENCES peers(id) ON DELETE CASCADE,
    routing_group_id TEXT REFERENCES groups(id) ON DELETE CASCADE,
    metric BIGINT NOT NULL,
    masquerade BIGINT NOT NULL,
    enabled BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    CHECK ((routing_peer_id IS NULL) <> (routing_group_id IS NULL))
);

CREATE TABLE route_groups (
    route_id TEXT NOT NULL REFERENCES routes(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (route_id, group_id)
);

CREATE TABLE audit_events (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_events_created ON audit_events (created_at);
