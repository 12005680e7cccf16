-- chunkmill PostgreSQL sink schema, version 2. The saver applies it at start-up (idempotently,
-- under an advisory lock so several savers starting together do not race); a DBA who prefers to
-- run migrations by hand can apply this file and give the saver a role without CREATE rights.
--
-- A database made by version 1 (tables chunkmill_chunks, chunkmill_objects,
-- chunkmill_dead_objects, no chunkmill_schema) is migrated by adding to it: new tables and new
-- columns with defaults; nothing of version 1 is changed or dropped (its runs stay readable in
-- chunkmill_objects). A database of a newer schema is refused by the saver before this runs.

CREATE TABLE IF NOT EXISTS chunkmill_schema (
    version   integer     NOT NULL,
    applied   timestamptz NOT NULL DEFAULT now()
);

-- The sink's identity: one row, made by the first saver. The fetcher records which sink a run
-- saves into and refuses acknowledgements from any other.
CREATE TABLE IF NOT EXISTS chunkmill_sink (
    id        text        PRIMARY KEY,
    created   timestamptz NOT NULL DEFAULT now()
);

-- One row per saved chunk: the record that makes saving idempotent. A chunk's outputs are written
-- in the same transaction as this row, so the row exists if and only if all its outputs do.
CREATE TABLE IF NOT EXISTS chunkmill_chunks (
    run       text        NOT NULL,  -- run id: 16 hex digits, from the input, chunk size and job
    chunk     bigint      NOT NULL,  -- chunk index within the run
    objects   integer     NOT NULL,  -- input objects of the chunk
    dead      integer     NOT NULL,  -- of those, dead-lettered (chunkmill_dead_objects)
    lease     uuid        NOT NULL,  -- the lease whose result was saved
    attempt   integer     NOT NULL,  -- that lease's attempt number
    mapper    text        NOT NULL,  -- the mapper instance that produced it
    saver     text        NOT NULL,  -- the saver instance that committed it
    saved_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, chunk)
);
ALTER TABLE chunkmill_chunks ADD COLUMN IF NOT EXISTS outputs integer NOT NULL DEFAULT 0;  -- rows in chunkmill_outputs
ALTER TABLE chunkmill_chunks ADD COLUMN IF NOT EXISTS job text NOT NULL DEFAULT '';        -- the job's fingerprint

-- One row per output value: position (input object `idx` of `chunk`, its `out`-th output), the
-- record's id when the job has an id field, and the value itself.
CREATE TABLE IF NOT EXISTS chunkmill_outputs (
    run    text    NOT NULL,
    chunk  bigint  NOT NULL,
    idx    integer NOT NULL,  -- position of the input object within its chunk
    out    integer NOT NULL,  -- position of the value among that object's outputs
    id     text,              -- the input object's id (the job's --id-field), if any
    doc    jsonb   NOT NULL,
    PRIMARY KEY (run, chunk, idx, out)
);
CREATE UNIQUE INDEX IF NOT EXISTS chunkmill_outputs_id ON chunkmill_outputs (run, id, out) WHERE id IS NOT NULL;

-- Objects without outputs, with the reason (the file sink's chunk-N.dead.jsonl).
CREATE TABLE IF NOT EXISTS chunkmill_dead_objects (
    run    text    NOT NULL,
    chunk  bigint  NOT NULL,
    idx    integer NOT NULL,  -- position of the object within its chunk
    id     text,              -- its id, when it had one
    error  text    NOT NULL,
    PRIMARY KEY (run, chunk, idx)
);
ALTER TABLE chunkmill_dead_objects ADD COLUMN IF NOT EXISTS cause text NOT NULL DEFAULT 'transform';
ALTER TABLE chunkmill_dead_objects ADD COLUMN IF NOT EXISTS line bigint;

INSERT INTO chunkmill_schema (version) SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM chunkmill_schema WHERE version = 2);
