//! What operators watch, the same way in every component: Prometheus metrics (OpenMetrics
//! text from `prometheus-client`), `/healthz` and `/readyz`, on one HTTP listener.
//!
//! `/healthz` answers 200 while the process serves requests at all. `/readyz` answers 200 only
//! when the NATS connection is up and every readiness condition the component declared holds
//! (streams present, consumer bound, keys loaded…), else 503 with one line per condition.
//! Every component also exports `rct_nats_connected` (1 or 0).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

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
