-- Veil router store, PostgreSQL. Times are Unix milliseconds; hashes are raw bytes; JSON is
-- stored as TEXT so that both backends hand back exactly what was written.

CREATE TABLE sessions (
    id               UUID PRIMARY KEY,
    owner            TEXT    NOT NULL,
    kind             TEXT    NOT NULL CHECK (kind IN ('dedicated', 'pooled')),
    private          BOOLEAN NOT NULL,
    allowlist_source TEXT    NOT NULL CHECK (allowlist_source IN ('router', 'static', 'contract')),
    created_at_ms    BIGINT  NOT NULL,
    expires_at_ms    BIGINT,
    closed_at_ms     BIGINT
);
CREATE INDEX sessions_by_owner ON sessions (owner, created_at_ms DESC, id DESC);

-- A private session's allowed miners, in the order they were given.
CREATE TABLE session_miners (
    session_id UUID   NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    position   BIGINT NOT NULL,
    miner      TEXT   NOT NULL,
    PRIMARY KEY (session_id, position)
);
CREATE INDEX session_miners_by_miner ON session_miners (miner, session_id);

-- Fairness across sessions: when each session was last served, as a value of `service_counter`
-- (monotonic, unlike wall-clock time). Kept apart from `sessions` so that leasing never locks a
-- session row (closing a session locks it, then its tasks; leasing locks a task, then this row).
CREATE SEQUENCE service_counter;
CREATE TABLE session_service (
    session_id  UUID   PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    last_served BIGINT NOT NULL
);

CREATE TABLE tasks (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- FIFO order
    id                  UUID   NOT NULL UNIQUE,
    session_id          UUID   NOT NULL REFERENCES sessions (id),
    prompt_urn          TEXT   NOT NULL,
    prompt_hash         BYTEA  NOT NULL CHECK (length(prompt_hash) = 32),
    prompt_scope        BIGINT NOT NULL,
    key_version         BIGINT NOT NULL,
    model               TEXT   NOT NULL,
    params              TEXT   NOT NULL,
    state               TEXT   NOT NULL CHECK (state IN ('queued', 'leased', 'completed', 'failed', 'dead', 'cancelled')),
    attempts            BIGINT NOT NULL DEFAULT 0,
    max_attempts        BIGINT NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    deadline_ms         BIGINT,
    submitted_by        TEXT   NOT NULL,
    lease_id            UUID,
    leased_by           TEXT,
    lease_expires_at_ms BIGINT,
    result_urn          TEXT,
    result_hash         BYTEA,
    result_size         BIGINT,
    result_miner        TEXT,
    result_signature    BYTEA,
    prompt_tokens       BIGINT,
    completion_tokens   BIGINT,
    finish_reason       TEXT,
    error_code          TEXT,
    error_message       TEXT,
    finished_at_ms      BIGINT
);
CREATE INDEX tasks_queued ON tasks (session_id, seq) WHERE state = 'queued';
CREATE INDEX tasks_open_by_session ON tasks (session_id) WHERE state IN ('queued', 'leased');
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at_ms) WHERE state = 'leased';
CREATE INDEX tasks_deadline ON tasks (deadline_ms)
    WHERE state IN ('queued', 'leased') AND deadline_ms IS NOT NULL;

-- One row per lease (attempt), kept after it ends so late results can be matched to it.
CREATE TABLE leases (
    lease_id      UUID   PRIMARY KEY,
    task_id       UUID   NOT NULL REFERENCES tasks (id),
    miner         TEXT   NOT NULL,
    attempt       BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX leases_by_task ON leases (task_id);

CREATE TABLE api_keys (
    id              UUID    PRIMARY KEY,
    owner           TEXT    NOT NULL,
    hash            BYTEA   NOT NULL UNIQUE CHECK (length(hash) = 32),
    prefix          TEXT    NOT NULL,
    admin           BOOLEAN NOT NULL,
    rate_per_minute BIGINT  NOT NULL,
    max_concurrent  BIGINT  NOT NULL,
    default_session UUID    REFERENCES sessions (id),
    created_at_ms   BIGINT  NOT NULL,
    revoked_at_ms   BIGINT
);

CREATE TABLE miner_sessions (
    token_hash    BYTEA  PRIMARY KEY CHECK (length(token_hash) = 32),
    miner         TEXT   NOT NULL,
    recipient     BYTEA  NOT NULL CHECK (length(recipient) = 32),
    models        TEXT   NOT NULL, -- JSON [[name, sha256 hex or null], …]
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX miner_sessions_by_expiry ON miner_sessions (expires_at_ms);

CREATE TABLE nonces (
    signer        TEXT   NOT NULL,
    nonce         BYTEA  NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (signer, nonce)
);
CREATE INDEX nonces_by_expiry ON nonces (expires_at_ms);

-- Hash-chained audit log. No foreign keys: entries outlive what they mention.
CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY CHECK (seq >= 1),
    at_ms       BIGINT NOT NULL,
    actor       TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    session_id  UUID,
    task_id     UUID,
    miner       TEXT,
    key_version BIGINT,
    detail      TEXT   NOT NULL,
    prev_hash   BYTEA  NOT NULL,
    hash        BYTEA  NOT NULL
);
