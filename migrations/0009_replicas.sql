-- Several management replicas on one PostgreSQL: each live replica keeps a row here with a fresh
-- heartbeat; peers.replica names the replica holding a peer's sync stream, so that a replica that
-- dies (no heartbeat) has its peers marked offline by the survivors, and a replica that starts
-- does not mark offline the peers its siblings serve.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    -- The relay URLs this replica hands out (JSON): every replica's maps list the relays of all
    -- live replicas, oldest replica first, so that all agents meet on the same TCP relay.
    relays TEXT NOT NULL DEFAULT ''
);
ALTER TABLE peers ADD COLUMN replica TEXT;
