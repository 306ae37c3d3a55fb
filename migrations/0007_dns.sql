-- Names instead of numbers. Every peer answers to <label>.<dns_domain> on every agent (the agent
-- resolves these itself); nameserver groups send queries for listed domains to nameservers
-- inside the network (e.g. the factory's DNS behind a routing peer), for the peers of their
-- distribution groups. domains and nameservers are comma-separated lists.
ALTER TABLE settings ADD COLUMN dns_domain TEXT NOT NULL DEFAULT 'tern.internal';

CREATE TABLE nameserver_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    domains TEXT NOT NULL,
    nameservers TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE nameserver_group_groups (
    nameserver_group_id TEXT NOT NULL REFERENCES nameserver_groups(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (nameserver_group_id, group_id)
);
