DROP TABLE IF EXISTS {db}.learner_rounds;
