"""The contract between the proxy and the learner: events, topics, producer, consumer, warehouse.

Nothing in this package imports from ``proxy`` or ``learner``, and nothing here imports torch.
"""
