-- Groups every device added by a person's sign-in joins (besides its owner's groups), so that a
-- new laptop lands where policies reach it instead of in no group at all.
CREATE TABLE sign_in_groups (
    group_id TEXT PRIMARY KEY REFERENCES groups(id) ON DELETE CASCADE
);
