-- Plain WireGuard devices (a phone with the stock app, a router): peers without an agent whose
-- tunnel ends on the server's WireGuard endpoint, which carries them into the mesh. device_key is
-- the device's own public key (NULL for agents); wg_public_key stays the peer's key in the mesh
-- (the server's key for it, derived from its own secret and device_key).
ALTER TABLE peers ADD COLUMN device_key TEXT;
CREATE UNIQUE INDEX peers_device_key ON peers (device_key);
