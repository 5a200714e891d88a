-- Resume bookmarks on lesson rows, and the progress event outbox behind WatchProgress.

-- Where the learner left off (SCORM's `location`): opaque, at most 4 KiB. Not indexed, so
-- saving a bookmark stays a HOT update.
ALTER TABLE lesson_progress
    ADD COLUMN bookmark text CHECK (octet_length(bookmark) <= 4096),
    ADD COLUMN bookmarked_at timestamptz;

-- The outbox: one row per progress change that watchers hear about (not time heartbeats),
-- written in the same statement as the change itself, with a snapshot of the lesson row.
--
-- Every statement that writes events takes a per-course transaction-scoped advisory lock
-- before the event id is drawn and holds it until commit, so within one course event ids
-- become visible in increasing order: a watcher that resumes "after event N" of a course
-- can never miss an event that committed late with a smaller id. The cost is that event-
-- writing statements of one course commit one at a time; heartbeats write no events.
CREATE TABLE progress_events (
    event_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id          uuid NOT NULL REFERENCES courses (course_id) ON DELETE CASCADE,
    user_id            uuid NOT NULL,
    -- 1 STARTED, 2 ATTEMPTED, 3 COMPLETED, 4 COURSE_COMPLETED, 5 BOOKMARKED
    kind               smallint NOT NULL CHECK (kind BETWEEN 1 AND 5),
    occurred_at        timestamptz NOT NULL DEFAULT now(),
    -- Snapshot of the lesson row; all NULL for a course completion caused by an outline
    -- change rather than by a lesson.
    lesson_id          varchar(255),
    completed          boolean,
    time_spent_seconds integer,
    attempts           integer,
    score              integer,
    first_started_at   timestamptz,
    last_accessed_at   timestamptz,
    completed_at       timestamptz,
    created_at         timestamptz,
    updated_at         timestamptz,
    bookmark           text,
    bookmarked_at      timestamptz
);

-- Serves WatchProgress: the events of a course after a given id, and the course's head.
CREATE INDEX progress_events_course_idx ON progress_events (course_id, event_id);
-- Serves the erasure of a learner (DeleteUserProgress).
CREATE INDEX progress_events_user_idx ON progress_events (user_id);
-- Serves the retention purge.
CREATE INDEX progress_events_occurred_at_idx ON progress_events (occurred_at);

-- Per course, the highest event id the retention purge removed: a watcher resuming from
-- an older id has missed events and is told so instead of silently skipping them.
CREATE TABLE progress_event_purges (
    course_id      uuid PRIMARY KEY REFERENCES courses (course_id) ON DELETE CASCADE,
    purged_through bigint NOT NULL
);
