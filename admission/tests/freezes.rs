//! Freeze windows, against a real nats-server: the catalog's windows (fixed and recurring)
//! and freezes started on record refuse the operations of their towers with `frozen`, naming
//! the window and its end; only break-glass runs through; a request that waited for
//! approvals is refused if a freeze holds when it is approved.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use rct_bus::proto::{self, RejectionCode as C, event::Kind, value::Kind as V};
use rct_bus::{CommandId, EventKind, Target, Tower};
use rct_streams::replay;
use rct_streams::timestamp::from_datetime;
use support::{Harness, Operator, drain, rejection, run, value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The example catalog with `windows` as its freezes, in a file of its own under `dir`.
fn catalog_with_freezes(dir: &std::path::Path, windows: &str) -> PathBuf {
    let example = std::fs::read_to_string(support::catalog_path()).unwrap();
    let changed = example.replace("freezes: []", &format!("freezes:\n{windows}"));
    assert_ne!(changed, example, "the example catalog's freezes moved");
    let path = dir.join("catalog.yaml");
    std::fs::write(&path, changed).unwrap();
    path
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap()
}

fn restart(deployment: &str) -> proto::Submission {
    run(
        "workloads/restart",
        "_",
        [
            ("namespace", value(V::String("shop".into()))),
            ("deployment", value(V::String(deployment.into()))),
        ],
        "SRE-7",
    )
}

fn delete(deployment: &str, break_glass: &str) -> proto::Submission {
    let mut submission = run(
        "workloads/delete",
        "_",
        [
            ("namespace", value(V::String("shop".into()))),
            ("deployment", value(V::String(deployment.into()))),
        ],
        "INC-7",
    );
    if let Some(proto::submission::Request::Run(run)) = &mut submission.request {
        run.break_glass = break_glass.into();
    }
    submission
}

/// A freeze of `tower` for `duration` (`None`: its end), justified by `why`.
fn freeze(tower: &str, duration: Option<Duration>, why: &str) -> proto::Submission {
    let now = OffsetDateTime::now_utc();
    proto::Submission {
        command_id: CommandId::generate().to_string(),
        operation: format!("_freeze/{tower}"),
        justification: why.into(),
        requested_at: Some(from_datetime(now)),
        expires_at: Some(from_datetime(now + time::Duration::minutes(1))),
        client: None,
        request: Some(proto::submission::Request::Freeze(proto::Freeze {
            duration: duration.map(|d| d.try_into().unwrap()),
            end: duration.is_none(),
        })),
    }
}

async fn decide(h: &Harness, who: &Operator, submission: &proto::Submission) -> proto::Event {
    h.decision(h.submit(who, submission).await).await
}

fn code(event: &proto::Event) -> Option<C> {
    rejection(event).map(|(code, _)| code)
}

fn admitted(event: &proto::Event) -> bool {
    matches!(event.kind, Some(Kind::Admitted(_)))
}

#[tokio::test]
async fn the_catalogs_windows_refuse_their_towers_operations_and_name_their_end() {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let end = now + time::Duration::hours(3);
    let windows = format!(
        "  - {{ name: holiday, start: \"{}\", end: \"{}\", towers: [traffic] }}\n  - {{ name: \
         over, start: \"{}\", end: \"{}\", towers: [workloads] }}\n  - {{ name: always, cron: \
         \"* * * * *\", duration: 2m, towers: [workloads] }}\n",
        rfc3339(now - time::Duration::hours(1)),
        rfc3339(end),
        rfc3339(now - time::Duration::hours(3)),
        rfc3339(now - time::Duration::hours(2)),
    );
    let catalog = catalog_with_freezes(dir.path(), &windows);
    let h = Harness::start_with(move |c| c.catalog = catalog.clone()).await;
    let sre = h.operator("erin", &["sre_team"]).await;

    // In the fixed window: refused, naming it and its end.
    let refused = decide(&h, &sre, &drain("prod-1")).await;
    let (code, message) = rejection(&refused).unwrap();
    assert_eq!(code, C::Frozen, "{message}");
    // Said to the second, rounded up: said to end then, it has ended.
    let end = rfc3339(end.replace_nanosecond(0).unwrap() + time::Duration::SECOND);
    assert!(
        message.contains("holiday") && message.contains(&end),
        "{end}: {message}"
    );

    // A request refused anyway says why, not that it is frozen.
    let mut unjustified = drain("prod-1");
    unjustified.justification = String::new();
    let refused = decide(&h, &sre, &unjustified).await;
    assert_eq!(self::code(&refused), Some(C::JustificationRequired));

    // The recurring window holds workloads (the past fixed one does not matter).
    let refused = decide(&h, &sre, &restart("cart")).await;
    let (code, message) = rejection(&refused).unwrap();
    assert_eq!(code, C::Frozen, "{message}");
    assert!(message.contains("always"), "{message}");

    // Break-glass runs through, for its groups only.
    let oncall = h.operator("olga", &["sre_team", "sre_oncall"]).await;
    let broken = decide(&h, &oncall, &delete("cart", "site down, INC-9")).await;
    assert!(admitted(&broken), "{broken:?}");
    let refused = decide(&h, &sre, &delete("web", "I am in a hurry")).await;
    assert_eq!(self::code(&refused), Some(C::Forbidden), "{refused:?}");
    assert_eq!(h.commands().await, 1);
}

#[tokio::test]
async fn a_freeze_on_record_holds_until_it_ends_and_only_freeze_groups_start_one() {
    let h = Harness::start().await;
    let sre = h.operator("erin", &["sre_team"]).await;
    let lead = h.operator("bob", &["sre_leads"]).await;
    let hour = Some(Duration::from_secs(3600));

    // Every bad freeze request is refused with its own code.
    let refused = decide(&h, &sre, &freeze("traffic", hour, "INC-1")).await;
    assert_eq!(code(&refused), Some(C::Forbidden), "{refused:?}");
    let refused = decide(&h, &lead, &freeze("traffic", hour, "")).await;
    assert_eq!(
        code(&refused),
        Some(C::JustificationRequired),
        "{refused:?}"
    );
    let refused = decide(&h, &lead, &freeze("nowhere", hour, "INC-1")).await;
    assert_eq!(code(&refused), Some(C::UnknownOperation), "{refused:?}");
    for too in [Duration::ZERO, Duration::from_secs(40 * 24 * 3600)] {
        let refused = decide(&h, &lead, &freeze("traffic", Some(too), "INC-1")).await;
        assert_eq!(
            code(&refused),
            Some(C::InvalidParams),
            "{too:?}: {refused:?}"
        );
    }
    assert!(admitted(&decide(&h, &sre, &drain("prod-1")).await));

    // Started: recorded under _freeze with the tower as its target; the tower's operations
    // are refused, naming who froze it and why; other towers are not.
    let started = decide(&h, &lead, &freeze("traffic", hour, "INC-1")).await;
    assert!(admitted(&started), "{started:?}");
    assert_eq!(
        (started.operation.as_str(), started.target.as_str()),
        ("_freeze/traffic", "traffic")
    );
    let refused = decide(&h, &sre, &drain("prod-2")).await;
    let (code, message) = rejection(&refused).unwrap();
    assert_eq!(code, C::Frozen, "{message}");
    assert!(
        message.contains("bob") && message.contains("INC-1"),
        "{message}"
    );
    assert!(admitted(&decide(&h, &sre, &restart("cart")).await));
    // Cancelling is never frozen.
    let mut cancel = freeze("traffic", None, "SRE-101");
    cancel.operation = "traffic/drain-cluster".into();
    cancel.request = Some(proto::submission::Request::Cancel(proto::Cancel {
        command_id: started.command_id.clone(),
        resume: false,
    }));
    assert_ne!(
        self::code(&decide(&h, &sre, &cancel).await),
        Some(C::Frozen)
    );

    // Ended: the tower runs again.
    let ended = decide(&h, &lead, &freeze("traffic", None, "INC-1")).await;
    assert!(admitted(&ended), "{ended:?}");
    let drained = decide(&h, &sre, &drain("prod-3")).await;
    assert!(admitted(&drained), "{drained:?}");
}

#[tokio::test]
async fn a_request_approved_during_a_freeze_is_refused_and_one_asked_during_it_never_waits() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;
    let request = delete("cart", "");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;
    let tower = Tower::new("workloads").unwrap();
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(r) = replay::slot(
                &h.js,
                &tower,
                &Target::none(),
                id.parse().unwrap(),
                EventKind::Pending,
            )
            .await
            .unwrap()
            {
                return r.event;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    let Some(Kind::Pending(p)) = waiting.kind else {
        panic!("not waiting: {waiting:?}");
    };

    let frozen = decide(
        &h,
        &bob,
        &freeze("workloads", Some(Duration::from_secs(600)), "INC-2"),
    )
    .await;
    assert!(admitted(&frozen), "{frozen:?}");
    for who in [&bob, &carol] {
        let mut approval = freeze("workloads", None, "INC-7");
        approval.operation = "workloads/delete".into();
        approval.request = Some(rct_bus::approval::request(&id, &p.digest, false));
        assert!(admitted(&decide(&h, who, &approval).await));
    }
    let decision = h.decision(sequence).await;
    let (code, message) = rejection(&decision).unwrap();
    assert_eq!(code, C::Frozen, "{message}");
    assert!(message.contains("approved, but"), "{message}");

    // Asked during the freeze: refused at once, never parked.
    let asked = delete("web", "");
    let refused = decide(&h, &alice, &asked).await;
    assert_eq!(self::code(&refused), Some(C::Frozen), "{refused:?}");
    let parked = replay::slot(
        &h.js,
        &tower,
        &Target::none(),
        asked.command_id.parse().unwrap(),
        EventKind::Pending,
    )
    .await
    .unwrap();
    assert!(parked.is_none(), "{parked:?}");
    assert_eq!(h.commands().await, 0);
}
