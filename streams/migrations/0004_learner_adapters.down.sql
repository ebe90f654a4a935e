DROP TABLE IF EXISTS {db}.adapter_evaluations;
DROP TABLE IF EXISTS {db}.adapter_versions;
