-- Claims counted by what was inserted, on Citus too.
--
-- lp_record_heartbeats claims its entries' request ids with INSERT ... SELECT ... ON
-- CONFLICT DO NOTHING and compares the rows inserted with the claims it meant to make: a
-- claim that finds its id taken meanwhile (a concurrent call whose claims its read could
-- not see yet) rolls the whole call back with serialization_failure, to be retried as a
-- replay. It read that count with GET DIAGNOSTICS ROW_COUNT, which Citus 13 (INSERT ...
-- SELECT through the coordinator) sets to the rows attempted, conflicts included: two
-- concurrent identical batches could then both be applied (seen once in the Citus test
-- tier, test_concurrent_identical_batches_count_once: every lesson's time doubled). The
-- rows a RETURNING clause gives are the rows inserted on both engines, so the count is
-- taken from those. On one PostgreSQL the result is the same as before.
--
-- The function is re-created from its current definition (0008's on Citus, 0009's on one
-- PostgreSQL) with the one statement changed; each substitution is checked to apply.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

DO $$
DECLARE
    v_function regprocedure := 'lp_record_heartbeats(uuid[], uuid[], varchar[], integer[],
        uuid[], timestamptz[], integer, integer, boolean)'::regprocedure;
    v_definition text := pg_get_functiondef(v_function);
    v_pairs text[][] := ARRAY[
        ARRAY[E'            INSERT INTO processed_requests\n',
              E'            WITH claimed AS (\n            INSERT INTO processed_requests\n'],
        ARRAY[E'            ON CONFLICT DO NOTHING;\n            GET DIAGNOSTICS v_claimed = ROW_COUNT;\n',
              E'            ON CONFLICT DO NOTHING\n            RETURNING 1)\n            SELECT count(*) INTO v_claimed FROM claimed;\n']
    ];
    i integer;
BEGIN
    FOR i IN 1 .. array_length(v_pairs, 1) LOOP
        IF strpos(v_definition, v_pairs[i][1]) = 0 THEN
            RAISE EXCEPTION 'lp_record_heartbeats is not the function of 0008: % not found',
                v_pairs[i][1];
        END IF;
        v_definition := replace(v_definition, v_pairs[i][1], v_pairs[i][2]);
    END LOOP;
    EXECUTE v_definition;
END;
$$;
