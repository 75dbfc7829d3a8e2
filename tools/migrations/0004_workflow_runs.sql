-- The record of workflow runs (graphs/workflow_runs.py), in the schema of their LangGraph
-- checkpoints, as the SQLite log sits beside them in workflows.sqlite. JSON is kept as text and
-- times as unix seconds, as there: both logs run the same statements.
CREATE SCHEMA IF NOT EXISTS signalgraph_workflows;

CREATE TABLE signalgraph_workflows.runs (
    id text PRIMARY KEY,
    workflow text NOT NULL,
    source text NOT NULL,
    profile text,
    spec text NOT NULL,
    inputs text NOT NULL,
    status text NOT NULL,
    step text,
    pid integer,
    pid_started double precision,
    host text,  -- the machine of pid
    created double precision NOT NULL,
    updated double precision NOT NULL,
    error text,
    question text,
    outputs text
);
CREATE INDEX runs_by_created ON signalgraph_workflows.runs (created);

CREATE TABLE signalgraph_workflows.events (
    -- the log's order, named as SQLite's implicit column so both logs read it with one query
    rowid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id text NOT NULL,
    step text,
    event text NOT NULL,
    attempt integer,
    detail text,
    time double precision NOT NULL
);
CREATE INDEX events_by_run ON signalgraph_workflows.events (run_id, rowid);
