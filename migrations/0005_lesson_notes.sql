-- Lesson notes: a learner's private notes on the lessons of a course (ProgressService's
-- CreateNote, UpdateNote, DeleteNote, ListNotes).
--
-- The key starts with course_id (Citus distributes the table by it, next to the learner's
-- progress rows) and holds the learner, so that every read and write of the service finds
-- a note by (course_id, user_id, note_id). The foreign key is to the course, like
-- course_progress: DeleteCourse removes the notes with one cascade query over this key,
-- rather than one per lesson. That the lesson exists, and is in the current outline, is
-- checked by every write in the same statement; a lesson left out of the outline keeps
-- its notes (hidden until it comes back), as it keeps its progress rows.
CREATE TABLE lesson_notes (
    course_id  uuid NOT NULL,
    user_id    uuid NOT NULL,
    note_id    uuid NOT NULL,
    lesson_id  varchar(255) NOT NULL,
    -- Opaque, like a bookmark: at most 4 KiB.
    anchor     text NOT NULL DEFAULT '' CHECK (octet_length(anchor) <= 4096),
    -- 1 to 10,000 characters (not bytes).
    body       text NOT NULL CHECK (char_length(body) BETWEEN 1 AND 10000),
    -- The request id CreateNote was called with, so that its retry finds this note.
    request_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, user_id, note_id)
);

-- Serves ListNotes: a learner's notes in a course, newest first (the lesson filter is
-- applied on the way; a learner has few notes per course). None of its columns changes.
CREATE INDEX lesson_notes_newest_idx
    ON lesson_notes (course_id, user_id, created_at DESC, note_id DESC);
-- Serves the erasure of a learner (DeleteUserProgress), across courses.
CREATE INDEX lesson_notes_user_idx ON lesson_notes (user_id);

CREATE TRIGGER lesson_notes_set_updated_at BEFORE UPDATE ON lesson_notes
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- The foreign key is added last: on Citus, after the table is distributed (colocated with
-- the progress tables), as migration 0003 does for the keys of its distributed tables; a
-- key to the reference table courses made first would turn the table into a Citus local
-- table before it could be distributed. On one PostgreSQL only the key is added.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        SET LOCAL citus.enable_unsafe_triggers TO on;
        SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
        PERFORM create_distributed_table('lesson_notes', 'course_id',
                                         colocate_with => 'lesson_progress');
    END IF;
    ALTER TABLE lesson_notes
        ADD CONSTRAINT lesson_notes_course_id_fkey
        FOREIGN KEY (course_id) REFERENCES courses (course_id) ON DELETE CASCADE;
END;
$$;
