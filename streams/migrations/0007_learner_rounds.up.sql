-- Every learning round's decision, skipped ones included: what the demo's [learning] lines, the
-- status page and `onpolicy learner status` show. One row per (adapter family, round); a learner
-- resumed after a kill that decides the same round again replaces the row (ReplacingMergeTree).
-- Written by learner/round_log.py after the round's adapter (if any) is registered and gated.
CREATE TABLE IF NOT EXISTS {db}.learner_rounds
(
    family String COMMENT 'adapter family (adapters are <family>-v0007)',
    round UInt32,
    status LowCardinality(String) COMMENT 'skipped | trained | gated | gate_failed | stopped',
    window_start UInt64 COMMENT 'signal-log offsets the round consumed: [start, end)',
    window_end UInt64,
    adapter String COMMENT 'the version it registered; empty when skipped',
    reason String COMMENT 'one line, in numbers',
    plans String COMMENT 'JSON list: per task family, how it was trained (methods: grpo, sft, sdft, sdft+sft; none = not trained) and why',
    metrics String COMMENT 'JSON: steps by method, guard decisions, timings',
    decided_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(decided_at)
ORDER BY (family, round)
SETTINGS concurrent_part_removal_threshold = 1000000000;
