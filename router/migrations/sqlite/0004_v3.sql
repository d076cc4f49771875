-- /api/v3 read tokens: bearer tokens of a session's owner for the read endpoints of that one
-- session (task state, sealed result, stream, close). Only the SHA-256 of a token is stored;
-- a token expires after an hour at most, never after its session.
CREATE TABLE read_tokens (
    token_hash    BLOB    PRIMARY KEY CHECK (length(token_hash) = 32),
    owner         TEXT    NOT NULL,
    session_id    BLOB    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX read_tokens_by_expiry ON read_tokens (expires_at_ms);
