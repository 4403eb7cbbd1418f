//! The tower framework against a real nats-server: every lifecycle path, in order, and
//! nothing run that admission did not sign.

mod support;

use std::time::Duration;

use rct_agents::{Failure, Outcome, Tower};
use rct_bus::proto::{self, event::Kind};
use rct_bus::{EventKind, KeyPair, Purpose};
use rct_streams::timestamp::from_datetime;
use support::{Harness, Ledger, drain_agent, outcome, target};
use time::OffsetDateTime;

fn kinds(records: &[rct_streams::Record]) -> Vec<EventKind> {
    records.iter().map(|r| r.kind).collect()
}

#[tokio::test]
async fn a_successful_command_has_claim_progress_logs_then_its_outcome() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = drain_agent(&h, "prod-1", "a", &ledger);
    let command = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[
            ("cluster", target("prod-1")),
            ("keep_percent", support_int(0)),
        ],
    );
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;

    let kinds = kinds(&records);
    assert_eq!(kinds.first(), Some(&EventKind::Claim));
    assert_eq!(kinds.last(), Some(&EventKind::Outcome));
    assert!(kinds.contains(&EventKind::Log));
    assert!(kinds.contains(&EventKind::Progress));
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:?}");
    };
    assert_eq!(succeeded.summary, "drained");
    assert_eq!(succeeded.outputs["kept"], "0");
    let last_progress = records.iter().rev().find_map(|r| match &r.event.kind {
        Some(Kind::Progress(p)) => Some(p.percent),
        _ => None,
    });
    assert_eq!(
        last_progress,
        Some(100),
        "the latest progress is never coalesced away"
    );
    let Some(Kind::Started(started)) = &records[0].event.kind else {
        unreachable!()
    };
    assert!(started.agent.starts_with("a-"), "{started:?}");
    assert_eq!(ledger.executions(&command.command_id), 1);
    agent.stop().await;
}

fn support_int(i: i64) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::Integer(i)),
    }
}

#[tokio::test]
async fn failures_timeouts_cancellations_and_expiries_end_as_such() {
    let h = Harness::start().await;
    let agent = h.run(
        Tower::new("traffic")
            .cluster("prod-1")
            .operation(
                "drain-cluster",
                |ctx: rct_agents::Context, params: rct_agents::Params| async move {
                    match params.i64("keep_percent") {
                        // Fails.
                        Some(1) => Err(Failure::new(
                            "unreachable",
                            "the load balancer did not answer",
                        )),
                        // Ignores time; stops only when told.
                        _ => {
                            ctx.progress(10, "waiting", "until cancelled");
                            ctx.cancelled().await;
                            Err(Failure::new("stopped", "stopped as asked"))
                        }
                    }
                },
            )
            .config(h.config("a")),
    );
    let with_keep = |keep| {
        h.command(
            "traffic/drain-cluster",
            "prod-1",
            &[
                ("cluster", target("prod-1")),
                ("keep_percent", support_int(keep)),
            ],
        )
    };

    let failing = with_keep(1);
    h.publish(&failing).await;
    let Kind::Failed(failed) = outcome(&h.finished(&failing.command_id).await).clone() else {
        panic!("not failed");
    };
    assert_eq!(
        (failed.code.as_str(), failed.message.as_str()),
        ("unreachable", "the load balancer did not answer")
    );

    let mut slow = with_keep(2);
    slow.timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    h.publish(&slow).await;
    let Kind::Failed(timed_out) = outcome(&h.finished(&slow.command_id).await).clone() else {
        panic!("not failed");
    };
    assert_eq!(timed_out.code, "timeout");
    assert!(timed_out.message.contains("1s"), "{timed_out:?}");

    let cancelled = with_keep(3);
    h.publish(&cancelled).await;
    // Wait until it runs, then ask to cancel, as admission records it.
    wait_for(&h, &cancelled.command_id, EventKind::Claim).await;
    let asked = std::time::Instant::now();
    let request = proto::Event {
        command_id: cancelled.command_id.clone(),
        at: Some(from_datetime(OffsetDateTime::now_utc())),
        source: "admission/test".into(),
        operation: cancelled.operation.clone(),
        target: cancelled.target.clone(),
        kind: Some(Kind::CancelRequested(proto::CancelRequested {
            by: cancelled.operator.clone(),
            justification: "SRE-2".into(),
            resume: false,
        })),
    };
    h.as_admission()
        .event(&"traffic".parse().unwrap(), &request, "c1")
        .await
        .unwrap();
    let records = h.finished(&cancelled.command_id).await;
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        asked.elapsed()
    );
    let Kind::Cancelled(c) = outcome(&records) else {
        panic!("not cancelled: {records:?}");
    };
    assert_eq!(c.reason, "cancelled by alice@example.com");

    let mut late = with_keep(0);
    late.deadline = Some(from_datetime(
        OffsetDateTime::now_utc() - time::Duration::seconds(1),
    ));
    h.publish(&late).await;
    let records = h.finished(&late.command_id).await;
    assert_eq!(
        kinds(&records),
        [EventKind::Claim, EventKind::Outcome],
        "claimed only to be expired"
    );
    assert!(
        matches!(&records[0].event.kind, Some(Kind::Started(s)) if s.without_running),
        "{records:#?}"
    );
    assert!(matches!(outcome(&records), Kind::Expired(_)));
    agent.stop().await;
}

