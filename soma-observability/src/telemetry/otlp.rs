//! OTLP exporters (feature `otlp`): gRPC over tonic, HTTP/protobuf over hyper.
//!
//! Both are plaintext (a collector agent or sidecar on the host or pod
//! network); an `https://` endpoint is refused with a config error.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use opentelemetry_otlp::{
    Protocol, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _,
};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor};
use soma_config::Secret;

use super::TelemetryError;
use crate::config::{OtlpProtocol, TelemetryConfig};

const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

pub(super) fn batch_processor(
    config: &TelemetryConfig,
    endpoint: &str,
) -> Result<BatchSpanProcessor, TelemetryError> {
    if endpoint.starts_with("https://") {
        return Err(TelemetryError::InvalidConfig {
            field: "otlp_endpoint",
            reason: "TLS export is not built in; point at a plaintext collector (http://)".into(),
        });
    }
    if !endpoint.starts_with("http://") {
        return Err(TelemetryError::InvalidConfig {
            field: "otlp_endpoint",
            reason: format!("`{endpoint}` is not an http:// URL"),
        });
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let timeout = Duration::from_millis(config.otlp_timeout_ms.max(1));
    let exporter = match config.otlp_protocol {
        OtlpProtocol::Grpc => {
            let _enter = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_protocol(Protocol::Grpc)
                .with_timeout(timeout)
                .with_metadata(metadata(&config.otlp_headers)?)
                .build()
        }
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(timeout)
            .with_headers(
                config
                    .otlp_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose_secret().to_owned()))
                    .collect::<HashMap<_, _>>(),
            )
            .with_http_client(RuntimeHyperClient::new(runtime, timeout))
            .build(),
    }
    .map_err(|e| TelemetryError::Export(e.to_string()))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(config.batch_max_queue_size)
        .with_max_export_batch_size(config.batch_max_export_batch_size)
        .with_scheduled_delay(Duration::from_millis(config.batch_scheduled_delay_ms))
        .build();
    Ok(BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build())
}

fn metadata(
    headers: &std::collections::BTreeMap<String, Secret>,
) -> Result<tonic::metadata::MetadataMap, TelemetryError> {
    let mut map = tonic::metadata::MetadataMap::new();
    for (name, value) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| TelemetryError::InvalidConfig {
                field: "otlp_headers",
                reason: format!("`{name}` is not a valid header name"),
            })?;
        let mut value =
            tonic::metadata::MetadataValue::try_from(value.expose_secret()).map_err(|_| {
                TelemetryError::InvalidConfig {
                    field: "otlp_headers",
                    reason: format!("the value of `{name}` is not a valid header value"),
                }
            })?;
        value.set_sensitive(true);
        map.insert(key, value);
    }
    Ok(map)
}

/// An OTLP/HTTP client that runs its requests on a captured tokio runtime, so
/// it works from the SDK's export thread (which has no runtime of its own).
#[derive(Debug, Clone)]
struct RuntimeHyperClient {
    runtime: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl RuntimeHyperClient {
    fn new(runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Self {
            runtime,
            client,
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHyperClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = async move {
                let response = client.request(request.map(Full::new)).await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(format!("OTLP/HTTP export timed out after {timeout:?}").into()),
            }
        });
        task.await
            .map_err(|e| -> opentelemetry_http::HttpError { Box::new(e) })?
    }
}
