"""The producer's partitioner puts every key where kafka-python's DefaultPartitioner (and the Java
client) would: an episode's events stay in one partition whichever client wrote them."""

from __future__ import annotations

import random

from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as kafka_murmur2

from streams.producer import _key_partitioner, murmur2


class Cluster:
    def __init__(self, n):
        self.n = n

    def topics(self):
        return {"t"}

    def partitions_for_topic(self, topic):
        return set(range(self.n)) if topic == "t" else None

    def available_partitions_for_topic(self, topic):
        return self.partitions_for_topic(topic)


def test_murmur2_and_partitions_match_kafka_python():
    rng = random.Random(3)
    ours, theirs = _key_partitioner(), DefaultPartitioner()
    for _ in range(5000):
        key = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        assert murmur2(key) == kafka_murmur2(key)
        cluster = Cluster(rng.choice((1, 3, 4, 12)))
        assert ours.partition("t", key, key, b"", b"", cluster) == theirs.partition("t", key, key, b"", b"", cluster)
    assert ours.partition("t", None, None, b"", b"", Cluster(4)) in range(4)  # no key: random, as kafka-python
