//! Locks against a real nats-server: a command holding a lock keeps every conflicting one
//! out until it ends, the refusal names it, and a lock is never stuck: its holder's outcome,
//! or its expiry when the holder never ends, frees it.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use rct_bus::EventKind;
use rct_bus::proto::{self, RejectionCode as C, event::Kind};
use support::{Harness, drain, dry, ran, refused, rejection, weights};

fn locks(decision: &proto::Event) -> Vec<String> {
    match &decision.kind {
        Some(Kind::Admitted(a)) => a.locks.clone(),
        other => panic!("not admitted: {other:?}"),
    }
}

/// The refusal's message, asserting it is `locked`.
fn locked(decision: &proto::Event) -> String {
    refused(decision, C::Locked)
}

/// Who holds the lock on `resource` in `rct_locks` now, as written (ended holders included).
async fn holders(h: &Harness, resource: &str) -> Vec<String> {
    let key = rct_bus::lock::key(resource);
    rct_streams::locks::list(&h.js)
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, lock)| lock.holders.into_iter().map(|h| h.command_id).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_traffic_change_to_a_cluster_another_holds_is_refused_naming_it_until_that_one_ends() {
    let mut h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["traffic_team"]).await;

    let first = drain("prod-1");
    let admitted = h.decided(&alice, &first).await;
    assert_eq!(locks(&admitted), ["prod-1"]);

    // Another operation that conflicts, and the same operation again: refused, naming the
    // holder, who asked for it and why.
    for refused in [weights("prod-1", 10), drain("prod-1")] {
        let message = locked(&h.decided(&bob, &refused).await);
        for part in [
            first.command_id.as_str(),
            "traffic/drain-cluster",
            "alice@example.com",
            "SRE-101",
        ] {
            assert!(message.contains(part), "{part:?} missing: {message}");
        }
    }
    // Another cluster is another lock; a dry run changes nothing and takes none.
    let elsewhere = h.decided(&bob, &weights("prod-2", 10)).await;
    assert_eq!(locks(&elsewhere), ["prod-2"]);
    let rehearsal = h.decided(&bob, &dry(weights("prod-1", 10))).await;
    assert!(locks(&rehearsal).is_empty());

    // Once the drain's outcome is recorded, its lock is free.
    ran(&h, &first, "prod-1", Kind::Succeeded(Default::default())).await;
    let next = weights("prod-1", 20);
    assert_eq!(locks(&h.decided(&bob, &next).await), ["prod-1"]);
    assert_eq!(
        holders(&h, "prod-1").await,
        std::slice::from_ref(&next.command_id)
    );

    // Every submission delivered again (acknowledgements lost): each keeps its one decision,
    // and the holder its lock.
    let before = h.decisions().await.len();
    let commands = h.commands().await;
    h.redeliver_everything().await;
    h.submissions_settled().await;
    assert_eq!(h.decisions().await.len(), before);
    assert_eq!(h.commands().await, commands);
    assert_eq!(holders(&h, "prod-1").await, [next.command_id]);
}

/// The example catalog with `traffic/drain-cluster` due to start within 1 s and end within
/// 1 s, in a file of its own under `dir`.
fn catalog_with_short_drains(dir: &std::path::Path) -> PathBuf {
    support::catalog_with(
        dir,
        "    deadline: 2m              # must start within\n    timeout: 15m",
        "    deadline: 1s\n    timeout: 1s",
    )
}

