-- Writes as functions, events numbered per course, request ids scoped per learner and
-- course: the same schema and the same code path on one PostgreSQL and on Citus.
--
-- * Each progress write is one PL/pgSQL function (lp_start_lesson, lp_save_bookmark,
--   lp_record_attempt, lp_complete_lesson, lp_record_time) holding what was one writable
--   CTE: check the outline, claim the request id, upsert the lesson row, and on completion
--   the course row and the events. The store calls `SELECT ... FROM lp_x(...)` on both
--   engines. On Citus each is registered with create_distributed_function on its
--   p_course_id argument, co-located with lesson_progress: a call outside a transaction
--   block runs entirely on the worker that holds the course, in one round trip, with plain
--   PostgreSQL semantics (statement after statement on local shards). A writable CTE over
--   two distributed tables would instead run step by step through the coordinator, and
--   Citus rejects volatile functions (now(), clock_timestamp()) in ON CONFLICT DO UPDATE
--   SET and a reference-table subquery there: so the values travel in the inserted row
--   (EXCLUDED), and last_accessed_at = GREATEST(old, new) keeps "never moves backwards".
-- * Event ids are numbered per course from course_event_heads (one row per course,
--   co-located with the events): drawing ids locks the course's row until commit, so the
--   course's events commit in id order, on every node. This replaces the advisory lock of
--   0002 (advisory locks are per node on Citus) and the identity column (whose values,
--   drawn on a worker, would come from that worker's range and could go backwards when a
--   shard moves); the column keeps its identity (Citus cannot drop it from a distributed
--   table) but every insert gives the id (OVERRIDING SYSTEM VALUE). Ids continue from each course's current maximum, so a watcher's
--   after_event_id stays valid. The head row outlives a deleted course (no foreign key):
--   a course registered again keeps counting up, so an old position never skips new
--   events.
-- * processed_requests is keyed by (user_id, request_id, course_id) on one PostgreSQL too
--   (0003 did so on Citus): a request id is applied at most once per learner and course.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

DO $$
BEGIN
    IF (SELECT cardinality(conkey) FROM pg_constraint
        WHERE conname = 'processed_requests_pkey') = 2 THEN
        ALTER TABLE processed_requests
            DROP CONSTRAINT processed_requests_pkey,
            ADD PRIMARY KEY (user_id, request_id, course_id);
    END IF;
END;
$$;

-- Per course, the last event id drawn.
CREATE TABLE course_event_heads (
    course_id     uuid PRIMARY KEY,
    last_event_id bigint NOT NULL CHECK (last_event_id >= 0)
);

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_table('course_event_heads', 'course_id',
                                         colocate_with => 'lesson_progress');
    END IF;
END;
$$;

INSERT INTO course_event_heads (course_id, last_event_id)
SELECT course_id, max(event_id) FROM (
    SELECT course_id, event_id FROM progress_events
    UNION ALL
    SELECT course_id, purged_through FROM progress_event_purges
) AS e
GROUP BY course_id;

-- Draws p_count event ids of a course; returns the id before the first. The head row stays
-- locked until commit. A course's first event is number 2, so that after_event_id = 1
-- (the smallest position that is not "from now on") replays all of a course's events.
CREATE FUNCTION lp_draw_event_ids(p_course_id uuid, p_count integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
BEGIN
    INSERT INTO course_event_heads AS h (course_id, last_event_id)
    VALUES (p_course_id, 1 + p_count)
    ON CONFLICT (course_id) DO UPDATE SET last_event_id = h.last_event_id + p_count
    RETURNING h.last_event_id INTO v_last;
    RETURN v_last - p_count;
END;
$$;

-- Appends one event per kind (in the given order) with a snapshot of the lesson row p.
CREATE FUNCTION lp_append_events(p lesson_progress, p_kinds smallint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_kind smallint;
BEGIN
    IF cardinality(p_kinds) = 0 THEN
        RETURN;
    END IF;
    v_id := lp_draw_event_ids(p.course_id, cardinality(p_kinds));
    FOREACH v_kind IN ARRAY p_kinds LOOP
        v_id := v_id + 1;
        INSERT INTO progress_events
            (event_id, course_id, user_id, kind, lesson_id, completed, time_spent_seconds,
             attempts, score, first_started_at, last_accessed_at, completed_at, created_at,
             updated_at, bookmark, bookmarked_at)
        OVERRIDING SYSTEM VALUE
        VALUES (v_id, p.course_id, p.user_id, v_kind, p.lesson_id, p.completed,
                p.time_spent_seconds, p.attempts, p.score, p.first_started_at,
                p.last_accessed_at, p.completed_at, p.created_at, p.updated_at, p.bookmark,
                p.bookmarked_at);
    END LOOP;
END;
$$;

-- Whether the lesson is in its course's current outline (false: the caller returns no row,
-- and the store finds out why).
CREATE FUNCTION lp_in_outline(p_course_id uuid, p_lesson_id varchar) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT FROM lessons WHERE course_id = p_course_id
                   AND lesson_id = p_lesson_id AND position IS NOT NULL)
$$;

