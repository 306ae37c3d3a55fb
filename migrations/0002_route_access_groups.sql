-- Access control for routed networks: when a route has access groups, only policies whose
-- destinations include one of them open the routed network (and only for what they allow).
CREATE TABLE route_access_groups (
    route_id TEXT NOT NULL REFERENCES routes(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (route_id, group_id)
);
