-- Remove outdated parts on the merging thread instead of in parallel.
-- Past concurrent_part_removal_threshold (default 100) outdated parts, ClickHouse removes them with
-- up to max_parts_cleaning_thread_pool_size (128) threads at once. In the embedded engine those
-- threads then stay in the process, and each keeps three descriptors open on its procfs counters
-- (/proc/<pid>/task/<tid>/{stat,schedstat,io}) once it runs part of a query: the sink grew by ~128
-- threads after its first merges and its descriptors climbed by +16 a minute in a 10-minute soak
-- (docs/reliability.md). With the threshold out of reach the engine stays at ~30 threads and its
-- descriptors stay flat (tests/integration/test_warehouse.py). Serial removal is plenty at our
-- insert rates; a server with a real pool can lower the threshold again.
ALTER TABLE {db}.interactions MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.feedback MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.control MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.dead_letters MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.environments MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.prompt_pools MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.rewards MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.reward_validations MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.adapter_versions MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.adapter_evaluations MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
ALTER TABLE {db}.tallies MODIFY SETTING concurrent_part_removal_threshold = 1000000000;
