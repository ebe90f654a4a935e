DROP TABLE IF EXISTS {db}.tallies;
