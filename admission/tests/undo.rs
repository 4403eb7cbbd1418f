//! Undo against a real nats-server: admission admits an undo (`undo_of`) only as the
//! original's record allows (a success, its operation's inverse, the parameters its record
//! fills in, not undone already), links the original to it once, and refuses every other
//! one `not_undoable`, saying why.

mod support;

use rct_bus::proto::{self, RejectionCode as C, event::Kind};
use rct_bus::{EventKind, Tower};
use rct_streams::replay::{self, Filter};
use rct_streams::timestamp::from_datetime;
use support::{Harness, drain, dry, ran, refused, rejection, weights};
use time::OffsetDateTime;

fn undoing(mut submission: proto::Submission, of: &proto::Submission) -> proto::Submission {
    if let Some(proto::submission::Request::Run(run)) = &mut submission.request {
        run.undo_of.clone_from(&of.command_id);
    }
    submission
}

fn admitted(decision: &proto::Event) {
    assert!(
        matches!(decision.kind, Some(Kind::Admitted(_))),
        "{decision:?}"
    );
}

fn succeeded(previous_weight: &str) -> Kind {
    Kind::Succeeded(proto::Succeeded {
        summary: "done".into(),
        outputs: [("previous_weight".to_owned(), previous_weight.to_owned())].into(),
    })
}

fn failed() -> Kind {
    Kind::Failed(proto::Failed {
        code: "boom".into(),
        message: "it broke".into(),
        ..Default::default()
    })
}

/// The undos admission linked on the timeline of `original` (traffic, `cluster`), once
/// there are at least `n` (the link follows the undo's decision).
async fn links(h: &Harness, original: &proto::Submission, cluster: &str, n: usize) -> Vec<String> {
    let filter = Filter {
        command: Some(original.command_id.parse().unwrap()),
        tower: Some(Tower::new("traffic").unwrap()),
        target: Some(rct_bus::Target::new(cluster).unwrap()),
        kind: Some(EventKind::Log),
        ..Default::default()
    };
    for _ in 0..200 {
        let found: Vec<String> = replay::records(&h.js, &filter)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.event.source.starts_with("admission"))
            .filter_map(|r| match r.event.kind {
                Some(Kind::Log(log)) => Some(log.undone_by),
                _ => None,
            })
            .collect();
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} links on {}", original.command_id);
}

