-- Peer approval: with it required, a newly registered peer sees no one and no one sees it until
-- an admin approves it (peers registered before keep working).
ALTER TABLE peers ADD COLUMN approved BIGINT NOT NULL DEFAULT 1;
ALTER TABLE settings ADD COLUMN peer_approval_required BIGINT NOT NULL DEFAULT 0;
