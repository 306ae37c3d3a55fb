-- Routes follow policies: a new route without access groups opens its network only as far as
-- policies towards its routing peer's groups allow. Letting every peer it is distributed to reach
-- the whole network is an explicit choice; routes made before keep that behaviour.
ALTER TABLE routes ADD COLUMN open_to_groups BIGINT NOT NULL DEFAULT 0;
UPDATE routes SET open_to_groups = 1
    WHERE id NOT IN (SELECT route_id FROM route_access_groups);
