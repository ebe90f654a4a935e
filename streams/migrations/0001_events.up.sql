-- Interactions, feedback and control events, one row per event.
-- ReplacingMergeTree ordered by event_id: the sink delivers at least once, and a redelivered event
-- has the same event_id and identical columns, so merges (and FINAL reads) keep exactly one row.
-- event_id is a UUIDv7 string: sorting by it is sorting by time.
CREATE TABLE IF NOT EXISTS {db}.interactions
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    schema_version UInt16,
    interaction_id String,
    endpoint LowCardinality(String),
    public_model LowCardinality(String),
    upstream_model String,
    adapter_version LowCardinality(String) COMMENT 'empty = the base model',
    upstream LowCardinality(String),
    stream Bool,
    request String COMMENT 'JSON, as the client sent it (redacted)',
    response String COMMENT 'JSON; for streams the assembled response',
    sampling String COMMENT 'JSON',
    prompt_tokens Nullable(UInt32),
    completion_tokens Nullable(UInt32),
    latency_first_token_ms Nullable(Float64),
    latency_total_ms Nullable(Float64),
    http_status UInt16,
    error String,
    finish_reasons Array(String),
    logprobs String COMMENT 'JSON, empty when not requested',
    abandoned Bool,
    episode_id String,
    user_id String,
    tenant String,
    train_opt_out Bool,
    kafka_topic LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset UInt64,
    landed_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_interaction interaction_id TYPE bloom_filter GRANULARITY 4,
    INDEX idx_episode episode_id TYPE bloom_filter GRANULARITY 4,
    INDEX idx_adapter adapter_version TYPE set(256) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY event_id;

CREATE TABLE IF NOT EXISTS {db}.feedback
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    schema_version UInt16,
    interaction_id String,
    episode_id String,
    kind LowCardinality(String),
    value Nullable(Float64),
    comment String,
    correction String COMMENT 'JSON list of messages, empty when none',
    source LowCardinality(String),
    weight Float64,
    idempotency_key String,
    user_id String,
    tenant String,
    metadata String COMMENT 'JSON',
    kafka_topic LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset UInt64,
    landed_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_interaction interaction_id TYPE bloom_filter GRANULARITY 4,
    INDEX idx_episode episode_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY event_id;

CREATE TABLE IF NOT EXISTS {db}.control
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    schema_version UInt16,
    action LowCardinality(String),
    actor String,
    reason String,
    public_model String,
    adapter_version String,
    payload String COMMENT 'JSON',
    kafka_topic LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset UInt64,
    landed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY event_id;

-- What the sink could not decode; the raw payload and the reason, for an operator to inspect.
CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    kafka_topic LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset UInt64,
    reason String,
    payload String,
    landed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (kafka_topic, kafka_partition, kafka_offset);
