-- The retention sweeper reads only what can be due: the kept blobs of closed sessions, delivered
-- tasks' blobs where the policy deletes on delivery, and, per session with a TTL, the tasks past
-- it (a range of the index below), instead of every finished task whose blobs are kept.
DROP INDEX tasks_retention;
CREATE INDEX tasks_prompt_kept ON tasks (session_id, created_at_ms)
    WHERE state IN ('completed', 'failed', 'dead', 'cancelled')
      AND prompt_deleted_at_ms IS NULL;
CREATE INDEX tasks_result_kept ON tasks (session_id, finished_at_ms)
    WHERE state IN ('completed', 'failed', 'dead', 'cancelled')
      AND result_urn IS NOT NULL AND result_deleted_at_ms IS NULL;
