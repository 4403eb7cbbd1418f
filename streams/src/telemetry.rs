//! What operators watch, the same way in every component: Prometheus metrics (OpenMetrics
//! text from `prometheus-client`), `/healthz` and `/readyz`, on one HTTP listener.
//!
//! `/healthz` answers 200 while the process serves requests at all. `/readyz` answers 200 only
//! when the NATS connection is up and every readiness condition the component declared holds
//! (streams present, consumer bound, keys loaded…), else 503 with one line per condition.
//! Every component also exports `rct_nats_connected` (1 or 0).
//!
//! Traces: [`continue_trace`] joins a component's span for one command to the operation's
//! trace (the `traceparent` it received) and gives the `traceparent` to send on. With
//! OpenTelemetry export on (`OTEL_EXPORTER_OTLP_ENDPOINT`), that is the exported span's own
//! context, so a tracing backend shows CLI → admission → agent as one tree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The span export layer and the provider to flush at exit.
pub(crate) type Export<S> = (
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    opentelemetry_sdk::trace::SdkTracerProvider,
);

/// The OTLP/HTTP span export layer and its provider, when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the exporter reads both, and the other
/// standard `OTEL_*` variables, itself).
pub(crate) fn otlp<S>(service: &str) -> Result<Option<Export<S>>, String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;

    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| e.to_string())?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer(service.to_owned());
    Ok(Some((
        tracing_opentelemetry::layer().with_tracer(tracer),
        provider,
    )))
}

/// Joins `span` to the trace of a received message (its `traceparent` header, if any),
/// records the trace id on the span (its `trace_id` field), and returns the context to send
/// on: the exported span's when OpenTelemetry export is on, else a new span id of the same
/// trace (or a new trace, without a valid header).
pub fn continue_trace(
    span: &tracing::Span,
    headers: Option<&async_nats::HeaderMap>,
) -> rct_bus::trace::TraceContext {
    let trace = join_trace(
        span,
        headers
            .and_then(|h| h.get(rct_bus::trace::TRACEPARENT))
            .map(|v| v.as_str()),
    );
    span.record("trace_id", trace.trace_id());
    trace
}

fn join_trace(span: &tracing::Span, incoming: Option<&str>) -> rct_bus::trace::TraceContext {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use rct_bus::trace::TraceContext;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let parent = incoming.and_then(TraceContext::parse);
    if let Some(parent) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id_bytes()),
            SpanId::from_bytes(parent.span_id_bytes()),
            TraceFlags::new(parent.flags()),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let exported = span.context().span().span_context().clone();
    if exported.is_valid() {
        return TraceContext::from_parts(
            exported.trace_id().to_bytes(),
            exported.span_id().to_bytes(),
            exported.trace_flags().to_u8(),
        );
    }
    parent.map_or_else(TraceContext::root, |p| p.child())
}

/// Where to serve metrics and health.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the listener (`0.0.0.0:9464`); without one, nothing is served.
    pub listen: Option<SocketAddr>,
}

/// Named readiness conditions; the component is ready when the connection is up and all
/// of them hold.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Declares `name`, not yet holding.
    pub fn expect(&self, name: &'static str) {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_insert(false);
    }

    /// Sets whether `name` holds.
    pub fn set(&self, name: &'static str, holds: bool) {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, holds);
    }

    /// Whether everything holds, with one line per condition.
    pub fn report(&self, connected: bool) -> (bool, String) {
        let conditions = self.conditions.lock().unwrap_or_else(|p| p.into_inner());
        let mut ready = connected;
        let mut text = format!("nats connected: {}\n", yes(connected));
        for (name, holds) in conditions.iter() {
            ready &= holds;
            text.push_str(&format!("{name}: {}\n", yes(*holds)));
        }
        (ready, text)
    }
}

fn yes(holds: bool) -> &'static str {
    if holds { "yes" } else { "no" }
}

/// The metrics content type Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` from a thread of its own, for as
/// long as the process runs; the address it listens on (port 0 picks a free one).
pub fn serve(
    listen: SocketAddr,
    mut registry: Registry,
    readiness: Readiness,
    client: async_nats::Client,
) -> std::io::Result<SocketAddr> {
    let connected = Gauge::<i64>::default();
    registry.register(
        "rct_nats_connected",
        "Whether the NATS connection is up (1) or not (0)",
        connected.clone(),
    );
    let server = tiny_http::Server::http(listen).map_err(std::io::Error::other)?;
    let address = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("not an IP listener"))?;
    std::thread::Builder::new()
        .name("rct-telemetry".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let is_up = client.connection_state() == async_nats::connection::State::Connected;
                let (status, content_type, body) = match request.url() {
                    "/metrics" => {
                        connected.set(i64::from(is_up));
                        let mut body = String::new();
                        match prometheus_client::encoding::text::encode(&mut body, &registry) {
                            Ok(()) => (200, OPENMETRICS, body),
                            Err(e) => (500, "text/plain", format!("cannot encode: {e}\n")),
                        }
                    }
                    "/healthz" => (200, "text/plain", "ok\n".to_owned()),
                    "/readyz" => {
                        let (ready, text) = readiness.report(is_up);
                        (if ready { 200 } else { 503 }, "text/plain", text)
                    }
                    _ => (
                        404,
                        "text/plain",
                        "not found: /metrics, /healthz, /readyz\n".to_owned(),
                    ),
                };
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("a valid header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                if let Err(e) = request.respond(response) {
                    tracing::debug!(error = %e, "telemetry response not sent");
                }
            }
        })?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_connected_and_every_condition_holds() {
        let readiness = Readiness::default();
        readiness.expect("consumer bound");
        readiness.expect("keys loaded");
        assert!(!readiness.report(true).0);
        readiness.set("keys loaded", true);
        readiness.set("consumer bound", true);
        let (ready, text) = readiness.report(true);
        assert!(ready, "{text}");
        assert_eq!(
            text,
            "nats connected: yes\nconsumer bound: yes\nkeys loaded: yes\n"
        );
        assert!(!readiness.report(false).0);
    }
}
