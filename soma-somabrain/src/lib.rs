//! A typed, circuit-broken client for the SomaBrain memory service
