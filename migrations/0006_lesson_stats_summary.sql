-- Per-lesson statistics of large courses, recomputed off the write path.
--
-- StreamLessonStats aggregates every row of a course; for a course of a million
-- learner-lessons that takes over a second whatever the server does. A course with at
-- least a threshold of rows (store/lesson_stats.py) is served from lesson_stats_summary
-- instead, while its summary is younger than the freshness bound; a background task in the
-- server recomputes the summaries of the large courses that were asked for recently, one
-- replica at a time (the refreshing_until lease). Heartbeats never touch these tables.
-- docs/lesson-stats.md gives the design and its figures.

-- One row per large course: when its summary was computed (the snapshot it reflects;
-- '-infinity' before the first computation), from how many rows, when it was last asked
-- for, and until when a replica holds the lease to recompute it.
CREATE TABLE lesson_stats_courses (
    course_id        uuid PRIMARY KEY,
    computed_at      timestamptz NOT NULL,
    row_count        bigint NOT NULL CHECK (row_count >= 0),
    requested_at     timestamptz NOT NULL,
    refreshing_until timestamptz
);

-- The figures of one lesson with any row, as of lesson_stats_courses.computed_at (rows of
-- an older computation may remain until the next one; readers match computed_at).
CREATE TABLE lesson_stats_summary (
    course_id              uuid NOT NULL,
    lesson_id              varchar(255) NOT NULL,
    computed_at            timestamptz NOT NULL,
    started_count          bigint NOT NULL,
    completed_count        bigint NOT NULL,
    avg_attempts           float8 NOT NULL,
    avg_time_spent_seconds float8 NOT NULL,
    p50_time_spent_seconds float8,
    p90_time_spent_seconds float8,
    scored_count           bigint NOT NULL,
    avg_score              float8,
    min_score              integer,
    max_score              integer,
    score_histogram        bigint[] NOT NULL,
    PRIMARY KEY (course_id, lesson_id)
);

-- On Citus both tables are sharded by course_id beside lesson_progress (a course's summary
-- lives on the worker that holds its rows). The keys to courses are added after
-- distribution, as 0003 does for the outbox.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    -- For this transaction: the keys added below must run over one connection per node.
    SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
    PERFORM create_distributed_table('lesson_stats_courses', 'course_id',
                                     colocate_with => 'lesson_progress');
    PERFORM create_distributed_table('lesson_stats_summary', 'course_id',
                                     colocate_with => 'lesson_progress');
END;
$$;

ALTER TABLE lesson_stats_courses
    ADD FOREIGN KEY (course_id) REFERENCES courses (course_id) ON DELETE CASCADE;
ALTER TABLE lesson_stats_summary
    ADD FOREIGN KEY (course_id) REFERENCES courses (course_id) ON DELETE CASCADE;
