-- Key lifecycle: who sealed a task's blobs, and the journal of the rewrap job.
--
-- Tasks created before this migration came through /api/v2, so the router sealed them.
ALTER TABLE tasks ADD COLUMN sealed_by TEXT NOT NULL DEFAULT 'router'
    CHECK (sealed_by IN ('router', 'client'));

-- Blob counts per key version (status, destroy confirmation) and rewrap candidates.
CREATE INDEX tasks_by_key_version ON tasks (key_version, id);

-- One row per task being re-sealed under the active key version. A row is written before any
-- new blob can become visible and names every new blob as soon as its URN is known, so that a
-- job killed at any point can be finished by the next run: `pending` rows are abandoned (their
-- new blobs deleted), `switched` rows (the task already points at the new blobs) get their old
-- blobs deleted. The switch of the task's references and the move to `switched` are one
-- transaction, and a row leaves `pending` only once, so a new blob is either referenced or
-- deleted, never both.
CREATE TABLE key_rewraps (
    id             BLOB    PRIMARY KEY,
    task_id        BLOB    NOT NULL,
    old_version    INTEGER NOT NULL,
    new_version    INTEGER NOT NULL,
    old_prompt_urn TEXT,
    old_result_urn TEXT,
    new_prompt_urn TEXT,
    new_result_urn TEXT,
    state          TEXT    NOT NULL CHECK (state IN ('pending', 'switched', 'abandoned')),
    started_at_ms  INTEGER NOT NULL
);
