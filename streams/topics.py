"""Topic names and their configs, in one place. Topics are created explicitly at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


INTERACTIONS = Topic("onpolicy.interactions.v1", partitions=4, configs={"retention.ms": str(7 * 24 * 3600 * 1000)})
FEEDBACK = Topic("onpolicy.feedback.v1", partitions=4, configs={"retention.ms": str(7 * 24 * 3600 * 1000)})
# One partition: control events are a totally ordered log that every proxy replays from the start
# on boot to rebuild its routing table. Kept forever (not compacted: compaction would erase the
# history that rollback and the audit log need).
CONTROL = Topic("onpolicy.control.v1", partitions=1, configs={"retention.ms": "-1"})
DEADLETTER = Topic("onpolicy.deadletter.v1", partitions=1, configs={"retention.ms": str(30 * 24 * 3600 * 1000)})

# Per-minute counts from each proxy replica, for reconciliation (streams.reconcile): small and few.
TALLIES = Topic("onpolicy.tallies.v1", partitions=1, configs={"retention.ms": str(7 * 24 * 3600 * 1000)})

ALL = (INTERACTIONS, FEEDBACK, CONTROL, DEADLETTER, TALLIES)
BY_EVENT_TYPE = {"interaction": INTERACTIONS, "feedback": FEEDBACK, "control": CONTROL, "tally": TALLIES}