async fn wait_for(h: &Harness, id: &str, kind: EventKind) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !h.events(id).await.iter().any(|r| r.kind == kind) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} for {id}"));
}

#[tokio::test]
async fn commands_not_signed_by_admission_are_never_run() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = drain_agent(&h, "prod-1", "a", &ledger);
    let forged = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1"))],
    );
    let stranger =
        KeyPair::generate().sign(Purpose::Command, prost::Message::encode_to_vec(&forged));
    h.publish_bytes(
        &forged,
        prost::Message::encode_to_vec(&stranger),
        &forged.command_id,
    )
    .await;

    let tampered = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1"))],
    );
    let mut bytes = h.signed(&tampered);
    let last = bytes.len() - 70; // inside the body, before the signature
    bytes[last] ^= 0x01;
    h.publish_bytes(&tampered, bytes, &tampered.command_id)
        .await;

    // A good command after them runs, so the bad ones were seen first.
    let good = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1"))],
    );
    h.publish(&good).await;
    h.finished(&good.command_id).await;

    // With several commands at once, the good one may finish before the bad ones are
    // refused: wait until both notes are on record (an empty record would pass vacuously).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for bad in [&forged, &tampered] {
        while h.events(&bad.command_id).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no refusal noted under {}",
                bad.command_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for bad in [&forged, &tampered] {
        assert_eq!(ledger.executions(&bad.command_id), 0);
        // Under the id it claims: a note, never a decision, claim or outcome.
        let records = h.events(&bad.command_id).await;
        assert!(
            records.iter().all(|r| !r.kind.is_single_slot()),
            "no slot taken under its id: {records:#?}"
        );
        assert!(
            records
                .iter()
                .all(|r| rct_bus::refusal_note(&r.event).is_some()),
            "{records:#?}"
        );
    }
    // The refusals are on record, under fresh ids (waited for: recorded after the notes).
    let refusals = loop {
        let refusals: Vec<_> = rct_streams::replay::history(&h.js, &Default::default())
            .await
            .unwrap()
            .filter_map(|r| async move {
                match r.unwrap().event.kind {
                    Some(Kind::Failed(f)) if f.code == "refused" => Some(f.message),
                    _ => None,
                }
            })
            .collect::<Vec<_>>()
            .await;
        if refusals.len() >= 2 || std::time::Instant::now() > deadline {
            break refusals;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        refusals.iter().all(
            |m| (m.contains("not admission's") || m.contains("does not trust"))
                && m.contains("it was not run")
        ),
        "{refusals:?}"
    );
    agent.stop().await;
}

use futures::StreamExt;

