//! Tracing, OpenTelemetry, Prometheus metrics and one health model for Soma platform services
