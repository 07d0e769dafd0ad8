-- The default table: one row per metered usage record.
-- Loaded on a node's first start and copied into its data directory; the copy there is
-- what later starts read.
CREATE TABLE usage (
    record_id   TEXT NOT NULL,          -- idempotency key: a record is stored once
    entity_id   TEXT NOT NULL,          -- shard key
    service     TEXT NOT NULL,          -- e.g. storage
    operation   TEXT NOT NULL,          -- e.g. GetObject
    usage_type  TEXT NOT NULL,          -- e.g. Requests, Bytes-Out
    region      TEXT,
    quantity    DECIMAL(38, 6) NOT NULL,-- exact sums for billing
    event_time  TIMESTAMP NOT NULL,     -- UTC, microseconds; time column
    ingest_time TIMESTAMP NOT NULL      -- set by Tidemark
) WITH (
    shard_key = 'entity_id',
    time_column = 'event_time',
    idempotency_key = 'record_id',
    ingest_time_column = 'ingest_time',
    sort_key = 'entity_id,service,operation,event_time',
    bloom_filter_columns = 'entity_id'
);
