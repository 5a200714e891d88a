-- Heartbeats that touch only the shards of the courses they name.
--
-- lp_record_heartbeats (0007) joined its entries to processed_requests and lesson_progress
-- on the entries' keys alone. One PostgreSQL answers such a join with index lookups; Citus
-- cannot tell from it which shards hold the rows, so each statement ran on all 32 shards
-- of each table, and the outer join of the replay check copied both workers' whole
-- processed_requests shards to the coordinator: 146 remote commands for one
-- heartbeat (citus.log_remote_commands), seconds per call under concurrent heartbeats.
-- This version states in each statement which courses it concerns
-- (`course_id = ANY (p_course_ids)`), so Citus sends it to those courses' shards only, and
-- reads claims with one inner join (which Citus pushes down to the shards) instead of an
-- inner join for reused ids plus an outer join for replays. On one PostgreSQL the extra
-- condition is a filter on rows the primary-key lookups find anyway.
--
-- It also does less per call on both engines (bench/time_budget.py): the clocks are locked
-- and read in one statement per learner (INSERT ... RETURNING) and written back in one
-- statement for all; the claims are read once, after the locks; and a learner whose new
-- entries cover disjoint time clear of their clock (an ordinary heartbeat, an honest
-- offline sync) is credited in full by one multirange test instead of entry by entry.
-- Same signature, same rule, same results on both engines.
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
        ELSE
            v_reused := v_reused || v_ord;
        END IF;
    END LOOP;
    v_skip := v_missing || v_reused;

    IF NOT (p_all_or_nothing AND cardinality(v_skip) > 0) THEN
        -- Per entry, the first entry of the call with its request id (itself if none).
        SELECT array_agg(f.first ORDER BY f.ord) INTO v_first FROM (
            SELECT i.ord, CASE WHEN i.request_id IS NULL THEN i.ord ELSE
                       min(i.ord) OVER (PARTITION BY i.user_id, i.request_id, i.course_id) END
                   AS first
            FROM unnest(p_user_ids, p_course_ids, p_request_ids)
                WITH ORDINALITY AS i(user_id, course_id, request_id, ord)
        ) AS f;
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
        -- Every entry's credit: new entries of learners credited whole get their seconds, a
        -- replay what its first call was credited, a repeat what its first entry was.
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
            INSERT INTO processed_requests
                (user_id, request_id, method, course_id, lesson_id, credited_seconds)
            SELECT c.user_id, c.request_id, 'RecordTime', c.course_id, c.lesson_id, c.credited
            FROM unnest(p_user_ids, p_request_ids, p_course_ids, p_lesson_ids, v_credited,
                        v_fresh) AS c(user_id, request_id, course_id, lesson_id, credited, fresh)
            WHERE c.fresh AND c.request_id IS NOT NULL
            ORDER BY c.user_id, c.request_id, c.course_id
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS v_claimed = ROW_COUNT;
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

-- On one PostgreSQL the function's statements keep generic plans: planned once per
-- connection instead of for every call (custom plans), which halved a lone heartbeat's
-- time (1.3 → 0.7 ms, bench/time_budget.py's shapes unchanged). Citus needs custom plans
-- to route statements with parameters, so there the default stays.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        ALTER FUNCTION lp_record_heartbeats(uuid[], uuid[], varchar[], integer[], uuid[],
                                            timestamptz[], integer, integer, boolean)
            SET plan_cache_mode = force_generic_plan;
    END IF;
END;
$$;
