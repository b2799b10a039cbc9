-- The operation in flight on a sandbox (create, start, resume, fork, pause, stop,
-- delete), set with the state it runs in and cleared when the sandbox comes to
-- rest. Reconcile decides what an interrupted operation may reclaim from it.
ALTER TABLE sandboxes ADD COLUMN operation TEXT;

-- Rows caught in flight by an older manager: derive the operation once from the
-- last recorded transition (the only place older versions kept it).
UPDATE sandboxes SET operation = CASE state
    WHEN 'stopping' THEN 'stop'
    WHEN 'deleting' THEN 'delete'
    WHEN 'creating' THEN COALESCE(
        (SELECT CASE reason WHEN 'resume' THEN 'resume' WHEN 'start' THEN 'start' ELSE 'create' END
           FROM sandbox_transitions t WHERE t.sandbox_id = sandboxes.id
           ORDER BY t.seq DESC LIMIT 1),
        'create')
    END
WHERE state IN ('creating', 'stopping', 'deleting');
