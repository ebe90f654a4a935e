-- Reconciliation: each proxy replica's per-minute counts (TallyEvent). A replica reports a minute
-- several times with cumulative counts, so readers take max() per (reporter, minute); repeated or
-- redelivered reports change nothing, which is why a plain MergeTree is enough here.
CREATE TABLE IF NOT EXISTS {db}.tallies
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    schema_version UInt16,
    reporter String COMMENT 'proxy replica, unique per process lifetime',
    minute DateTime('UTC') COMMENT 'start of the UTC minute counted',
    interactions UInt64 COMMENT 'requests handed to capture in the minute (cumulative)',
    feedback UInt64 COMMENT 'feedback events accepted in the minute (cumulative)',
    kafka_topic LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset UInt64
)
ENGINE = MergeTree
ORDER BY (minute, reporter);