#[tokio::test]
async fn an_undo_is_admitted_once_with_the_parameters_its_record_gives() {
    let mut h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["traffic_team", "sre_team"]).await;

    let drained = drain("prod-1");
    admitted(&h.decided(&alice, &drained).await);
    // Not ended yet: nothing to undo.
    let early = refused(
        &h.decided(&bob, &undoing(weights("prod-1", 60), &drained))
            .await,
        C::NotUndoable,
    );
    assert!(early.contains("has not ended"), "{early}");
    ran(&h, &drained, "prod-1", succeeded("60")).await;

    // Another weight than the record gives, another operation than the inverse, the undo
    // of a failure, of an operation without an inverse, of a command never admitted.
    let other_weight = refused(
        &h.decided(&bob, &undoing(weights("prod-1", 100), &drained))
            .await,
        C::NotUndoable,
    );
    assert!(
        other_weight.contains("weight to \"60\"") && other_weight.contains("\"100\""),
        "{other_weight}"
    );
    let other_operation = refused(
        &h.decided(&bob, &undoing(drain("prod-1"), &drained)).await,
        C::NotUndoable,
    );
    assert!(
        other_operation.contains("is undone by traffic/set-weights"),
        "{other_operation}"
    );
    let broken = drain("prod-2");
    admitted(&h.decided(&alice, &broken).await);
    ran(&h, &broken, "prod-2", failed()).await;
    let of_failure = refused(
        &h.decided(&bob, &undoing(weights("prod-2", 60), &broken))
            .await,
        C::NotUndoable,
    );
    assert!(of_failure.contains("did not succeed"), "{of_failure}");
    let restart = support::workload("workloads/restart", "cart", "SRE-1");
    admitted(&h.decided(&alice, &restart).await);
    ran(&h, &restart, "_", succeeded("1")).await;
    let no_inverse = refused(
        &h.decided(&bob, &undoing(weights("prod-3", 1), &restart))
            .await,
        C::NotUndoable,
    );
    assert!(no_inverse.contains("has no inverse"), "{no_inverse}");
    let rehearsed = dry(drain("prod-4"));
    admitted(&h.decided(&alice, &rehearsed).await);
    ran(&h, &rehearsed, "prod-4", succeeded("100")).await;
    let of_dry_run = refused(
        &h.decided(&bob, &undoing(weights("prod-4", 100), &rehearsed))
            .await,
        C::NotUndoable,
    );
    assert!(of_dry_run.contains("dry run"), "{of_dry_run}");
    let elsewhere = refused(
        &h.decided(&bob, &undoing(weights("prod-2", 60), &drained))
            .await,
        C::NotUndoable,
    );
    assert!(
        elsewhere.contains("sets cluster to \"prod-1\""),
        "{elsewhere}"
    );
    let never = undoing(weights("prod-3", 1), &drain("prod-3"));
    let unknown = refused(&h.decided(&bob, &never).await, C::NotUndoable);
    assert!(unknown.contains("no decision on record"), "{unknown}");
    assert!(links(&h, &drained, "prod-1", 0).await.is_empty());

    // A link only admission writes counts: an agent's claims the drain was undone by a
    // command that succeeded. A dry run of the undo is admitted and links nothing.
    let traffic = Tower::new("traffic").unwrap();
    let forged = proto::Event {
        command_id: drained.command_id.clone(),
        at: Some(from_datetime(OffsetDateTime::now_utc())),
        source: "agent".into(),
        operation: drained.operation.clone(),
        target: "prod-1".into(),
        kind: Some(Kind::Log(proto::Log {
            stream: proto::LogStream::Admission as i32,
            line: "undone by command".into(),
            undone_by: restart.command_id.clone(),
        })),
    };
    support::as_agent_of(&h, &traffic, "prod-1")
        .event(&traffic, &forged, "forged")
        .await
        .unwrap();
    admitted(
        &h.decided(&bob, &dry(undoing(weights("prod-1", 60), &drained)))
            .await,
    );

    // The undo its record gives: admitted, and linked. A second one is refused while it
    // runs; once it failed, the original may be undone again; once that succeeded, not
    // again.
    let first = undoing(weights("prod-1", 60), &drained);
    admitted(&h.decided(&bob, &first).await);
    assert_eq!(
        links(&h, &drained, "prod-1", 1).await,
        std::slice::from_ref(&first.command_id)
    );
    let meanwhile = refused(
        &h.decided(&bob, &undoing(weights("prod-1", 60), &drained))
            .await,
        C::NotUndoable,
    );
    assert!(
        meanwhile.contains(&format!("being undone, by command {}", first.command_id)),
        "{meanwhile}"
    );
    ran(&h, &first, "prod-1", failed()).await;
    let second = undoing(weights("prod-1", 60), &drained);
    admitted(&h.decided(&bob, &second).await);
    ran(&h, &second, "prod-1", succeeded("0")).await;
    let again = refused(
        &h.decided(&bob, &undoing(weights("prod-1", 60), &drained))
            .await,
        C::NotUndoable,
    );
    assert!(
        again.contains(&format!("undone already, by command {}", second.command_id)),
        "{again}"
    );

    // Every submission delivered again: one decision each, one link per undo.
    let before = h.decisions().await.len();
    h.redeliver_everything().await;
    h.submissions_settled().await;
    assert_eq!(h.decisions().await.len(), before);
    assert_eq!(
        links(&h, &drained, "prod-1", 2).await,
        [first.command_id, second.command_id]
    );
}

/// A scale of `deployment` to `replicas`.
fn scale(deployment: &str, replicas: i64) -> proto::Submission {
    let mut submission = support::workload("workloads/scale", deployment, "SRE-301");
    if let Some(proto::submission::Request::Run(run)) = &mut submission.request {
        run.params.insert(
            "replicas".into(),
            support::value(proto::value::Kind::Integer(replicas)),
        );
    }
    submission
}

/// Two undos of one command, submitted at once to two replicas, never both run: the scale
/// locks nothing, so only the undo's own lock and the reading again under it keep the second
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_undos_of_one_command_at_once_admit_one() {
    let h = Harness::start().await;
    let second = h.second_replica();
    let alice = h.operator("alice", &["sre_team"]).await;

    const ORIGINALS: usize = 8;
    let mut originals = Vec::new();
    for n in 0..ORIGINALS {
        let original = scale(&format!("app-{n}"), 7);
        assert!(rejection(&h.decided(&alice, &original).await).is_none());
        let outputs = [("previous_replicas".to_owned(), "3".to_owned())].into();
        let success = Kind::Succeeded(proto::Succeeded {
            summary: "scaled".into(),
            outputs,
        });
        ran(&h, &original, "_", success).await;
        originals.push(original);
    }
    let undos: Vec<(usize, proto::Submission)> = (0..2)
        .flat_map(|_| {
            originals.iter().enumerate().map(|(n, original)| {
                let undo = scale(&format!("app-{n}"), 3);
                (n, undoing(undo, original))
            })
        })
        .collect();
    let sequences =
        futures::future::join_all(undos.iter().map(|(_, undo)| h.submit(&alice, undo))).await;
    let mut admitted = [0; ORIGINALS];
    for ((n, _), sequence) in undos.iter().zip(sequences) {
        match rejection(&h.decision(sequence).await) {
            None => admitted[*n] += 1,
            Some((code, message)) => assert!(
                [C::Locked, C::NotUndoable].contains(&code),
                "{code:?}: {message}"
            ),
        }
    }
    assert_eq!(admitted, [1; ORIGINALS], "admitted per original");
    second.stop().await;
}
