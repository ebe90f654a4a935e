"""The durable embedded broker serves a partition holding more than 1000 stored batches.

tansu lists a partition's batch objects in s3rver; past 1000 keys the listing is paginated, and
s3rver's continuation token uses DES, which Node's OpenSSL 3 refuses unless the legacy provider is
on -- then every fetch of that partition failed (500) and the sink stopped landing anything. Found
by the chaos suite after ~15 minutes of load.
"""

from __future__ import annotations

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from streams.embedded import EmbeddedBroker

pytestmark = __import__("pytest").mark.slow


def test_more_than_1000_batches_in_one_partition_are_fetched(tmp_path):
    n = 1050
    with EmbeddedBroker(data_dir=tmp_path / "broker", durable=True) as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics([NewTopic("listing", 1, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", enable_idempotence=False,
                                 linger_ms=0)
        for i in range(n):  # one record per request: one stored batch (one S3 object) each
            producer.send("listing", value=b"%d" % i).get(timeout=30)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=None, enable_auto_commit=False)
        tp = TopicPartition("listing", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        for _ in range(200):
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(int(r.value) for r in records)
            if len(got) >= n:
                break
        consumer.close()
    assert got == list(range(n))
