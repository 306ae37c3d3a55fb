-- Public services: a TCP or UDP port on the server's public address whose connections (or flows)
-- the server carries through a tunnel to the agent that reaches the target: a peer's overlay
-- address, or an address inside a routed network (via the route's routing peers, with failover).
-- allowed_sources is a comma-separated list of CIDRs (0.0.0.0/0 must be given to open to all).
-- owner_peer_id is set for ephemeral services that an agent published with `tern expose`; they
-- live as long as that agent keeps them.
CREATE TABLE public_services (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
    public_port BIGINT NOT NULL,
    target_ip TEXT NOT NULL,
    target_port BIGINT NOT NULL,
    allowed_sources TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    proxy_protocol BIGINT NOT NULL,
    idle_timeout_secs BIGINT NOT NULL,
    owner_peer_id TEXT REFERENCES peers(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    UNIQUE (protocol, public_port)
);

-- Groups whose peers may publish their own ports with `tern expose` (none by default).
CREATE TABLE expose_groups (
    group_id TEXT PRIMARY KEY REFERENCES groups(id) ON DELETE CASCADE
);
