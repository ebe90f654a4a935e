-- The learner's environments and rewards: what was built from traffic, at which version, and how
-- each reward held up against held-out human feedback. Rows are immutable facts; a status change
-- (a reward retired) is a new row with a later updated_at, and ReplacingMergeTree(updated_at)
-- keeps the latest per key when read with FINAL.
CREATE TABLE IF NOT EXISTS {db}.environments
(
    env_version String COMMENT 'immutable: <family_id>-e<content hash>',
    family_id String,
    tenant String,
    label String,
    signature String COMMENT 'JSON: how the family was found',
    build_id String COMMENT 'the build (environment set) that produced it',
    seed UInt64,
    split_time DateTime64(3, 'UTC'),
    n_train UInt32,
    n_heldout UInt32,
    n_synthetic UInt32,
    manifest String COMMENT 'JSON: sources, counts, settings, data window',
    created_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (family_id, env_version);

CREATE TABLE IF NOT EXISTS {db}.prompt_pools
(
    env_version String,
    family_id String,
    prompt_id String,
    split LowCardinality(String) COMMENT 'train | heldout',
    origin LowCardinality(String) COMMENT 'replay | slot_fill | paraphrase',
    synthetic Bool,
    parent_id String,
    near_dup_group String,
    messages String COMMENT 'JSON: the prefix to replay',
    request_kwargs String COMMENT 'JSON: tools, response_format, max_tokens, ...',
    first_seen DateTime64(3, 'UTC'),
    n_seen UInt32,
    source_interactions Array(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (env_version, prompt_id);

CREATE TABLE IF NOT EXISTS {db}.rewards
(
    family_id String,
    name String COMMENT 'unique within the family, e.g. learned_rm, json_schema',
    reward_version String COMMENT 'content hash of the kind and its parameters',
    kind LowCardinality(String),
    tenant String,
    env_version String,
    status LowCardinality(String) COMMENT 'active | logged | rejected | retired | insufficient',
    weight Float64 COMMENT 'in the family combiner; 0 = logged only',
    params String COMMENT 'JSON (large models: base64 of compressed arrays)',
    reason String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (family_id, name, reward_version);

CREATE TABLE IF NOT EXISTS {db}.reward_validations
(
    validation_id String,
    family_id String,
    name String,
    reward_version String,
    n UInt32,
    n_pos UInt32,
    n_neg UInt32,
    coverage Float64,
    auc Nullable(Float64),
    ci_low Nullable(Float64),
    ci_high Nullable(Float64),
    agreement Nullable(Float64),
    bar Float64,
    passed Bool,
    reason String,
    purpose LowCardinality(String) COMMENT 'initial | revalidation',
    validated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (family_id, name, reward_version, validated_at, validation_id);