-- Remembers a request id for a call; false if it was already used (a replay, or a reuse
-- the store explains). A NULL request id always proceeds.
CREATE FUNCTION lp_claim(p_user_id uuid, p_course_id uuid, p_lesson_id varchar,
                         p_request_id uuid, p_method text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_request_id IS NULL THEN
        RETURN true;
    END IF;
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    VALUES (p_user_id, p_request_id, p_method, p_course_id, p_lesson_id)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END;
$$;

-- Adds a completed lesson to the learner's course row (never twice: the row lock of the
-- upsert serialises racing completions) and sets the course's completion time when the
-- list first covers the whole outline. Returns true when this call completed the course.
CREATE FUNCTION lp_sync_course(p lesson_progress) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_lessons jsonb;
    v_completed_at timestamptz;
    v_alone boolean;
BEGIN
    v_alone := NOT EXISTS (SELECT FROM lessons l WHERE l.course_id = p.course_id
                           AND l.position IS NOT NULL AND l.lesson_id <> p.lesson_id);
    INSERT INTO course_progress AS cp (user_id, course_id, completed_lessons, completed_at)
    VALUES (p.user_id, p.course_id, jsonb_build_array(p.lesson_id),
            CASE WHEN v_alone THEN now() END)
    ON CONFLICT (user_id, course_id) DO UPDATE
    SET completed_lessons = cp.completed_lessons || EXCLUDED.completed_lessons
    WHERE NOT cp.completed_lessons ? p.lesson_id
    RETURNING cp.completed_lessons, cp.completed_at INTO v_lessons, v_completed_at;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_completed_at IS NULL AND NOT EXISTS (
        SELECT FROM lessons l WHERE l.course_id = p.course_id AND l.position IS NOT NULL
          AND NOT v_lessons ? l.lesson_id
    ) THEN
        UPDATE course_progress SET completed_at = now()
        WHERE user_id = p.user_id AND course_id = p.course_id;
        RETURN true;
    END IF;
    RETURN v_completed_at = now();
END;
$$;

-- StartLesson: creates the lesson row or moves its last access time; event STARTED.
CREATE FUNCTION lp_start_lesson(p_user_id uuid, p_course_id uuid, p_lesson_id varchar)
RETURNS SETOF lesson_progress
LANGUAGE plpgsql AS $$
DECLARE
    v lesson_progress;
BEGIN
    IF NOT lp_in_outline(p_course_id, p_lesson_id) THEN
        RETURN;
    END IF;
    INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, last_accessed_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, clock_timestamp())
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    RETURNING lp.* INTO v;
    PERFORM lp_append_events(v, '{1}');
    RETURN NEXT v;
END;
$$;

-- SaveBookmark: sets (or with NULL clears) the bookmark; event BOOKMARKED.
CREATE FUNCTION lp_save_bookmark(p_user_id uuid, p_course_id uuid, p_lesson_id varchar,
                                 p_bookmark text)
RETURNS SETOF lesson_progress
LANGUAGE plpgsql AS $$
DECLARE
    v lesson_progress;
BEGIN
    IF NOT lp_in_outline(p_course_id, p_lesson_id) THEN
        RETURN;
    END IF;
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, bookmark, bookmarked_at, last_accessed_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, p_bookmark,
            CASE WHEN p_bookmark IS NOT NULL THEN now() END, clock_timestamp())
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET bookmark = EXCLUDED.bookmark, bookmarked_at = EXCLUDED.bookmarked_at,
        last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    RETURNING lp.* INTO v;
    PERFORM lp_append_events(v, '{5}');
    RETURN NEXT v;
END;
$$;

-- RecordTime: adds seconds to the lesson row (no event).
CREATE FUNCTION lp_record_time(p_user_id uuid, p_course_id uuid, p_lesson_id varchar,
                               p_seconds integer, p_request_id uuid)
RETURNS SETOF lesson_progress
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT lp_in_outline(p_course_id, p_lesson_id)
       OR NOT lp_claim(p_user_id, p_course_id, p_lesson_id, p_request_id, 'RecordTime') THEN
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, time_spent_seconds, last_accessed_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, p_seconds, clock_timestamp())
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
        last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    RETURNING lp.*;
END;
$$;

-- RecordAttempt: counts the attempt, keeps the best score, completes the lesson when the
-- score passes, appends the attempt to the history; events ATTEMPTED, and COMPLETED /
-- COURSE_COMPLETED when this attempt completed the lesson / the course.
CREATE FUNCTION lp_record_attempt(p_user_id uuid, p_course_id uuid, p_lesson_id varchar,
                                  p_score integer, p_request_id uuid,
                                  OUT progress lesson_progress, OUT passed boolean)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    v_passing integer;
    v_kinds smallint[] := '{2}';
