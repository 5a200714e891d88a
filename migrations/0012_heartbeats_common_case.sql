-- The common case of a heartbeat call in fewer steps.
--
-- lp_record_heartbeats numbered, for every entry, the first entry of the call with its
-- request id (a window over the entries, sorted), and worked out every entry's credit in a
-- statement of its own after the clocks were tested. Both matter only when a request id
-- repeats within the call, an entry is skipped or replayed, or a learner's new time is not
-- credited whole. Now one hash aggregate tells whether a request id repeats (entries are
-- numbered only then), and when none of those holds every entry is taken as new and
-- credited its seconds without a statement. An offline sync of 500 entries: 8.5 -> 7.8 ms on
-- PostgreSQL 15, the old statement before the time budget (0007) 6.6 ms
-- (bench/time_budget.py has the rates). Same signature, same rule, same results.
--
-- The function is written out whole, as 0008 wrote it with 0011's claim count, the Citus
-- routing conditions included; on one PostgreSQL they are dropped again, and the generic
-- plans set again, as 0009 and 0008 did (CREATE OR REPLACE resets a function's settings).
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

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
    v_replays boolean := false;
    v_repeats boolean;
    v_prior integer[];
    v_credited integer[] := array_fill(0, ARRAY[n]);
    v_fresh boolean[] := array_fill(false, ARRAY[n]);
    v_users uuid[];
    v_clocks tstzmultirange[] := '{}';
    v_new_users uuid[];
    v_new_time tstzmultirange[];
    v_new_disjoint boolean[];
    v_whole uuid[] := '{}';
    v_user uuid;
    v_ord bigint;
    v_clock tstzmultirange;
    v_credit integer;
    v_at timestamptz;
    v_own tstzrange;
    k integer;
    j integer := 1;
    v_claims integer;
    v_claimed integer;
    v_method text;
    v_lesson varchar;
BEGIN
    v_keep := tstzmultirange(tstzrange(v_now - make_interval(secs => p_retention + 3600), NULL));
    -- Entries naming a lesson outside its outline.
    SELECT COALESCE(array_agg(i.ord), '{}') INTO v_missing
    FROM unnest(p_course_ids, p_lesson_ids) WITH ORDINALITY AS i(course_id, lesson_id, ord)
    WHERE NOT EXISTS (SELECT FROM lessons l WHERE l.course_id = i.course_id
                      AND l.lesson_id = i.lesson_id AND l.position IS NOT NULL);
    -- Lock and read the learners' clocks in user_id order (one router statement each
    -- on Citus, which would lock the rows of a multi-row statement shard by shard in
    -- parallel, not in one order).
    v_users := ARRAY(SELECT DISTINCT u.user_id
                     FROM unnest(p_user_ids) WITH ORDINALITY AS u(user_id, ord)
                     WHERE NOT u.ord = ANY (v_missing) ORDER BY 1);
    FOREACH v_user IN ARRAY v_users LOOP
        INSERT INTO learner_clock AS c (user_id) VALUES (v_user)
        ON CONFLICT (user_id) DO UPDATE SET credited = c.credited
        RETURNING c.credited INTO v_clock;
        v_clocks := v_clocks || v_clock;
    END LOOP;
    -- Entries whose request id an earlier call claimed (read after the locks, so that a
    -- concurrent call's claim is seen): for another method or lesson, a reused id; else a
    -- replay, credited what the first call was.
    v_reused := '{}';
    v_prior := array_fill(NULL::integer, ARRAY[n]);
    FOR v_ord, v_method, v_lesson, v_credit IN
        SELECT i.ord, r.method, r.lesson_id, COALESCE(r.credited_seconds, i.seconds)
        FROM unnest(p_user_ids, p_course_ids, p_request_ids, p_seconds)
            WITH ORDINALITY AS i(user_id, course_id, request_id, seconds, ord)
        JOIN processed_requests r
          ON r.user_id = i.user_id AND r.request_id = i.request_id AND r.course_id = i.course_id
        WHERE r.course_id = ANY (p_course_ids)
    LOOP
        IF v_method = 'RecordTime' AND v_lesson = p_lesson_ids[v_ord] THEN
            v_prior[v_ord] := v_credit;
            v_replays := true;
        ELSE
            v_reused := v_reused || v_ord;
        END IF;
    END LOOP;
    v_skip := v_missing || v_reused;

    IF NOT (p_all_or_nothing AND cardinality(v_skip) > 0) THEN
        -- Per entry, the first entry of the call with its request id (itself if none),
        -- worked out only when some request id is repeated (one hash aggregate tells).
        v_repeats := EXISTS (
            SELECT FROM unnest(p_user_ids, p_course_ids, p_request_ids)
                AS i(user_id, course_id, request_id)
            WHERE i.request_id IS NOT NULL
            GROUP BY i.user_id, i.request_id, i.course_id HAVING count(*) > 1);
        IF v_repeats THEN
            SELECT array_agg(f.first ORDER BY f.ord) INTO v_first FROM (
                SELECT i.ord, CASE WHEN i.request_id IS NULL THEN i.ord ELSE
                           min(i.ord) OVER (PARTITION BY i.user_id, i.request_id, i.course_id)
                       END AS first
                FROM unnest(p_user_ids, p_course_ids, p_request_ids)
                    WITH ORDINALITY AS i(user_id, course_id, request_id, ord)
            ) AS f;
        ELSE
            v_first := ARRAY(SELECT generate_series(1, n));
        END IF;
        -- Per learner, the time their new entries (neither replays nor repeats) claim, and
        -- whether those intervals are disjoint (their union is as long as their sum).
        SELECT array_agg(g.user_id ORDER BY g.user_id), array_agg(g.own ORDER BY g.user_id),
               array_agg((SELECT COALESCE(sum(upper(r) - lower(r)), interval '0')
                          FROM unnest(g.own) AS r) = make_interval(secs => g.total)
                         ORDER BY g.user_id)
        INTO v_new_users, v_new_time, v_new_disjoint
        FROM (
            SELECT e.user_id, range_agg(e.own) AS own, sum(e.seconds) AS total
            FROM (
                SELECT i.user_id, i.seconds,
                       tstzrange(date_trunc('second', COALESCE(i.at, v_now))
                                     - make_interval(secs => i.seconds),
                                 date_trunc('second', COALESCE(i.at, v_now))) AS own
                FROM unnest(p_user_ids, p_seconds, p_at) WITH ORDINALITY
                    AS i(user_id, seconds, at, ord)
                WHERE NOT i.ord = ANY (v_skip) AND v_prior[i.ord] IS NULL
                  AND v_first[i.ord] = i.ord
            ) AS e
            GROUP BY e.user_id
        ) AS g;
        -- Credit each learner's new entries: all in full when their time is disjoint and
        -- clear of the clock (the common case: one multirange test), else entry by entry
        -- in request order.
        FOR k IN 1 .. cardinality(v_users) LOOP
            IF j <= cardinality(v_new_users) AND v_new_users[j] = v_users[k] THEN
                v_clock := v_clocks[k];
                IF v_new_disjoint[j] AND NOT v_clock && v_new_time[j] THEN
                    v_clock := v_clock + v_new_time[j];
                    v_whole := v_whole || v_users[k];
                ELSE
                    FOR v_ord IN
                        SELECT u.ord FROM unnest(p_user_ids) WITH ORDINALITY AS u(user_id, ord)
                        WHERE u.user_id = v_users[k] AND NOT u.ord = ANY (v_skip)
                          AND v_prior[u.ord] IS NULL AND v_first[u.ord] = u.ord
                        ORDER BY u.ord
                    LOOP
                        v_at := date_trunc('second', COALESCE(p_at[v_ord], v_now));
                        v_own := tstzrange(v_at - make_interval(secs => p_seconds[v_ord]), v_at);
                        IF NOT v_clock && v_own THEN  -- its own time is free
                            v_credit := p_seconds[v_ord];
                            v_clock := v_clock + tstzmultirange(v_own);
                        ELSE
                            SELECT t.credited, t.covered_after INTO v_credit, v_clock
                            FROM lp_credit_time(v_clock, v_at, p_seconds[v_ord], p_allowance) AS t;
                        END IF;
                        v_credited[v_ord] := v_credit;
                        v_fresh[v_ord] := true;
                    END LOOP;
                END IF;
                v_clocks[k] := v_clock * v_keep;
                j := j + 1;
            END IF;
        END LOOP;
        -- Every entry's credit. In the common case (no entry skipped, replayed or repeated,
        -- every learner credited whole) each entry is new and gets its seconds. Otherwise
        -- new entries of learners credited whole get their seconds, a replay what its first
        -- call was credited, a repeat what its first entry was.
        IF cardinality(v_skip) = 0 AND NOT v_replays AND NOT v_repeats
           AND cardinality(v_whole) = cardinality(v_users) THEN
            v_fresh := array_fill(true, ARRAY[n]);
            v_credited := p_seconds;
        ELSE
            WITH e AS (
                SELECT i.ord,
                       CASE WHEN i.user_id = ANY (v_whole) AND NOT i.ord = ANY (v_skip)
                                 AND v_prior[i.ord] IS NULL AND v_first[i.ord] = i.ord
                            THEN true ELSE v_fresh[i.ord] END AS fresh,
                       CASE WHEN i.user_id = ANY (v_whole) AND NOT i.ord = ANY (v_skip)
                                 AND v_prior[i.ord] IS NULL AND v_first[i.ord] = i.ord
                            THEN i.seconds ELSE v_credited[i.ord] END AS credited
                FROM unnest(p_user_ids, p_seconds) WITH ORDINALITY AS i(user_id, seconds, ord)
            )
            SELECT array_agg(e.fresh ORDER BY e.ord),
                   array_agg(CASE WHEN e.ord = ANY (v_skip) THEN 0
                                  WHEN v_prior[e.ord] IS NOT NULL THEN v_prior[e.ord]
                                  ELSE f.credited END ORDER BY e.ord)
            INTO v_fresh, v_credited
            FROM e JOIN e AS f ON f.ord = v_first[e.ord];
        END IF;
        IF cardinality(v_users) > 0 THEN
            UPDATE learner_clock AS c SET credited = u.credited
            FROM unnest(v_users, v_clocks) AS u(user_id, credited)
            WHERE c.user_id = ANY (v_users) AND c.user_id = u.user_id;
        END IF;
        -- Claim the request ids with what they were credited. A claim that finds its id
        -- taken meanwhile (by a call of another method, which takes no clock lock) would
        -- have consumed budget: the whole call is rolled back and retried instead.
        SELECT count(*) INTO v_claims
        FROM unnest(p_request_ids, v_fresh) AS c(request_id, fresh)
        WHERE c.fresh AND c.request_id IS NOT NULL;
        IF v_claims > 0 THEN
            WITH claimed AS (
            INSERT INTO processed_requests
                (user_id, request_id, method, course_id, lesson_id, credited_seconds)
            SELECT c.user_id, c.request_id, 'RecordTime', c.course_id, c.lesson_id, c.credited
            FROM unnest(p_user_ids, p_request_ids, p_course_ids, p_lesson_ids, v_credited,
                        v_fresh) AS c(user_id, request_id, course_id, lesson_id, credited, fresh)
            WHERE c.fresh AND c.request_id IS NOT NULL
            ORDER BY c.user_id, c.request_id, c.course_id
            ON CONFLICT DO NOTHING
            RETURNING 1)
            SELECT count(*) INTO v_claimed FROM claimed;
            IF v_claimed <> v_claims THEN
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

-- On one PostgreSQL: without the routing conditions, with generic plans (0009, 0008).
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
            RAISE EXCEPTION 'lp_record_heartbeats: % not found', v_routed;
        END IF;
        v_definition := replace(v_definition, v_routed, '');
    END LOOP;
    EXECUTE v_definition;
    ALTER FUNCTION lp_record_heartbeats(uuid[], uuid[], varchar[], integer[], uuid[],
                                        timestamptz[], integer, integer, boolean)
        SET plan_cache_mode = force_generic_plan;
END;
$$;
