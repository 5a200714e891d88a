-- Heartbeats that touch only the shards of the courses they name.
--
-- lp_record_heartbeats (0007) joined its entries to processed_requests and lesson_progress
-- on the entries' keys alone. One PostgreSQL answers such a join with index lookups; Citus
-- cannot tell from it which shards hold the rows, so each statement ran on all 32 shards
-- of each table, and the outer join of the replay check copied both workers' whole
-- processed_requests shards to the coordinator: about 200 remote commands for one
-- heartbeat (citus.log_remote_commands), seconds per call under concurrent heartbeats.
-- This version states in each statement which courses it concerns
-- (`course_id = ANY (p_course_ids)`), so Citus sends it to those courses' shards only, and
-- reads claims with inner joins (which it pushes down to the shards) instead of the outer
-- join. On one PostgreSQL the extra condition only filters rows the join finds anyway:
-- the plans keep their index lookups. Same signature, same results on both engines.
--
-- lp_record_time (0004), unused since 0007, is dropped.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

DROP FUNCTION lp_record_time(uuid, uuid, varchar, integer, uuid);

CREATE OR REPLACE FUNCTION lp_record_heartbeats(
    p_user_ids uuid[], p_course_ids uuid[], p_lesson_ids varchar[], p_seconds integer[],
    p_request_ids uuid[], p_at timestamptz[], p_allowance integer, p_retention integer,
    p_all_or_nothing boolean)
RETURNS TABLE (idx bigint, missing boolean, reused_method text, reused_course_id text,
               reused_lesson_id varchar, credited_seconds integer, applied boolean,
               progress lesson_progress)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(p_user_ids);
    v_now timestamptz := date_trunc('second', now());
    v_keep tstzmultirange;
    v_missing bigint[];
    v_reused bigint[];
    v_skip bigint[];
    v_first bigint[];
    v_prior integer[];
    v_credited integer[] := array_fill(0, ARRAY[n]);
    v_fresh boolean[] := array_fill(false, ARRAY[n]);
    v_user uuid;
    v_ord bigint;
    v_clock tstzmultirange;
    v_credit integer;
    v_at timestamptz;
    v_own tstzrange;
    v_clock_user uuid;
    v_claim_users uuid[] := '{}';
    v_claim_ids uuid[] := '{}';
    v_claim_courses uuid[] := '{}';
    v_claim_lessons varchar[] := '{}';
    v_claim_credits integer[] := '{}';
    v_claimed integer;