BEGIN
    SELECT passing_score INTO v_passing FROM lessons
    WHERE course_id = p_course_id AND lesson_id = p_lesson_id AND position IS NOT NULL;
    IF NOT FOUND
       OR NOT lp_claim(p_user_id, p_course_id, p_lesson_id, p_request_id, 'RecordAttempt') THEN
        RETURN;
    END IF;
    passed := COALESCE(p_score >= v_passing, false);
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, attempts, score, completed, completed_at,
         last_accessed_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, 1, p_score, passed,
            CASE WHEN passed THEN now() END, clock_timestamp())
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET attempts = lp.attempts + 1,
        score = GREATEST(lp.score, EXCLUDED.score),
        completed = lp.completed OR EXCLUDED.completed,
        completed_at = COALESCE(lp.completed_at, EXCLUDED.completed_at),
        last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    RETURNING lp.* INTO progress;
    -- clock_timestamp() after the row lock: attempt times follow attempt numbers.
    INSERT INTO lesson_attempts
        (user_id, course_id, lesson_id, attempt_number, score, request_id, attempted_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, progress.attempts, p_score, p_request_id,
            clock_timestamp());
    IF progress.completed THEN
        IF progress.completed_at = now() THEN
            v_kinds := v_kinds || 3::smallint;
        END IF;
        IF lp_sync_course(progress) THEN
            v_kinds := v_kinds || 4::smallint;
        END IF;
    END IF;
    PERFORM lp_append_events(progress, v_kinds);
    RETURN NEXT;
END;
$$;

-- CompleteLesson: completes the lesson (a repeat changes nothing unless its score is
-- better, and then returns no row); events COMPLETED / COURSE_COMPLETED.
CREATE FUNCTION lp_complete_lesson(p_user_id uuid, p_course_id uuid, p_lesson_id varchar,
                                   p_score integer, p_request_id uuid)
RETURNS SETOF lesson_progress
LANGUAGE plpgsql AS $$
DECLARE
    v lesson_progress;
    v_kinds smallint[] := '{}';
BEGIN
    IF NOT lp_in_outline(p_course_id, p_lesson_id)
       OR NOT lp_claim(p_user_id, p_course_id, p_lesson_id, p_request_id, 'CompleteLesson')
    THEN
        RETURN;
    END IF;
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, completed, completed_at, score, last_accessed_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, true, now(), p_score, clock_timestamp())
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET completed = true,
        completed_at = COALESCE(lp.completed_at, EXCLUDED.completed_at),
        score = GREATEST(lp.score, EXCLUDED.score),
        last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    WHERE NOT lp.completed OR GREATEST(lp.score, EXCLUDED.score) IS DISTINCT FROM lp.score
    RETURNING lp.* INTO v;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v.completed_at = now() THEN
        v_kinds := v_kinds || 3::smallint;
    END IF;
    IF lp_sync_course(v) THEN
        v_kinds := v_kinds || 4::smallint;
    END IF;
    PERFORM lp_append_events(v, v_kinds);
    RETURN NEXT v;
END;
$$;

-- After an outline change: learners whose completed lessons now cover the whole
-- (non-empty) outline have finished the course; one COURSE_COMPLETED event each (no lesson
-- snapshot). Returns how many.
CREATE FUNCTION lp_complete_covered_courses(p_course_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_users uuid[];
    v_id bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM lessons WHERE course_id = p_course_id AND position IS NOT NULL)
    THEN
        RETURN 0;
    END IF;
    WITH covered AS (
        UPDATE course_progress cp SET completed_at = now()
        WHERE cp.course_id = p_course_id AND cp.completed_at IS NULL
          AND NOT EXISTS (
              SELECT FROM lessons l
              WHERE l.course_id = p_course_id AND l.position IS NOT NULL
                AND NOT cp.completed_lessons ? l.lesson_id
          )
        RETURNING cp.user_id
    )
    SELECT array_agg(user_id ORDER BY user_id) INTO v_users FROM covered;
    IF v_users IS NULL THEN
        RETURN 0;
    END IF;
    v_id := lp_draw_event_ids(p_course_id, cardinality(v_users));
    INSERT INTO progress_events (event_id, course_id, user_id, kind)
    OVERRIDING SYSTEM VALUE
    SELECT v_id + u.n, p_course_id, u.user_id, 4
    FROM unnest(v_users) WITH ORDINALITY AS u(user_id, n);
    RETURN cardinality(v_users);
END;
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_function(
        'lp_start_lesson(uuid,uuid,varchar)', 'p_course_id',
        colocate_with => 'lesson_progress');
    PERFORM create_distributed_function(
        'lp_save_bookmark(uuid,uuid,varchar,text)', 'p_course_id',
        colocate_with => 'lesson_progress');
    PERFORM create_distributed_function(
        'lp_record_time(uuid,uuid,varchar,integer,uuid)', 'p_course_id',
        colocate_with => 'lesson_progress');
    PERFORM create_distributed_function(
        'lp_record_attempt(uuid,uuid,varchar,integer,uuid)', 'p_course_id',
        colocate_with => 'lesson_progress');
    PERFORM create_distributed_function(
        'lp_complete_lesson(uuid,uuid,varchar,integer,uuid)', 'p_course_id',
        colocate_with => 'lesson_progress');
    PERFORM create_distributed_function(
        'lp_complete_covered_courses(uuid)', 'p_course_id',
        colocate_with => 'lesson_progress');
END;
$$;