#[tokio::test]
async fn a_lock_whose_holder_never_ends_is_taken_over_once_its_expiry_passes() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_short_drains(dir.path());
    let h = Harness::start_with(move |c| {
        c.catalog = catalog.clone();
        c.lock_grace = Duration::from_secs(1);
    })
    .await;
    let alice = h.operator("alice", &["sre_team"]).await;

    // Admitted, and never run: its agent died.
    let orphan = drain("prod-3");
    let started = std::time::Instant::now();
    assert_eq!(locks(&h.decided(&alice, &orphan).await), ["prod-3"]);
    let message = locked(&h.decided(&alice, &drain("prod-3")).await);
    assert!(message.contains(&orphan.command_id), "{message}");

    // Its deadline (1 s), timeout (1 s) and grace (1 s) later, the next drain takes it over.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let mut taken = None;
    for _ in 0..20 {
        let next = drain("prod-3");
        match h.decided(&alice, &next).await {
            d if rejection(&d).is_none() => {
                taken = Some((next, d));
                break;
            }
            d => {
                locked(&d);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let (next, decision) = taken.expect("the lock was never taken over");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(locks(&decision), ["prod-3"]);
    assert_eq!(holders(&h, "prod-3").await, [next.command_id]);
}

/// The example catalog with `workloads/delete` locking the deployment it deletes.
fn catalog_with_locked_deletes(dir: &std::path::Path) -> PathBuf {
    support::catalog_with(
        dir,
        "    break_glass: { groups: [sre_oncall], notify: [rct-alerts] }\n",
        "    break_glass: { groups: [sre_oncall], notify: [rct-alerts] }\n    locks: [\"{namespace}/{deployment}\"]\n",
    )
}

#[tokio::test]
async fn a_request_approved_while_another_holds_its_lock_is_refused_locked() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_locked_deletes(dir.path());
    let h = Harness::start_with(move |c| c.catalog = catalog.clone()).await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;

    let approve_all = async |request: &proto::Submission| {
        let p = support::workloads_pending(&h, &request.command_id).await;
        for who in [&bob, &carol] {
            let approval = support::approval(
                "workloads/delete",
                &request.command_id,
                &p.digest,
                false,
                "INC-7",
            );
            h.submit(who, &approval).await;
        }
        support::workloads_slot(&h, &request.command_id, EventKind::Decision).await
    };
    let first = support::workload("workloads/delete", "cart", "INC-7");
    let second = support::workload("workloads/delete", "cart", "INC-8");
    h.submit(&alice, &first).await;
    h.submit(&alice, &second).await;
    // Waiting for approvals holds nothing: both wait.
    support::workloads_pending(&h, &second.command_id).await;

    assert_eq!(locks(&approve_all(&first).await), ["shop/cart"]);
    let message = locked(&approve_all(&second).await);
    assert!(
        message.starts_with("it was approved, but shop/cart is locked by command")
            && message.contains(&first.command_id),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_taking_one_lock_at_once_admit_one_command() {
    let h = Harness::start().await;
    let second = h.second_replica();
    let alice = h.operator("alice", &["sre_team"]).await;

    const CLUSTERS: [&str; 3] = ["prod-1", "prod-2", "prod-3"];
    const EACH: usize = 6;
    let submissions: Vec<(usize, proto::Submission)> = (0..EACH)
        .flat_map(|n| {
            CLUSTERS.iter().enumerate().map(move |(c, cluster)| {
                let submission = match n % 2 {
                    0 => drain(cluster),
                    _ => weights(cluster, 50),
                };
                (c, submission)
            })
        })
        .collect();
    let sequences = futures::future::join_all(
        submissions
            .iter()
            .map(|(_, submission)| h.submit(&alice, submission)),
    )
    .await;
    let mut admitted = [0; CLUSTERS.len()];
    for ((cluster, _), sequence) in submissions.iter().zip(sequences) {
        let decision = h.decision(sequence).await;
        match rejection(&decision) {
            None => admitted[*cluster] += 1,
            Some((code, message)) => assert_eq!(code, C::Locked, "{message}"),
        }
    }
    assert_eq!(admitted, [1; CLUSTERS.len()], "admitted per cluster");
    second.stop().await;
}

/// A submission that reuses the id of a command holding a lock (anyone can read it in the
/// log) is another holder: it cannot take that command's lock for its own, nor give it back
/// when it is refused on another lock.
#[tokio::test]
async fn a_submission_reusing_a_holders_id_takes_nothing_from_it() {
    let dir = tempfile::tempdir().unwrap();
    // Weight changes also lock the weights table as a whole: "lock.prod-1" sorts before it.
    let catalog = support::catalog_with(
        dir.path(),
        "    timeout: 5m\n    idempotent: true\n    notify: [rct-events]\n    locks: [\"{cluster}\"]",
        "    timeout: 5m\n    idempotent: true\n    notify: [rct-events]\n    locks: [\"{cluster}\", weights]",
    );
    let h = Harness::start_with(move |c| c.catalog = catalog.clone()).await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let mallory = h.operator("mallory", &["traffic_team"]).await;

    let drained = drain("prod-1");
    assert_eq!(locks(&h.decided(&alice, &drained).await), ["prod-1"]);
    let weighing = weights("prod-2", 30);
    assert_eq!(
        locks(&h.decided(&alice, &weighing).await),
        ["prod-2", "weights"]
    );
    // Under the drain's id: refused `duplicate`, and the drain keeps its lock (it used to
    // count as the drain's own holder, and give prod-1 back when refused on the weights).
    let mut reusing = weights("prod-1", 10);
    reusing.command_id.clone_from(&drained.command_id);
    // Another message id: the stream's deduplication is not what stops it.
    let sequence = h
        .publish_raw(
            &rct_bus::Subject::submit(&"traffic/set-weights".parse().unwrap()).to_string(),
            "another-message-id",
            prost::Message::encode_to_vec(&mallory.sign(&reusing)),
        )
        .await;
    let message = refused(&h.decision(sequence).await, C::Duplicate);
    assert!(message.contains("already used"), "{message}");
    assert_eq!(
        holders(&h, "prod-1").await,
        std::slice::from_ref(&drained.command_id)
    );
    let message = locked(&h.decided(&mallory, &weights("prod-1", 10)).await);
    assert!(message.contains(&drained.command_id), "{message}");
}
