"""The message bus: NATS subjects, typed messages, and the connection helper."""
