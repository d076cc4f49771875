-- Retention and sealing policy per session; delivery and deletion times per task.
--
-- Sessions created before this migration keep their blobs (no policy) and accept either sealing.
ALTER TABLE sessions ADD COLUMN prompt_on_delivery BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE sessions ADD COLUMN prompt_ttl_ms      BIGINT;
ALTER TABLE sessions ADD COLUMN result_ttl_ms      BIGINT;
ALTER TABLE sessions ADD COLUMN result_on_fetch    BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE sessions ADD COLUMN sealing            TEXT    NOT NULL DEFAULT 'any'
    CHECK (sealing IN ('any', 'client_only'));

-- When the result was first handed to the caller, and when each blob was deleted.
ALTER TABLE tasks ADD COLUMN delivered_at_ms      BIGINT;
ALTER TABLE tasks ADD COLUMN prompt_deleted_at_ms BIGINT;
ALTER TABLE tasks ADD COLUMN result_deleted_at_ms BIGINT;

-- What the retention sweeper still has to look at: finished tasks with a blob not yet deleted.
CREATE INDEX tasks_retention ON tasks (session_id)
    WHERE state IN ('completed', 'failed', 'dead', 'cancelled')
      AND (prompt_deleted_at_ms IS NULL OR (result_urn IS NOT NULL AND result_deleted_at_ms IS NULL));
