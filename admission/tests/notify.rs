//! The notifier against a real nats-server and a local webhook receiver that is down at
//! first: every notification arrives once it is up, exactly once each.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use rct_bus::proto::{self, event::Kind};
use rct_streams::Publisher;
use rct_streams::timestamp::from_datetime;
use support::{Harness, drain};
use time::OffsetDateTime;

struct Received {
    event_id: String,
    text: String,
}

/// A webhook receiver on `port` that answers 200 and hands over what it got.
fn receiver(
    port: u16,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<Received>,
    std::thread::JoinHandle<()>,
) {
    let server = tiny_http::Server::http(("127.0.0.1", port)).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let thread = std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            request.as_reader().read_to_string(&mut body).unwrap();
            let event_id = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("X-Rct-Event-Id"))
                .map(|h| h.value.to_string())
                .unwrap_or_default();
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let text = json["text"].as_str().unwrap().to_owned();
            let _ = request.respond(tiny_http::Response::empty(200));
            if tx.send(Received { event_id, text }).is_err() {
                break;
            }
        }
    });
    (rx, thread)
}

#[tokio::test]
async fn notifications_arrive_once_each_even_after_the_receiver_was_down() {
    // The receiver's port, not listening yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::start_with(move |config| {
        config
            .notify
            .channels
            .insert("rct-events".into(), format!("http://127.0.0.1:{port}/hook"));
    })
    .await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["app_oncall"]).await;

    let submission = drain("prod-2");
    let admitted = h.submit(&alice, &submission).await;
    assert!(matches!(
        h.decision(admitted).await.kind,
        Some(Kind::Admitted(_))
    ));
    let refused = h.submit(&bob, &drain("prod-2")).await;
    assert!(matches!(
        h.decision(refused).await.kind,
        Some(Kind::Rejected(_))
    ));
    // An agent's claim and outcome, signed as a certified agent of prod-2 signs them.
    let traffic = "traffic".parse().unwrap();
    let agent = rct_bus::KeyPair::generate();
    let now = std::time::SystemTime::now();
    let certificate = rct_bus::provenance::certify(
        &h.admission_keypair(),
        &traffic,
        &"prod-2".parse().unwrap(),
        "traffic/prod-2/a1",
        agent.public(),
        now,
        now + Duration::from_secs(600),
    );
    let publisher = Publisher::new(h.js.clone()).signing(std::sync::Arc::new(
        rct_bus::provenance::Signer::agent(agent, certificate),
    ));
    for kind in [
        Kind::Started(proto::Started {
            agent: "traffic/prod-2/a1".into(),
            host: "edge-7".into(),
            target: "prod-2".into(),
            without_running: false,
        }),
        Kind::Succeeded(proto::Succeeded {
            summary: "drained in 3 steps".into(),
            outputs: Default::default(),
        }),
    ] {
        let event = proto::Event {
            command_id: submission.command_id.clone(),
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: "agent".into(),
            operation: "traffic/drain-cluster".into(),
            target: "prod-2".into(),
            kind: Some(kind),
        };
        publisher.event(&traffic, &event, 0).await.unwrap();
    }

    // Let the notifier fail against the closed port at least once, then open it.
    let consumer_info = || async {
        h.js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "notifier", "RCT_EVT",
        )
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while consumer_info().await.num_redelivered == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the notifier retries while the receiver is down");
    let (mut received, _thread) = receiver(port);

    let mut got = Vec::new();
    while got.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(60), received.recv()).await;
        got.push(next.ok().flatten().expect("a notification arrives"));
    }
    // Everything is acknowledged: nothing more will come.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let info = consumer_info().await;
            if info.num_ack_pending == 0 && info.num_pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    // A post still in flight has two seconds to show up.
    let again = tokio::time::timeout(Duration::from_secs(2), received.recv()).await;
    assert!(
        again.is_err(),
        "a notification came twice: {:?}",
        again.ok().flatten().map(|r| r.text)
    );

    let texts: Vec<&str> = got.iter().map(|r| r.text.as_str()).collect();
    let find = |needle: &str| {
        texts
            .iter()
            .find(|t| t.contains(needle))
            .unwrap_or_else(|| panic!("no notification says {needle:?}: {texts:#?}"))
    };
    let start = find("Starting traffic/drain-cluster on prod-2");
    assert!(start.contains("by alice@example.com, SRE-101"), "{start}");
    find("Succeeded: traffic/drain-cluster on prod-2 — drained in 3 steps");
    let refusal = find("Refused: traffic/drain-cluster on prod-2 for bob@example.com");
    assert!(refusal.contains("(forbidden)"), "{refusal}");
    let mut ids: Vec<&str> = got.iter().map(|r| r.event_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each post names its event");
}

/// Approvers' channels hear of a request waiting for them; the break-glass channels of a
/// command run without its approvals, with the reason and how to review it.
#[tokio::test]
async fn approvers_and_break_glass_channels_are_told() {
    let approvers_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut approvers, _a) = receiver(approvers_port);
    let alerts_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut alerts, _b) = receiver(alerts_port);
    let h = Harness::start_with(move |config| {
        let channels = &mut config.notify.channels;
        channels.insert(
            "rct-approvals".into(),
            format!("http://127.0.0.1:{approvers_port}/hook"),
        );
        channels.insert(
            "rct-alerts".into(),
            format!("http://127.0.0.1:{alerts_port}/hook"),
        );
    })
    .await;
    let olga = h.operator("olga", &["sre_team", "sre_oncall"]).await;
    let value = |s: &str| support::value(proto::value::Kind::String(s.into()));
    let delete = |reason: &str| {
        let mut request = support::run(
            "workloads/delete",
            "_",
            [("namespace", value("shop")), ("deployment", value("cart"))],
            "INC-7",
        );
        if let Some(proto::submission::Request::Run(run)) = &mut request.request {
            run.break_glass = reason.into();
        }
        request
    };
    let waiting = delete("");
    h.submit(&olga, &waiting).await;
    let broken = delete("INC-9 the shop is down");
    h.submit(&olga, &broken).await;

    let told = within(&mut approvers).await;
    assert!(told.text.contains("Approval needed"), "{}", told.text);
    assert!(
        told.text
            .contains(&format!("rct approve {}", waiting.command_id)),
        "{}",
        told.text
    );
    let told = within(&mut alerts).await;
    assert!(told.text.contains("BREAK-GLASS"), "{}", told.text);
    assert!(
        told.text.contains("INC-9 the shop is down"),
        "{}",
        told.text
    );
    assert!(
        told.text
            .contains(&format!("rct review {}", broken.command_id)),
        "{}",
        told.text
    );
    // Each was told once: nothing else reaches these channels.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(approvers.try_recv().is_err());
    assert!(alerts.try_recv().is_err());
}

async fn within(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a post")
        .unwrap()
}
