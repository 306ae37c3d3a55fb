-- Sealed logins already used (sender key + nonce, hex), kept until their timestamp window has
-- passed: a captured login cannot be played again, not after a restart, not on another replica.
CREATE TABLE login_nonces (
    id TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX login_nonces_expiry ON login_nonces (expires_at);
