-- The service's initial schema: the course catalog, per-lesson progress (the design note's
-- lesson_progress table), per-course progress (its course_progress sibling), the attempt
-- history and the request-id memory for idempotent retries.
--
-- Indexes are a cost on every heartbeat: an index on a column that heartbeats update
-- (completed, completed_at, last_accessed_at, time_spent_seconds) would turn HOT updates
-- off. Each index below names the query it serves.

-- Sets updated_at on every UPDATE, whoever writes the row.
CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- Course outlines, registered by the course-management system.
CREATE TABLE courses (
    course_id  uuid PRIMARY KEY,
    title      text NOT NULL DEFAULT '' CHECK (length(title) <= 1000),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER courses_set_updated_at BEFORE UPDATE ON courses
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Every lesson a course outline has ever had. A lesson removed from the outline keeps its
-- row with position NULL, so that its progress rows keep their foreign key; it no longer
-- counts toward percentages and accepts no new progress.
CREATE TABLE lessons (
    course_id     uuid NOT NULL REFERENCES courses (course_id) ON DELETE CASCADE,
    lesson_id     varchar(255) NOT NULL,
    position      integer CHECK (position >= 0),
    title         text NOT NULL DEFAULT '' CHECK (length(title) <= 1000),
    assessed      boolean NOT NULL DEFAULT false,
    passing_score integer CHECK (passing_score BETWEEN 0 AND 100),
    PRIMARY KEY (course_id, lesson_id),
    -- Serves "the outline of a course in order". Deferred so that UpsertCourse can reorder
    -- lessons in one statement.
    CONSTRAINT lessons_course_position_key UNIQUE (course_id, position)
        DEFERRABLE INITIALLY DEFERRED
);

-- One learner's progress in one lesson: every column, default and CHECK of the design note.
--
-- The primary key is the natural key (user_id, course_id, lesson_id) rather than the note's
-- surrogate id, so every unique key starts with user_id and the table can be partitioned
-- (or distributed) by user_id. `id` stays as a stable external handle; gen_random_uuid()
-- makes it unique without an index that every new row would pay for.
--
-- The note's six indexes, and what became of them:
--   user_id, (user_id, course_id)  -> served by the primary key's prefix.
--   course_id, lesson_id           -> replaced by (course_id, user_id, lesson_id) below.
--   completed, completed_at        -> dropped: no query of the service filters on them
--                                     alone, and both columns change on completion.
-- fillfactor leaves room on each page so heartbeat updates stay on the page (HOT).
CREATE TABLE lesson_progress (
    id                 uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id            uuid NOT NULL,
    course_id          uuid NOT NULL,
    lesson_id          varchar(255) NOT NULL,
    completed          boolean NOT NULL DEFAULT false,
    time_spent_seconds integer NOT NULL DEFAULT 0 CHECK (time_spent_seconds >= 0),
    attempts           integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    score              integer CHECK (score >= 0 AND score <= 100),
    first_started_at   timestamptz NOT NULL DEFAULT now(),
    last_accessed_at   timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, course_id, lesson_id),
    FOREIGN KEY (course_id, lesson_id) REFERENCES lessons (course_id, lesson_id)
        ON DELETE CASCADE,
    CHECK (completed = (completed_at IS NOT NULL))
) WITH (fillfactor = 85);

-- Serves every per-course read: the per-lesson statistics (all rows of a course), the
-- learners of a course in user_id order without a sort (StreamCourseLearners), and the
-- cascade from lessons when a course is deleted. None of its columns ever changes.
CREATE INDEX lesson_progress_course_user_idx
    ON lesson_progress (course_id, user_id, lesson_id);

CREATE TRIGGER lesson_progress_set_updated_at BEFORE UPDATE ON lesson_progress
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- One learner's progress in one course: the design note's "hybrid" row with the JSONB list
-- of completed lesson ids, written in the same transaction as the lesson row it mirrors.
-- The list never holds a duplicate (the append is guarded) and keeps lessons later removed
-- from the outline; the percentage is derived from it and the current outline when read,
-- so it can neither pass 100% nor go stale when an outline changes.
CREATE TABLE course_progress (
    user_id           uuid NOT NULL,
    course_id         uuid NOT NULL REFERENCES courses (course_id) ON DELETE CASCADE,
    completed_lessons jsonb NOT NULL DEFAULT '[]'
        CHECK (jsonb_typeof(completed_lessons) = 'array'),
    completed_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, course_id)
);

-- Serves the cascade from courses, the course-wide completion update of UpsertCourse and
-- the merge with lesson_progress in user_id order (StreamCourseLearners).
CREATE INDEX course_progress_course_user_idx ON course_progress (course_id, user_id);

CREATE TRIGGER course_progress_set_updated_at BEFORE UPDATE ON course_progress
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- The attempt history (the design note's missing audit trail): one row per accepted
-- RecordAttempt, numbered 1, 2, ... per lesson. The primary key serves ListAttempts paging
-- and the cascade from lesson_progress.
CREATE TABLE lesson_attempts (
    user_id        uuid NOT NULL,
    course_id      uuid NOT NULL,
    lesson_id      varchar(255) NOT NULL,
    attempt_number integer NOT NULL CHECK (attempt_number >= 1),
    score          integer NOT NULL CHECK (score >= 0 AND score <= 100),
    request_id     uuid,
    attempted_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, course_id, lesson_id, attempt_number),
    FOREIGN KEY (user_id, course_id, lesson_id)
        REFERENCES lesson_progress (user_id, course_id, lesson_id) ON DELETE CASCADE
);

-- Request ids of applied writes (AIP-155), so that a retry is applied at most once per
-- learner. The call they belong to is kept to refuse reuse of an id for another call.
CREATE TABLE processed_requests (
    user_id    uuid NOT NULL,
    request_id uuid NOT NULL,
    method     text NOT NULL,
    course_id  uuid NOT NULL,
    lesson_id  varchar(255) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, request_id)
);

-- Serve the retention purge (DELETE ... WHERE created_at < cutoff) and DeleteCourse, which
-- forgets the course's request ids so that a retry after the course is registered again
-- is applied afresh. Rows are never updated, so these indexes cost no HOT update.
CREATE INDEX processed_requests_created_at_idx ON processed_requests (created_at);
CREATE INDEX processed_requests_course_idx ON processed_requests (course_id);

-- Secrets shared by every replica, generated once: the key that signs page tokens.
CREATE TABLE service_secrets (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);

INSERT INTO service_secrets (name, value)
VALUES ('page_token_key',
        decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
