//! The Kafka adapter: a topic per bus topic, a consumer group per group, keys as partition keys.
