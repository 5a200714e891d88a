-- A lone heartbeat in a handful of statements, and claims found by their key on any
-- PostgreSQL.
--
-- lp_record_heartbeat: a RecordTime call that finds a statement slot free (the common case
-- below saturation) went through lp_record_heartbeats with arrays of one entry: about a
-- dozen statements for one heartbeat. This function writes one heartbeat with the same
-- rule and results in five statements when its time is free (the outline check, the claim
-- read, the clock, the claim, the lesson row): the learner's clock is locked, tested and
-- written in one INSERT ... ON CONFLICT DO UPDATE ... WHERE (PostgreSQL locks the
-- conflicting row even when the WHERE leaves it unchanged), so only a heartbeat that
-- overlaps time already credited reads the clock again and goes through lp_credit_time.
-- The claim is read before the clock is locked: a call that claims the same request id
-- meanwhile makes this call's claim find the id taken, and this call is rolled back (clock
-- and all) and retried, as in lp_record_heartbeats, and then sees the claim.
--
-- lp_record_heartbeats loses, on one PostgreSQL, the conditions 0008 added for Citus. Its
-- claim and row lookups name the entries' courses (`course_id = ANY (p_course_ids)`) so
-- that Citus sends them to those courses' shards only. One PostgreSQL needs no such
-- condition, and PostgreSQL 18 (the embedded server) plans the claim lookup with it as a
-- bitmap scan of processed_requests' course index, reading every claim of the entry's
-- course for each entry: merged heartbeats fell from 17,000 to 2,000 per second within
-- seconds as claims accumulated (bench/time_budget.py; PostgreSQL 15 keeps the primary
-- key). Naming the learners as well (`user_id = ANY (p_user_ids)`) made it worse (550 per
-- second, batches of 500 at 100): the planner costs the primary key as one index descent per
-- element. So on one PostgreSQL the function is re-created from its 0008 definition
-- without those conditions (the three substitutions below, each checked to apply); on
-- Citus it stays as it is.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

-- One heartbeat (p_at NULL: now); the row shape of lp_record_heartbeats for one entry.
CREATE FUNCTION lp_record_heartbeat(
    p_user_id uuid, p_course_id uuid, p_lesson_id varchar, p_seconds integer,
    p_request_id uuid, p_at timestamptz, p_allowance integer, p_retention integer)
RETURNS TABLE (idx bigint, missing boolean, reused_method text, reused_course_id text,
               reused_lesson_id varchar, credited_seconds integer, applied boolean,
               progress lesson_progress)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_at timestamptz := date_trunc('second', COALESCE(p_at, now()));
    v_own tstzmultirange;
    v_keep tstzmultirange;
    v_clock tstzmultirange;
    v_whole boolean;
    v_method text;
    v_lesson varchar;
    v_prior integer;
BEGIN
    idx := 1;
    missing := false;
    applied := false;
    IF NOT EXISTS (SELECT FROM lessons l WHERE l.course_id = p_course_id
                   AND l.lesson_id = p_lesson_id AND l.position IS NOT NULL) THEN
        missing := true;
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_request_id IS NOT NULL THEN
        SELECT r.method, r.lesson_id, COALESCE(r.credited_seconds, p_seconds)
        INTO v_method, v_lesson, v_prior
        FROM processed_requests r
        WHERE r.user_id = p_user_id AND r.request_id = p_request_id
          AND r.course_id = p_course_id;
        IF FOUND AND v_method = 'RecordTime' AND v_lesson = p_lesson_id THEN
            -- A replay: credited what the first call was, the row as it is now.
            credited_seconds := v_prior;
            SELECT p.* INTO progress FROM lesson_progress p
            WHERE p.user_id = p_user_id AND p.course_id = p_course_id
              AND p.lesson_id = p_lesson_id;
            RETURN NEXT;
            RETURN;
        ELSIF FOUND THEN  -- first used by another call
            reused_method := v_method;
            reused_course_id := p_course_id::text;
            reused_lesson_id := v_lesson;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_own := tstzmultirange(tstzrange(v_at - make_interval(secs => p_seconds), v_at));
    v_keep := tstzmultirange(tstzrange(
        date_trunc('second', now()) - make_interval(secs => p_retention + 3600), NULL));
    -- Lock the clock, and take the heartbeat's own time when none of it is credited yet.
    INSERT INTO learner_clock AS c (user_id, credited) VALUES (p_user_id, v_own)
    ON CONFLICT (user_id) DO UPDATE SET credited = (c.credited + EXCLUDED.credited) * v_keep
    WHERE NOT c.credited && EXCLUDED.credited
    RETURNING true INTO v_whole;
    IF v_whole THEN
        credited_seconds := p_seconds;
    ELSE  -- part of it is credited already: the latest free time within the allowance
        SELECT c.credited INTO v_clock FROM learner_clock c WHERE c.user_id = p_user_id;
        SELECT t.credited, t.covered_after INTO credited_seconds, v_clock
        FROM lp_credit_time(v_clock, v_at, p_seconds, p_allowance) AS t;
        UPDATE learner_clock AS c SET credited = v_clock * v_keep WHERE c.user_id = p_user_id;
    END IF;
    IF p_request_id IS NOT NULL THEN
        INSERT INTO processed_requests
            (user_id, request_id, method, course_id, lesson_id, credited_seconds)
        VALUES (p_user_id, p_request_id, 'RecordTime', p_course_id, p_lesson_id,
                credited_seconds)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'a request id was claimed concurrently'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, time_spent_seconds, last_accessed_at)
    VALUES (p_user_id, p_course_id, p_lesson_id, credited_seconds, clock_timestamp())
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
        last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    RETURNING lp.* INTO progress;
    applied := true;
    RETURN NEXT;
END;
$$;

-- On one PostgreSQL: lp_record_heartbeats without the routing conditions, and generic plans
-- for both functions (0008); Citus needs custom plans to route.
DO $$
DECLARE
    v_function regprocedure := 'lp_record_heartbeats(uuid[], uuid[], varchar[], integer[],
        uuid[], timestamptz[], integer, integer, boolean)'::regprocedure;
    v_definition text;
    v_routed text;
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    v_definition := pg_get_functiondef(v_function);
    FOREACH v_routed IN ARRAY ARRAY[
        E'WHERE r.course_id = ANY (p_course_ids)\n',
        'r.course_id = ANY (p_course_ids) AND ',
        'p.course_id = ANY (p_course_ids) AND '
    ] LOOP
        IF strpos(v_definition, v_routed) = 0 THEN
            RAISE EXCEPTION 'lp_record_heartbeats is not the function of 0008: % not found',
                v_routed;
        END IF;
        v_definition := replace(v_definition, v_routed, '');
    END LOOP;
    EXECUTE v_definition;
    ALTER FUNCTION lp_record_heartbeat(uuid, uuid, varchar, integer, uuid, timestamptz,
                                       integer, integer)
        SET plan_cache_mode = force_generic_plan;
END;
$$;