BEGIN
    v_keep := tstzmultirange(tstzrange(v_now - make_interval(secs => p_retention + 3600), NULL));
    -- Entries naming a lesson outside its outline, or a request id first used elsewhere.
    SELECT COALESCE(array_agg(i.ord), '{}') INTO v_missing
    FROM unnest(p_course_ids, p_lesson_ids) WITH ORDINALITY AS i(course_id, lesson_id, ord)
    WHERE NOT EXISTS (SELECT FROM lessons l WHERE l.course_id = i.course_id
                      AND l.lesson_id = i.lesson_id AND l.position IS NOT NULL);
    SELECT COALESCE(array_agg(DISTINCT i.ord), '{}') INTO v_reused
    FROM unnest(p_user_ids, p_course_ids, p_lesson_ids, p_request_ids)
        WITH ORDINALITY AS i(user_id, course_id, lesson_id, request_id, ord)
    JOIN processed_requests r
      ON r.user_id = i.user_id AND r.request_id = i.request_id AND r.course_id = i.course_id
    WHERE r.course_id = ANY (p_course_ids)
      AND (r.method, r.lesson_id) IS DISTINCT FROM ('RecordTime', i.lesson_id);
    v_skip := v_missing || v_reused;

    IF NOT (p_all_or_nothing AND cardinality(v_skip) > 0) THEN
        -- Lock the learners' clocks in user_id order.
        FOR v_user IN
            SELECT DISTINCT u.user_id FROM unnest(p_user_ids) WITH ORDINALITY AS u(user_id, ord)
            WHERE NOT u.ord = ANY (v_skip) ORDER BY 1
        LOOP
            INSERT INTO learner_clock AS c (user_id) VALUES (v_user)
            ON CONFLICT (user_id) DO UPDATE SET credited = c.credited;
        END LOOP;
        -- Per entry, the first entry of the call with its request id (itself if none), and
        -- the entries whose request id an earlier call applied (read after the locks, so a
        -- concurrent call's claim is seen).
        SELECT array_agg(f.first ORDER BY f.ord) INTO v_first FROM (
            SELECT i.ord, CASE WHEN i.request_id IS NULL THEN i.ord ELSE
                       min(i.ord) OVER (PARTITION BY i.user_id, i.request_id, i.course_id) END
                   AS first
            FROM unnest(p_user_ids, p_course_ids, p_request_ids)
                WITH ORDINALITY AS i(user_id, course_id, request_id, ord)
        ) AS f;
        v_prior := array_fill(NULL::integer, ARRAY[n]);
        FOR v_ord, v_credit IN
            SELECT i.ord, COALESCE(r.credited_seconds, i.seconds)
            FROM unnest(p_user_ids, p_course_ids, p_request_ids, p_seconds)
                WITH ORDINALITY AS i(user_id, course_id, request_id, seconds, ord)
            JOIN processed_requests r
              ON r.user_id = i.user_id AND r.request_id = i.request_id
                 AND r.course_id = i.course_id
            WHERE r.course_id = ANY (p_course_ids) AND NOT i.ord = ANY (v_skip)
        LOOP
            v_prior[v_ord] := v_credit;
        END LOOP;
        -- Credit each entry in order, learner after learner.
        FOR v_user, v_ord IN
            SELECT u.user_id, u.ord FROM unnest(p_user_ids) WITH ORDINALITY AS u(user_id, ord)
            WHERE NOT u.ord = ANY (v_skip) ORDER BY u.user_id, u.ord
        LOOP
            IF v_clock_user IS DISTINCT FROM v_user THEN
                IF v_clock_user IS NOT NULL THEN
                    UPDATE learner_clock SET credited = v_clock * v_keep
                    WHERE user_id = v_clock_user;
                END IF;
                SELECT credited INTO v_clock FROM learner_clock WHERE user_id = v_user;
                v_clock_user := v_user;
            END IF;
            IF v_prior[v_ord] IS NOT NULL THEN  -- a replay of an earlier call
                v_credited[v_ord] := v_prior[v_ord];
            ELSIF v_first[v_ord] <> v_ord THEN  -- a repeat of an entry of this call
                v_credited[v_ord] := v_credited[v_first[v_ord]];
            ELSE
                v_at := date_trunc('second', COALESCE(p_at[v_ord], v_now));
                v_own := tstzrange(v_at - make_interval(secs => p_seconds[v_ord]), v_at);
                IF NOT v_clock && v_own THEN  -- the common case: its own time is free
                    v_credit := p_seconds[v_ord];
                    v_clock := v_clock + tstzmultirange(v_own);
                ELSE
                    SELECT t.credited, t.covered_after INTO v_credit, v_clock
                    FROM lp_credit_time(v_clock, v_at, p_seconds[v_ord], p_allowance) AS t;
                END IF;
                v_credited[v_ord] := v_credit;
                v_fresh[v_ord] := true;
                IF p_request_ids[v_ord] IS NOT NULL THEN
                    v_claim_users := v_claim_users || v_user;
                    v_claim_ids := v_claim_ids || p_request_ids[v_ord];
                    v_claim_courses := v_claim_courses || p_course_ids[v_ord];
                    v_claim_lessons := v_claim_lessons || p_lesson_ids[v_ord];
                    v_claim_credits := v_claim_credits || v_credit;
                END IF;
            END IF;
        END LOOP;
        IF v_clock_user IS NOT NULL THEN
            UPDATE learner_clock SET credited = v_clock * v_keep WHERE user_id = v_clock_user;
        END IF;
        -- Claim the request ids with what they were credited. A claim that finds its id
        -- taken meanwhile (by a call of another method, which takes no clock lock) would
        -- have consumed budget: the whole call is rolled back and retried instead.
        IF cardinality(v_claim_ids) > 0 THEN
            INSERT INTO processed_requests
                (user_id, request_id, method, course_id, lesson_id, credited_seconds)
            SELECT c.user_id, c.request_id, 'RecordTime', c.course_id, c.lesson_id, c.credited
            FROM unnest(v_claim_users, v_claim_ids, v_claim_courses, v_claim_lessons,
                        v_claim_credits) AS c(user_id, request_id, course_id, lesson_id, credited)
            ORDER BY c.user_id, c.request_id, c.course_id
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS v_claimed = ROW_COUNT;
            IF v_claimed <> cardinality(v_claim_ids) THEN
                RAISE EXCEPTION 'a request id was claimed concurrently'
                    USING ERRCODE = 'serialization_failure';
            END IF;
        END IF;
    END IF;

    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_user_ids, p_course_ids, p_lesson_ids, p_request_ids, v_credited,
                             v_fresh)
            WITH ORDINALITY AS t(user_id, course_id, lesson_id, request_id, credited, fresh, ord)
    ),
    valid AS (
        SELECT * FROM input
        WHERE NOT ord = ANY (v_skip) AND NOT (p_all_or_nothing AND cardinality(v_skip) > 0)
    ),
    summed AS (
        SELECT user_id, course_id, lesson_id, sum(credited)::integer AS seconds FROM valid
        WHERE fresh GROUP BY user_id, course_id, lesson_id
    ),
    upserted AS (
        INSERT INTO lesson_progress AS lp
            (user_id, course_id, lesson_id, time_spent_seconds, last_accessed_at)
        SELECT user_id, course_id, lesson_id, seconds, clock_timestamp() FROM summed
        ORDER BY user_id, course_id, lesson_id
        ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
        SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
            last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
        RETURNING lp.*
    ),
    result AS (
        SELECT * FROM upserted
        UNION ALL
        SELECT p.* FROM lesson_progress p
        WHERE p.course_id = ANY (p_course_ids) AND (p.user_id, p.course_id, p.lesson_id) IN (
            SELECT user_id, course_id, lesson_id FROM valid
            EXCEPT SELECT user_id, course_id, lesson_id FROM summed
        )
    ),
    reused AS (
        SELECT DISTINCT ON (i.ord) i.ord, r.method, r.course_id::text AS first_course_id,
               r.lesson_id AS first_lesson_id
        FROM input i
        JOIN processed_requests r
          ON r.user_id = i.user_id AND r.request_id = i.request_id AND r.course_id = i.course_id
        WHERE r.course_id = ANY (p_course_ids) AND i.ord = ANY (v_reused)
    )
    SELECT i.ord, i.ord = ANY (v_missing), u.method, u.first_course_id, u.first_lesson_id,
           CASE WHEN i.ord = ANY (v_skip) THEN NULL ELSE i.credited END, i.fresh,
           CASE WHEN r.user_id IS NOT NULL THEN ROW(r.*)::lesson_progress END
    FROM input i
    LEFT JOIN reused u ON u.ord = i.ord
    LEFT JOIN result r
      ON r.user_id = i.user_id AND r.course_id = i.course_id AND r.lesson_id = i.lesson_id
         AND NOT i.ord = ANY (v_skip)
    ORDER BY i.ord;
END;
$$;
