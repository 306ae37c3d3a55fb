-- Per-source limits of device sign-ins count a source as an IPv4 address or an IPv6 /64 (one
-- host owns a whole /64), not as each address of it.
ALTER TABLE device_logins ADD COLUMN source_net TEXT NOT NULL DEFAULT '';
UPDATE device_logins SET source_net = source;
