//! OpenTelemetry export (optional, from the standard `OTEL_*` variables): the real
//! `rct-admission` binary exports its span for a decision to an OTLP/HTTP receiver, as a child
//! of the submitter's span, and the command it publishes carries that span on.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use rct_bus::trace::{TRACEPARENT, TraceContext};
use rct_bus::{CommandId, KeyPair, Purpose};
use rct_streams::testkit::Server;
use rct_streams::{Outgoing, Publisher};

/// An OTLP/HTTP receiver: the bodies posted to /v1/traces.
fn receiver() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.server_addr());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = Vec::new();
            let _ = std::io::Read::read_to_end(request.as_reader(), &mut body);
            if request.url() == "/v1/traces" {
                seen.lock().unwrap().push(body);
            }
            let _ = request.respond(tiny_http::Response::empty(200));
        }
    });
    (url, bodies)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn admission_exports_its_decision_span_into_the_operations_trace() {
    let server = Server::start().await;
    let js = async_nats::jetstream::new(server.client().await);
    rct_streams::provision(&js, &rct_streams::Config::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let service = KeyPair::generate();
    let pem: String = service
        .public()
        .to_pem()
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    let config = dir.path().join("admission.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  servers: [{url}]\ncatalog: {catalog:?}\nsigning_key: {key:?}\n\
             generate_key: true\nservices:\n  - name: deployer\n    groups: [sre_team]\n    \
             public_key: |\n{pem}",
            url = server.url(),
            catalog = support::catalog_path(),
            key = dir.path().join("admission.key"),
        ),
    )
    .unwrap();
    let (endpoint, bodies) = receiver();
    let log = std::fs::File::create(dir.path().join("admission.log")).unwrap();
    let mut admission = Command::new(env!("CARGO_BIN_EXE_rct-admission"))
        .arg("--config")
        .arg(&config)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // A drain submitted by the service, in a trace the submitter started.
    let submission = support::drain("prod-1");
    let id: CommandId = submission.command_id.parse().unwrap();
    let submitter = TraceContext::root();
    let envelope = service.sign(Purpose::Submission, submission.encode_to_vec());
    Publisher::new(js.clone())
        .send(
            Outgoing::new(
                "rct.submit.traffic.drain-cluster",
                id.msg_id(),
                envelope.encode_to_vec().into(),
            )
            .header(TRACEPARENT, &submitter.to_string()),
        )
        .await
        .unwrap();

    // The command admission publishes carries the span admission exported.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = js.get_stream("RCT_CMD").await.unwrap();
    let command = loop {
        if let Ok(message) = stream.get_raw_message(1).await {
            break message;
        }
        assert!(Instant::now() < deadline, "no command");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hop = TraceContext::parse(command.headers.get(TRACEPARENT).unwrap().as_str()).unwrap();
    assert_eq!(hop.trace_id(), submitter.trace_id());
    // A span of admission's own, not the submitter's passed on.
    assert_ne!(hop.span_id_bytes(), submitter.span_id_bytes());

    let exported = loop {
        let found = bodies.lock().unwrap().iter().any(|body| {
            contains(body, &submitter.trace_id_bytes())
                && contains(body, &hop.span_id_bytes())
                && contains(body, &submitter.span_id_bytes())
        });
        if found {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = admission.kill();
    let _ = admission.wait();
    assert!(
        exported,
        "no span of trace {} (span {}, parent {}) reached the receiver; {} posts; log:\n{}",
        submitter.trace_id(),
        hop,
        submitter,
        bodies.lock().unwrap().len(),
        std::fs::read_to_string(dir.path().join("admission.log")).unwrap()
    );
}
