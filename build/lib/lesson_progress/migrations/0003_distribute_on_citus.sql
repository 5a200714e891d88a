-- One schema for a single PostgreSQL and for Citus (distributed PostgreSQL).
--
-- Citus shards a table by one "distribution column"; every unique key and primary key of a
-- sharded table must include it. The progress tables are all sharded by course_id, in one
-- co-location group (a course's rows of every table live on the same worker), and the
-- catalog (courses, lessons) and the service's secrets are replicated to every node
-- (reference tables). docs/citus.md gives the reasons and the trade-offs.
--
-- Part 1 runs on both engines, so that the schema is the same whichever runs it:
-- progress_events is keyed by (course_id, event_id). event_id still comes from the one
-- identity sequence, so it stays unique; the key also serves WatchProgress (the events of
-- a course after an id), which progress_events_course_idx served before.
ALTER TABLE progress_events
    DROP CONSTRAINT progress_events_pkey,
    ADD PRIMARY KEY (course_id, event_id);
DROP INDEX progress_events_course_idx;

-- Part 2 runs only where the citus extension is installed; on one PostgreSQL it does
-- nothing.
--
-- * processed_requests is keyed by (user_id, request_id, course_id) instead of (user_id,
--   request_id): Citus cannot enforce a unique key without the distribution column. This
--   is the one difference between the engines' schemas, and it narrows the request-id
--   scope on Citus from "per learner" to "per learner and course" (docs/citus.md,
--   "Request-id scope"). One PostgreSQL keeps its key, and with it the wider scope.
-- * The set_updated_at triggers stay: each only sets NEW.updated_at on the row it fires
--   for, which is as safe on a shard as on a table; Citus accepts them on its tables only
--   with citus.enable_unsafe_triggers, set here for this transaction.
-- * Once courses is a reference table, Citus adds the tables referencing it to its metadata
--   as local tables, and then refuses a key from such a table to a distributed one and
--   cannot convert a table with an identity column. So the attempt history's key to its
--   lesson row and the outbox's key to its course are dropped while the tables are
--   distributed and added back afterwards, unchanged.
-- * Existing rows are copied into the shards; on a database that already held data run
--   truncate_local_data_after_distributing_table() for each table afterwards (Citus says
--   so in a NOTICE) to free the copies left in the coordinator's local tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    SET LOCAL citus.enable_unsafe_triggers TO on;
    SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
    ALTER TABLE lesson_attempts
        DROP CONSTRAINT lesson_attempts_user_id_course_id_lesson_id_fkey;
    ALTER TABLE progress_events DROP CONSTRAINT progress_events_course_id_fkey;
    ALTER TABLE processed_requests
        DROP CONSTRAINT processed_requests_pkey,
        ADD PRIMARY KEY (user_id, request_id, course_id);

    PERFORM create_reference_table('courses');
    PERFORM create_reference_table('lessons');
    PERFORM create_reference_table('service_secrets');

    PERFORM create_distributed_table('lesson_progress', 'course_id');
    PERFORM create_distributed_table('course_progress', 'course_id',
                                     colocate_with => 'lesson_progress');
    PERFORM create_distributed_table('lesson_attempts', 'course_id',
                                     colocate_with => 'lesson_progress');
    PERFORM create_distributed_table('processed_requests', 'course_id',
                                     colocate_with => 'lesson_progress');
    PERFORM create_distributed_table('progress_events', 'course_id',
                                     colocate_with => 'lesson_progress');
    PERFORM create_distributed_table('progress_event_purges', 'course_id',
                                     colocate_with => 'lesson_progress');

    ALTER TABLE lesson_attempts
        ADD CONSTRAINT lesson_attempts_user_id_course_id_lesson_id_fkey
        FOREIGN KEY (user_id, course_id, lesson_id)
        REFERENCES lesson_progress (user_id, course_id, lesson_id) ON DELETE CASCADE;
    ALTER TABLE progress_events
        ADD CONSTRAINT progress_events_course_id_fkey
        FOREIGN KEY (course_id) REFERENCES courses (course_id) ON DELETE CASCADE;
END;
$$;
