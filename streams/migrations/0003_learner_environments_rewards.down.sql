DROP TABLE IF EXISTS {db}.reward_validations;
DROP TABLE IF EXISTS {db}.rewards;
DROP TABLE IF EXISTS {db}.prompt_pools;
DROP TABLE IF EXISTS {db}.environments;
