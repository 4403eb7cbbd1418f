//! One operation is one trace: the `traceparent` the CLI puts on its submission continues on
//! admission's command and on every event of the command, each hop with a span of its own.

mod support;

use std::collections::BTreeSet;

use rct_bus::trace::{TRACEPARENT, TraceContext};
use rct_streams::replay;
use support::Hub;
use tokio_util::sync::CancellationToken;

/// The trace contexts on every message of `stream`.
async fn traces(js: &async_nats::jetstream::Context, stream: &str) -> Vec<TraceContext> {
    let mut stream = js.get_stream(stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut found = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let header = message.headers.get(TRACEPARENT);
        found.push(
            header
                .and_then(|v| TraceContext::parse(v.as_str()))
                .unwrap_or_else(|| panic!("{} has no traceparent", message.subject)),
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_one_trace_from_the_cli_to_its_last_event() {
    let hub = Hub::start().await;
    let shutdown = CancellationToken::new();
    let operator = hub.running(&shutdown).await;
    let op = operator.clone();
    let out = tokio::task::spawn_blocking(move || op.drain("prod-1"))
        .await
        .unwrap();
    let id = out.split_whitespace().next().unwrap().parse().unwrap();

    let admin = hub.connection("admin", "_INBOX_admin");
    let js = admin.jetstream(admin.connect("admin", false).await.unwrap());
    let submitted = traces(&js, "RCT_SUBMIT").await;
    let commands = traces(&js, "RCT_CMD").await;
    assert_eq!((submitted.len(), commands.len()), (1, 1));
    let trace_id = submitted[0].trace_id();
    assert_eq!(commands[0].trace_id(), trace_id);
    assert_ne!(
        commands[0], submitted[0],
        "admission's hop has its own span"
    );

    let records = replay::command_history(&js, id).await.unwrap();
    assert!(records.len() >= 4, "{records:#?}");
    let mut spans = BTreeSet::new();
    for record in &records {
        let trace = record
            .trace
            .unwrap_or_else(|| panic!("{:?} has no trace", record.kind));
        assert_eq!(trace.trace_id(), trace_id, "{:?}", record.kind);
        // Admission's decision is in its hop's span; the agent's events in a span of the
        // agent's own, neither the submitter's nor admission's.
        if record.kind == rct_bus::EventKind::Decision {
            assert_eq!(trace, commands[0], "the decision is in admission's span");
        } else {
            assert_ne!(
                trace, commands[0],
                "{:?} is in admission's span",
                record.kind
            );
            assert_ne!(
                trace, submitted[0],
                "{:?} is in the submitter's span",
                record.kind
            );
        }
        spans.insert(trace.to_string());
    }
    // Admission's decision and the agent's events: two hops, two spans.
    assert_eq!(spans.len(), 2, "{spans:?}");

    let op = operator.clone();
    let shown = tokio::task::spawn_blocking(move || op.ok(&["show", &id.to_string()]))
        .await
        .unwrap();
    assert!(
        shown.contains(&format!("trace         {trace_id}")),
        "{shown}"
    );
    shutdown.cancel();
}
