DROP TABLE IF EXISTS {db}.dead_letters;
DROP TABLE IF EXISTS {db}.control;
DROP TABLE IF EXISTS {db}.feedback;
DROP TABLE IF EXISTS {db}.interactions;
