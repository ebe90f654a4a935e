DROP VIEW IF EXISTS {db}.feedback_current;
