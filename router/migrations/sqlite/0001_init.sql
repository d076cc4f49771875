-- Veil router store, SQLite. Times are Unix milliseconds; hashes are raw bytes; JSON is
-- stored as TEXT so that both backends hand back exactly what was written.

CREATE TABLE sessions (
    id               BLOB PRIMARY KEY,
    owner            TEXT    NOT NULL,
    kind             TEXT    NOT NULL CHECK (kind IN ('dedicated', 'pooled')),
    private          BOOLEAN NOT NULL,
    allowlist_source TEXT    NOT NULL CHECK (allowlist_source IN ('router', 'static', 'contract')),
    created_at_ms    INTEGER  NOT NULL,
    expires_at_ms    INTEGER,
    closed_at_ms     INTEGER
);
CREATE INDEX sessions_by_owner ON sessions (owner, created_at_ms DESC, id DESC);

-- A private session's allowed miners, in the order they were given.
CREATE TABLE session_miners (
    session_id BLOB   NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    miner      TEXT   NOT NULL,
    PRIMARY KEY (session_id, position)
);
CREATE INDEX session_miners_by_miner ON session_miners (miner, session_id);

-- Fairness across sessions: when each session was last served, as a value of a counter that only
-- grows (unlike wall-clock time). Kept apart from `sessions`, as in the PostgreSQL schema.
CREATE TABLE session_service (
    session_id  BLOB    PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    last_served INTEGER NOT NULL
);
CREATE INDEX session_service_by_last_served ON session_service (last_served);

CREATE TABLE tasks (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT, -- FIFO order
    id                  BLOB   NOT NULL UNIQUE,
    session_id          BLOB   NOT NULL REFERENCES sessions (id),
    prompt_urn          TEXT   NOT NULL,
    prompt_hash         BLOB  NOT NULL CHECK (length(prompt_hash) = 32),
    prompt_scope        INTEGER NOT NULL,
    key_version         INTEGER NOT NULL,
    model               TEXT   NOT NULL,
    params              TEXT   NOT NULL,
    state               TEXT   NOT NULL CHECK (state IN ('queued', 'leased', 'completed', 'failed', 'dead', 'cancelled')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL,
    created_at_ms       INTEGER NOT NULL,
    deadline_ms         INTEGER,
    submitted_by        TEXT   NOT NULL,
    lease_id            BLOB,
    leased_by           TEXT,
    lease_expires_at_ms INTEGER,
    result_urn          TEXT,
    result_hash         BLOB,
    result_size         INTEGER,
    result_miner        TEXT,
    result_signature    BLOB,
    prompt_tokens       INTEGER,
    completion_tokens   INTEGER,
    finish_reason       TEXT,
    error_code          TEXT,
    error_message       TEXT,
    finished_at_ms      INTEGER
);
CREATE INDEX tasks_queued ON tasks (session_id, seq) WHERE state = 'queued';
CREATE INDEX tasks_open_by_session ON tasks (session_id) WHERE state IN ('queued', 'leased');
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at_ms) WHERE state = 'leased';
CREATE INDEX tasks_deadline ON tasks (deadline_ms)
    WHERE state IN ('queued', 'leased') AND deadline_ms IS NOT NULL;

-- One row per lease (attempt), kept after it ends so late results can be matched to it.
CREATE TABLE leases (
    lease_id      BLOB   PRIMARY KEY,
    task_id       BLOB   NOT NULL REFERENCES tasks (id),
    miner         TEXT   NOT NULL,
    attempt       INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX leases_by_task ON leases (task_id);

CREATE TABLE api_keys (
    id              BLOB    PRIMARY KEY,
    owner           TEXT    NOT NULL,
    hash            BLOB   NOT NULL UNIQUE CHECK (length(hash) = 32),
    prefix          TEXT    NOT NULL,
    admin           BOOLEAN NOT NULL,
    rate_per_minute INTEGER  NOT NULL,
    max_concurrent  INTEGER  NOT NULL,
    default_session BLOB    REFERENCES sessions (id),
    created_at_ms   INTEGER  NOT NULL,
    revoked_at_ms   INTEGER
);

CREATE TABLE miner_sessions (
    token_hash    BLOB  PRIMARY KEY CHECK (length(token_hash) = 32),
    miner         TEXT   NOT NULL,
    recipient     BLOB  NOT NULL CHECK (length(recipient) = 32),
    models        TEXT   NOT NULL, -- JSON [[name, sha256 hex or null], …]
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX miner_sessions_by_expiry ON miner_sessions (expires_at_ms);

CREATE TABLE nonces (
    signer        TEXT   NOT NULL,
    nonce         BLOB  NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (signer, nonce)
);
CREATE INDEX nonces_by_expiry ON nonces (expires_at_ms);

-- Hash-chained audit log. No foreign keys: entries outlive what they mention.
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY CHECK (seq >= 1),
    at_ms       INTEGER NOT NULL,
    actor       TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    session_id  BLOB,
    task_id     BLOB,
    miner       TEXT,
    key_version INTEGER,
    detail      TEXT   NOT NULL,
    prev_hash   BLOB  NOT NULL,
    hash        BLOB  NOT NULL
);
