"""The learner's Prometheus metrics (``onpolicy learner run --metrics-port``).

Training progress (rounds, steps, reward, KL, rollout tokens/s) and the release pipeline (shadow
results, canary state, observations per arm, decisions). The publisher's own metrics
(``onpolicy_publish_*``, ``learner/publisher.py``) live in the same registry and are served too.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROUNDS = Counter("onpolicy_learner_rounds_total", "Learning rounds finished, by outcome.", ["status"])
STEPS = Counter("onpolicy_learner_steps_total", "GRPO steps taken.")
REWARD = Gauge("onpolicy_learner_reward", "Mean validated reward of the last step's rollouts.")
KL = Gauge("onpolicy_learner_kl", "KL to the reference policy at the last step.")
ROLLOUT_TOK_S = Gauge("onpolicy_learner_rollout_tokens_per_second", "Rollout generation speed at the last step.")
ROUND = Gauge("onpolicy_learner_round", "The round the loop is in (or last finished).")
GATE = Counter("onpolicy_learner_gate_total", "Gate results.", ["result"])
SHADOW = Counter("onpolicy_learner_shadow_total", "Shadow-stage results.", ["result"])
CANARY_STATE = Gauge("onpolicy_learner_canary_state",
                     "Release stage of the candidate in flight: 0 none, 1 shadow, 2 canary.")
CANARY_OBS = Gauge("onpolicy_learner_canary_observations", "Judged requests in the running canary, by arm.", ["arm"])
CANARY_RATE = Gauge("onpolicy_learner_canary_good_rate", "Share of good judgements in the running canary, by arm.",
                    ["arm"])
CANARY_P_WORSE = Gauge("onpolicy_learner_canary_p_candidate_worse",
                       "Posterior probability that the candidate is worse than production (running canary).")
CANARY_DECISIONS = Counter("onpolicy_learner_canary_decisions_total", "Canary decisions.", ["decision"])


def record_step(rec: dict) -> None:
    """One training step's record from the loop (``LearningLoop.on_step``)."""
    STEPS.inc()
    ROUND.set(rec.get("round", 0))
    for gauge, key in ((REWARD, "reward"), (KL, "kl"), (ROLLOUT_TOK_S, "rollout_tok_s")):
        v = rec.get(key)
        if isinstance(v, (int, float)):
            gauge.set(float(v))


def record_canary(evidence: dict) -> None:
    for arm in ("candidate", "production"):
        a = evidence.get(arm) or {}
        CANARY_OBS.labels(arm).set(a.get("n") or 0)
        if a.get("rate") is not None:
            CANARY_RATE.labels(arm).set(a["rate"])
    if evidence.get("p_candidate_worse") is not None:
        CANARY_P_WORSE.set(evidence["p_candidate_worse"])


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics endpoint in a daemon thread; returns the port (0 picks a free one)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