#[tokio::test]
async fn parameters_are_checked_again_by_the_agent() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = drain_agent(&h, "prod-1", "a", &ledger);
    // Signed by admission, but out of the catalog's limits: defence in depth.
    let command = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[
            ("cluster", target("prod-1")),
            ("keep_percent", support_int(400)),
        ],
    );
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("{records:?}");
    };
    assert_eq!(failed.code, "invalid_params");
    assert!(
        failed
            .message
            .contains("keep_percent must be an integer from 0 to 100")
    );
    assert_eq!(ledger.executions(&command.command_id), 0);
    agent.stop().await;
}

#[tokio::test]
async fn a_cluster_agent_never_receives_another_targets_commands() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let prod1 = drain_agent(&h, "prod-1", "p1", &ledger);
    h.present("traffic", 1).await;
    // The prod-2 agent's consumer exists (its agent is down).
    let config = rct_streams::Config::default();
    rct_streams::topology::ensure_consumer(
        &h.js,
        "RCT_CMD",
        rct_streams::topology::tower_consumer(
            &config,
            &"traffic".parse().unwrap(),
            Some(&"prod-2".parse().unwrap()),
        ),
    )
    .await
    .unwrap();
    let for_prod2 = h.command(
        "traffic/drain-cluster",
        "prod-2",
        &[("cluster", target("prod-2"))],
    );
    h.publish(&for_prod2).await;
    let for_prod1 = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1"))],
    );
    h.publish(&for_prod1).await;
    h.finished(&for_prod1.command_id).await;

    assert_eq!(ledger.executions(&for_prod2.command_id), 0);
    assert!(h.events(&for_prod2.command_id).await.is_empty());
    let mut waiting =
        h.js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "tower-traffic@prod-2",
            "RCT_CMD",
        )
        .await
        .unwrap();
    assert_eq!(
        waiting.info().await.unwrap().num_pending,
        1,
        "prod-2's command waits for prod-2"
    );
    prod1.stop().await;
}

#[tokio::test]
async fn the_same_command_twice_runs_once() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    // Two replicas of a simple tower share the work queue.
    let restart = |instance: &'static str| {
        let ledger = ledger.clone();
        Tower::new("workloads")
            .operation(
                "restart",
                move |ctx: rct_agents::Context, _params: rct_agents::Params| {
                    let ledger = ledger.clone();
                    async move {
                        ledger.record(&ctx, instance);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(Outcome::new("restarted"))
                    }
                },
            )
            .config(h.config(instance))
    };
    let a = h.run(restart("a"));
    let b = h.run(restart("b"));
    h.present("workloads", 2).await;

    let params = [
        ("namespace", string("shop")),
        ("deployment", string("cart")),
    ];
    let mut ids = Vec::new();
    for _ in 0..10 {
        let command = h.command("workloads/restart", "_", &params);
        // Published twice under different message ids: two messages in RCT_CMD.
        h.publish(&command).await;
        h.publish_bytes(
            &command,
            h.signed(&command),
            &format!("{}-again", command.command_id),
        )
        .await;
        ids.push(command.command_id);
    }
    for id in &ids {
        let records = h.finished(id).await;
        assert!(
            matches!(outcome(&records), Kind::Succeeded(_)),
            "{records:?}"
        );
    }
    // Let both deliveries of every command be handled.
    h.acknowledged("tower-workloads").await;
    for id in &ids {
        assert_eq!(ledger.executions(id), 1, "{id}");
        let claims = h
            .events(id)
            .await
            .iter()
            .filter(|r| r.kind == EventKind::Claim)
            .count();
        assert_eq!(claims, 1);
    }
    a.stop().await;
    b.stop().await;
}

fn string(s: &str) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::String(s.into())),
    }
}

#[tokio::test]
async fn presence_appears_and_goes_with_the_agent() {
    let h = Harness::start().await;
    let agent = drain_agent(&h, "prod-3", "edge-3", &Ledger::default());
    let present = h.present("traffic", 1).await;
    assert_eq!(present[0].target, "prod-3");
    assert_eq!(present[0].operations, ["drain-cluster"]);
    assert!(present[0].instance.starts_with("edge-3-"));
    agent.stop().await;
    // Removed by the agent as it stops, not left to expire (the TTL would pass the test too).
    assert!(
        h.present_now("traffic").await.is_empty(),
        "presence left behind after a clean stop"
    );
}
