-- When each blob is due for deletion, kept in the task row: the retention sweeper then reads one
-- range of an index per blob kind, whatever the number of sessions (the layout of 0005 probed
-- every session with a rule on every pass). Set when a task ends, is delivered, or its session
-- is closed or changes its retention; NULL while the task runs or when no rule applies. The
-- expressions are the router's (prompt_due!/result_due! in router/src/store/sql.rs).
ALTER TABLE tasks ADD COLUMN prompt_due_at_ms BIGINT;
ALTER TABLE tasks ADD COLUMN result_due_at_ms BIGINT;

UPDATE tasks SET
    prompt_due_at_ms = (SELECT CASE
        WHEN tasks.state NOT IN ('completed', 'failed', 'dead', 'cancelled') THEN NULL
        WHEN s.closed_at_ms IS NOT NULL THEN s.closed_at_ms
        WHEN s.prompt_on_delivery AND tasks.delivered_at_ms IS NOT NULL THEN tasks.delivered_at_ms
        WHEN s.prompt_ttl_ms IS NOT NULL THEN tasks.created_at_ms + s.prompt_ttl_ms
        END FROM sessions s WHERE s.id = tasks.session_id),
    result_due_at_ms = (SELECT CASE
        WHEN tasks.state NOT IN ('completed', 'failed', 'dead', 'cancelled')
            OR tasks.result_urn IS NULL THEN NULL
        WHEN s.closed_at_ms IS NOT NULL THEN s.closed_at_ms
        WHEN s.result_on_fetch AND tasks.delivered_at_ms IS NOT NULL THEN tasks.delivered_at_ms
        WHEN s.result_ttl_ms IS NOT NULL THEN tasks.finished_at_ms + s.result_ttl_ms
        END FROM sessions s WHERE s.id = tasks.session_id);

DROP INDEX tasks_prompt_kept;
DROP INDEX tasks_result_kept;
CREATE INDEX tasks_prompt_due ON tasks (prompt_due_at_ms)
    WHERE prompt_due_at_ms IS NOT NULL AND prompt_deleted_at_ms IS NULL;
CREATE INDEX tasks_result_due ON tasks (result_due_at_ms)
    WHERE result_due_at_ms IS NOT NULL AND result_deleted_at_ms IS NULL;
