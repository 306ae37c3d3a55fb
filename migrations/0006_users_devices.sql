-- Users and their devices. Every account has a role: owner, admin, auditor (reads everything,
-- changes nothing) or user (sees and manages only their own devices). Accounts that existed
-- before roles were all full admins, so they become owners.
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'owner';

-- A device that joined by its user's sign-in (tern up without a setup key) belongs to that user;
-- deleting the user deletes the devices, disabling the user takes them off the network.
ALTER TABLE peers ADD COLUMN user_id TEXT REFERENCES users(id) ON DELETE CASCADE;

-- Device sign-ins in progress (RFC 8628 style): the agent proves its WireGuard key, gets a short
-- user code, and a signed-in person approves (or denies) that code in the console.
CREATE TABLE device_logins (
    user_code TEXT PRIMARY KEY,
    wg_public_key TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
    user_id TEXT REFERENCES users(id) ON DELETE CASCADE,
    decided_at BIGINT
);

-- The Tern groups a user's identity provider claim mapped to at their last sign-in; their
-- devices are in these groups (and leave the ones the claim no longer names).
CREATE TABLE user_groups (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)
);
