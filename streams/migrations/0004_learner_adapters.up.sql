-- The learner's adapter registry: every adapter version with its lineage and status, and the
-- evidence of every gate / shadow / canary evaluation. Versions are immutable facts; a status change
-- is a new row with a later updated_at (ReplacingMergeTree keeps the latest with FINAL), so the
-- status history stays in the evaluations log. Evidence rows are written before the status row that
-- cites them.
CREATE TABLE IF NOT EXISTS {db}.adapter_versions
(
    name String COMMENT 'immutable: <family>-v0007',
    family String,
    version UInt32,
    parent String COMMENT 'adapter it was trained from; empty = the base model',
    base_model String,
    path String COMMENT 'registry copy of the files (read-only)',
    sha256 String COMMENT 'publisher.adapter_sha256 of the files',
    status LowCardinality(String) COMMENT 'candidate | gate_failed | gated | shadow_failed | canary | production | rolled_back | retired',
    data_window String COMMENT 'JSON: consumed offsets and time range',
    env_versions Array(String),
    reward_versions Array(String),
    hyperparams String COMMENT 'JSON: trainer settings',
    metrics String COMMENT 'JSON: training metrics',
    reason String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (family, version);

CREATE TABLE IF NOT EXISTS {db}.adapter_evaluations
(
    eval_id String,
    name String,
    family String,
    stage LowCardinality(String) COMMENT 'gate | shadow | canary',
    against String COMMENT 'the adapter it was compared with; empty = the base model',
    passed Bool,
    decision LowCardinality(String) COMMENT 'pass | fail | promote | rollback | continue',
    evidence String COMMENT 'JSON: figures behind the decision',
    reason String,
    evaluated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (family, name, stage, eval_id);
