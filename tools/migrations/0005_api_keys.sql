-- Tenants' API keys (tools/tenants.py): each key's SHA-256, never the key itself.
CREATE TABLE api_keys (
    id text PRIMARY KEY,           -- public, for listing and revoking
    tenant text NOT NULL,
    name text NOT NULL,
    key_sha256 text NOT NULL UNIQUE,
    created double precision NOT NULL,  -- unix time
    revoked double precision            -- unix time; NULL while the key works
);
