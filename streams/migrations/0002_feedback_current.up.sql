-- The learner reads one current judgement per (user, target, kind): the latest wins, and the
-- feedback table keeps the whole history. A view, so it is always consistent with the table.
CREATE VIEW IF NOT EXISTS {db}.feedback_current AS
SELECT
    tenant, user_id, interaction_id, episode_id, kind,
    argMax(event_id, (ts, event_id)) AS latest_event_id,
    max(ts) AS latest_ts,
    argMax(value, (ts, event_id)) AS value,
    argMax(comment, (ts, event_id)) AS comment,
    argMax(correction, (ts, event_id)) AS correction,
    argMax(source, (ts, event_id)) AS source,
    argMax(weight, (ts, event_id)) AS weight,
    count() AS revisions
FROM {db}.feedback FINAL
GROUP BY tenant, user_id, interaction_id, episode_id, kind;
