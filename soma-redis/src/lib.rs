//! A resilient Redis client (fred) with cache, rate limiter, idempotency, lease and pub/sub helpers
