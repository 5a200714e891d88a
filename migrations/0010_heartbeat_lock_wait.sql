-- Heartbeat statements bound their own lock waits, so that they need no transaction
-- around them.
--
-- A heartbeat statement of RecordTime's writer may wait for a row lock only briefly (0.2 s,
-- LOCK_WAIT in store/heartbeats.py): past that it is rolled back and its heartbeats are
-- retried apart from each other, so that one row held for long delays only the heartbeats
-- on that row. The service set that bound with SET LOCAL lock_timeout in a transaction of
-- its own: BEGIN and the setting, the statement, COMMIT, three round trips where a call
-- without a deadline otherwise takes one (an autocommit statement). The functions the
-- writer calls now carry the setting: PostgreSQL sets lock_timeout when such a function is
-- entered and restores it when it returns.
--
-- lp_record_heartbeat (a lone heartbeat) is used only by the writer. lp_record_heartbeats
-- is also BatchRecordTime's statement, which waits for locks as long as its caller does, so
-- the writer's merged heartbeats get a function of their own that calls it with
-- independent entries (p_all_or_nothing false).
--
-- On Citus the setting applies on the coordinator, where the functions run; lock waits on
-- the workers are bounded by the caller's deadline instead, as before (docs/citus.md).
ALTER FUNCTION lp_record_heartbeat(uuid, uuid, varchar, integer, uuid, timestamptz,
                                   integer, integer)
    SET lock_timeout = '200ms';

-- Heartbeats merged by RecordTime's writer: lp_record_heartbeats with independent entries,
-- its lock waits bounded.
CREATE FUNCTION lp_record_merged_heartbeats(
    p_user_ids uuid[], p_course_ids uuid[], p_lesson_ids varchar[], p_seconds integer[],
    p_request_ids uuid[], p_at timestamptz[], p_allowance integer, p_retention integer)
RETURNS TABLE (idx bigint, missing boolean, reused_method text, reused_course_id text,
               reused_lesson_id varchar, credited_seconds integer, applied boolean,
               progress lesson_progress)
LANGUAGE sql
SET lock_timeout = '200ms'
AS $$
    SELECT * FROM lp_record_heartbeats(p_user_ids, p_course_ids, p_lesson_ids, p_seconds,
                                       p_request_ids, p_at, p_allowance, p_retention, false)
$$;
