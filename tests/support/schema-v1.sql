-- The PostgreSQL sink schema of chunkmill version 1 (protocol 1), kept to test the migration.
-- chunkmill PostgreSQL sink schema. The saver applies it at start-up (idempotently, under an
-- advisory lock so several savers starting together do not race); a DBA who prefers to run
-- migrations by hand can apply this file and give the saver a role without CREATE rights.

-- One row per saved chunk: the record that makes saving idempotent. A chunk's objects are written
-- in the same transaction as this row, so the row exists if and only if all its objects do.
CREATE TABLE IF NOT EXISTS chunkmill_chunks (
    run       text        NOT NULL,  -- run id: 16 hex digits, from the input's content and chunk size
    chunk     bigint      NOT NULL,  -- chunk index within the run
    objects   integer     NOT NULL,  -- rows this chunk wrote to chunkmill_objects
    dead      integer     NOT NULL,  -- objects the mapper could not transform (chunkmill_dead_objects)
    lease     uuid        NOT NULL,  -- the lease whose result was saved
    attempt   integer     NOT NULL,  -- that lease's attempt number
    mapper    text        NOT NULL,  -- the mapper instance that produced it
    saver     text        NOT NULL,  -- the saver instance that committed it
    saved_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, chunk)
);

-- One row per mapped object, keyed by its id within the run.
CREATE TABLE IF NOT EXISTS chunkmill_objects (
    run      text   NOT NULL,
    id       text   NOT NULL,  -- the input object's uuid
    chunk    bigint NOT NULL,
    name     text   NOT NULL,
    friends  bigint NOT NULL,
    digest   text   NOT NULL,
    PRIMARY KEY (run, id)
);

-- Objects a mapper could not transform, with the reason (the file sink's chunk-N.dead.jsonl).
CREATE TABLE IF NOT EXISTS chunkmill_dead_objects (
    run    text    NOT NULL,
    chunk  bigint  NOT NULL,
    idx    integer NOT NULL,  -- position of the object within its chunk
    id     text,              -- its uuid, when it had a readable one
    error  text    NOT NULL,
    PRIMARY KEY (run, chunk, idx)
);
