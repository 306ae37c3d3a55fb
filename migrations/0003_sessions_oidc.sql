-- Console sign-in sessions: an admin JWT names its session, so signing out (or disabling the
-- user) ends it on the server, not only in the browser.
CREATE TABLE admin_sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    method TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked BIGINT NOT NULL
);
CREATE INDEX admin_sessions_user ON admin_sessions (user_id);

-- Admins that sign in through an OIDC identity provider are linked by the token's subject.
ALTER TABLE users ADD COLUMN oidc_subject TEXT;
CREATE UNIQUE INDEX users_oidc_subject ON users (oidc_subject);
