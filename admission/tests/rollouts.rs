//! Rollouts against a real nats-server: one decision for many targets, then children sent
//! by the coordinator within the rollout's limits, wave by wave, each once. The tests play
//! the agents, so they decide when each child ends and can look at every moment between.

mod support;

use std::time::{Duration, Instant};

use prost::Message as _;
use rct_bus::proto::{self, RejectionCode as C, event::Kind, submission::Request};
use rct_bus::{CommandId, EventKind, Target, rollout, subject};
use support::{Harness, Operator, drain, rejection, run};

/// A drain of `targets` as a rollout, its options set by `with`.
fn rollout_of(targets: &str, with: impl FnOnce(&mut proto::Rollout)) -> proto::Submission {
    let mut submission = run(
        "traffic/drain-cluster",
        rollout::PARENT_TARGET,
        [],
        "SRE-101",
    );
    let mut asked = proto::Rollout {
        targets: targets.into(),
        ..Default::default()
    };
    with(&mut asked);
    if let Some(Request::Run(run)) = &mut submission.request {
        run.rollout = Some(asked);
    }
    submission
}

/// The event in `id`'s `kind` slot, if any.
async fn slot(h: &Harness, id: CommandId, kind: EventKind) -> Option<proto::Event> {
    rct_streams::journal::first(&h.js, "RCT_EVT", &subject::events_of_kind(id, kind), |_| {
        true
    })
    .await
    .unwrap()
    .map(|m| proto::Event::decode(m.payload).unwrap())
}

/// How many messages `stream` holds on `filter`.
async fn count(h: &Harness, stream: &str, filter: &str) -> usize {
    let stream = h.js.get_stream(stream).await.unwrap();
    let subjects = stream.info_with_subjects(filter).await.unwrap();
    futures::pin_mut!(subjects);
    let mut total = 0;
    while let Some(entry) = futures::StreamExt::next(&mut subjects).await {
        total += entry.unwrap().1;
    }
    total
}

/// A rollout as the tests see it: its id and targets.
struct Watched {
    id: CommandId,
    targets: Vec<String>,
}

/// Where a child stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Waiting,
    Refused,
    Running,
    Ended,
}

impl Watched {
    fn child(&self, target: &str) -> CommandId {
        rollout::child_id(self.id, &Target::new(target).unwrap())
    }

    fn health(&self, target: &str) -> CommandId {
        rollout::health_id(self.id, &Target::new(target).unwrap())
    }

    async fn seen(&self, h: &Harness, id: CommandId) -> Seen {
        match slot(h, id, EventKind::Decision).await.and_then(|d| d.kind) {
            None => Seen::Waiting,
            Some(Kind::Rejected(_)) => Seen::Refused,
            Some(_) => match slot(h, id, EventKind::Outcome).await {
                None => Seen::Running,
                Some(_) => Seen::Ended,
            },
        }
    }

    /// Each target's child, now.
    async fn children(&self, h: &Harness) -> Vec<Seen> {
        let mut seen = Vec::new();
        for target in &self.targets {
            seen.push(self.seen(h, self.child(target)).await);
        }
        seen
    }

    /// Waits (asserting at every look that at most `most` run at once) until the children
    /// stop changing for a moment, and returns them.
    async fn settled(&self, h: &Harness, most: usize) -> Vec<Seen> {
        let mut last = self.children(h).await;
        let mut since = Instant::now();
        let start = Instant::now();
        loop {
            let running = last.iter().filter(|s| **s == Seen::Running).count();
            assert!(running <= most, "{running} children run at once: {last:?}");
            if since.elapsed() > Duration::from_millis(800) {
                return last;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "never settled");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.children(h).await;
            if now != last {
                since = Instant::now();
                last = now;
            }
        }
    }

    /// The rollout's outcome, waited for.
    async fn outcome(&self, h: &Harness) -> Kind {
        let start = Instant::now();
        loop {
            if let Some(outcome) = slot(h, self.id, EventKind::Outcome).await {
                return outcome.kind.unwrap();
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("the rollout never ended: {:?}", self.log(h).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The lines the coordinator wrote on the rollout's timeline.
    async fn log(&self, h: &Harness) -> Vec<String> {
        let records = rct_streams::replay::history(
            &h.js,
            &rct_streams::replay::Filter {
                command: Some(self.id),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        futures::StreamExt::collect::<Vec<_>>(records)
            .await
            .into_iter()
            .filter_map(|r| match r.unwrap().event.kind {
                Some(Kind::Log(l)) => Some(l.line),
                _ => None,
            })
            .collect()
    }
}

/// A new stack, and alice of `sre_team`, who may drain.
async fn stack_with_alice() -> (Harness, Operator) {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    (h, alice)
}

/// Submits `submission` (a rollout) as `who`, asserting it is admitted.
async fn started(h: &Harness, who: &Operator, submission: &proto::Submission) -> Watched {
    let decision = h.decided(who, submission).await;
    let Some(Kind::Admitted(admitted)) = &decision.kind else {
        panic!("not admitted: {:?}", rejection(&decision));
    };
    assert_eq!(decision.target, rollout::PARENT_TARGET);
    let plan = admitted.request.as_ref().unwrap().rollout.clone().unwrap();
    Watched {
        id: submission.command_id.parse().unwrap(),
        targets: plan.targets,
    }
}

/// What the agent of `target` records when it ran command `id` of `operation` to `outcome`.
async fn ends(h: &Harness, id: CommandId, operation: &str, target: &str, outcome: Kind) {
    support::ran_command(h, &id.to_string(), operation, target, outcome).await;
}

fn succeeded() -> Kind {
    Kind::Succeeded(proto::Succeeded {
        summary: "drained".into(),
        ..Default::default()
    })
}

fn failed() -> Kind {
    Kind::Failed(proto::Failed {
        code: "unreachable".into(),
        message: "the load balancer did not answer".into(),
        ..Default::default()
    })
}

fn healthy(yes: bool) -> Kind {
    Kind::Succeeded(proto::Succeeded {
        summary: "checked".into(),
        outputs: [("healthy".to_owned(), yes.to_string())].into(),
    })
}

const DRAIN: &str = "traffic/drain-cluster";
const HEALTH: &str = "traffic/check-health";

#[tokio::test]
async fn a_rollout_sends_each_target_once_within_its_concurrency_and_ends_succeeded() {
    let (h, alice) = stack_with_alice().await;
    let asked = rollout_of("prod-3,prod-*", |r| r.max_concurrency = "2".into());
    let r = started(&h, &alice, &asked).await;
    // As given: prod-3 first, then the pattern's others in catalog order.
    assert_eq!(r.targets, ["prod-3", "prod-1", "prod-2", "prod-4"]);

    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 2).await, [Running, Running, Waiting, Waiting]);
    // One ends: the next starts, never a third at once.
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    assert_eq!(r.settled(&h, 2).await, [Running, Ended, Running, Waiting]);
    for target in ["prod-3", "prod-2"] {
        ends(&h, r.child(target), DRAIN, target, succeeded()).await;
    }
    assert_eq!(r.settled(&h, 2).await, [Ended, Ended, Ended, Running]);
    ends(&h, r.child("prod-4"), DRAIN, "prod-4", succeeded()).await;
    match r.outcome(&h).await {
        Kind::Succeeded(s) => assert!(s.summary.contains("4 of 4 targets succeeded"), "{s:?}"),
        other => panic!("{other:?}"),
    }

    // Each child: one decision, naming its rollout, and one command, with its target.
    for target in &r.targets {
        let child = r.child(target);
        let decision = slot(&h, child, EventKind::Decision).await.unwrap();
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            panic!("{decision:?}");
        };
        let request = admitted.request.as_ref().unwrap();
        assert_eq!(request.parent, asked.command_id);
        assert_eq!(decision.target, *target);
        assert_eq!(admitted.locks, [target.as_str()]);
        assert_eq!(
            count(
                &h,
                "RCT_EVT",
                &subject::events_of_kind(child, EventKind::Decision)
            )
            .await,
            1
        );
        let on = format!("rct.cmd.traffic.{target}.drain-cluster");
        assert_eq!(count(&h, "RCT_CMD", &on).await, 1, "{on}");
        let stored = h.command_on(&on).await;
        let envelope = proto::SignedEnvelope::decode(stored.payload).unwrap();
        let command = proto::Command::decode(envelope.body.as_slice()).unwrap();
        assert_eq!(command.command_id, child.to_string());
        assert_eq!(command.parent, asked.command_id);
        assert_eq!(
            command.params.get("cluster").and_then(|v| v.kind.clone()),
            Some(proto::value::Kind::Target(target.clone()))
        );
    }
    let log = r.log(&h).await;
    assert!(
        log.iter().any(|l| l.starts_with("prod-3: started as")),
        "{log:?}"
    );
}

#[tokio::test]
async fn past_max_errors_no_new_target_starts_and_the_overshoot_is_said() {
    let (h, alice) = stack_with_alice().await;
    let r = started(
        &h,
        &alice,
        &rollout_of("prod-*", |r| {
            r.max_concurrency = "3".into();
            r.max_errors = "1".into();
            r.max_degraded = "4".into();
        }),
    )
    .await;
    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 3).await, [Running, Running, Running, Waiting]);
    // Two fail while the third still runs (prod-2's agent was killed mid-way: what it did
    // is unknown): past the limit, prod-4 never starts; the rollout waits for prod-3, then
    // halts saying one failure was of a target in flight.
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", failed()).await;
    let killed = Kind::Unknown(proto::Unknown {
        reason: "its agent stopped while it ran".into(),
    });
    ends(&h, r.child("prod-2"), DRAIN, "prod-2", killed).await;
    assert_eq!(r.settled(&h, 3).await, [Ended, Ended, Running, Waiting]);
    ends(&h, r.child("prod-3"), DRAIN, "prod-3", failed()).await;
    match r.outcome(&h).await {
        Kind::Failed(f) => {
            assert_eq!(f.code, "halted");
            assert!(f.message.contains("3 targets failed"), "{f:?}");
            assert!(f.message.contains("1 of them already running"), "{f:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.children(&h).await, [Ended, Ended, Ended, Waiting]);
}

#[tokio::test]
async fn waves_halt_on_an_unhealthy_target_and_pause_on_an_inconclusive_one() {
    let (h, alice) = stack_with_alice().await;
    let waves = |r: &mut proto::Rollout| {
        r.waves = "1,100%".into();
        r.max_concurrency = "4".into();
        r.max_degraded = "1".into();
        r.health = HEALTH.into();
    };
    use Seen::{Ended, Running, Waiting};

    // Unhealthy after the first wave: halted, the second wave never starts.
    let r = started(&h, &alice, &rollout_of("prod-1,prod-2,prod-3", waves)).await;
    assert_eq!(r.settled(&h, 4).await, [Running, Waiting, Waiting]);
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    assert_eq!(r.seen(&h, r.health("prod-1")).await, Waiting);
    // While prod-1's check runs, the second wave waits for it.
    assert_eq!(r.settled(&h, 4).await, [Ended, Waiting, Waiting]);
    assert_eq!(r.seen(&h, r.health("prod-1")).await, Running);
    let check = slot(&h, r.health("prod-1"), EventKind::Decision)
        .await
        .unwrap();
    assert_eq!(check.operation, HEALTH);
    ends(&h, r.health("prod-1"), HEALTH, "prod-1", healthy(false)).await;
    match r.outcome(&h).await {
        Kind::Failed(f) => assert!(
            f.message.contains("unhealthy after the wave: prod-1"),
            "{f:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.children(&h).await, [Ended, Waiting, Waiting]);

    // The health check itself fails: paused for a person, who resumes it; then it goes on.
    let r = started(&h, &alice, &rollout_of("prod-1,prod-2,prod-3", waves)).await;
    // A resume before anything paused accepts nothing that comes after it.
    let early = cancel_of(&r, "SRE-101", true);
    assert!(rejection(&h.decided(&alice, &early).await).is_none());
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    r.settled(&h, 4).await;
    ends(&h, r.health("prod-1"), HEALTH, "prod-1", failed()).await;
    assert_eq!(r.settled(&h, 4).await, [Ended, Waiting, Waiting]);
    let log = r.log(&h).await;
    assert!(
        log.iter()
            .any(|l| l.starts_with("paused: the health of prod-1 could not be checked")),
        "{log:?}"
    );
    let resume = cancel_of(&r, "SRE-101", true);
    let decision = h.decided(&alice, &resume).await;
    assert!(rejection(&decision).is_none(), "{decision:?}");
    assert_eq!(r.settled(&h, 4).await, [Ended, Running, Running]);
    for target in ["prod-2", "prod-3"] {
        ends(&h, r.child(target), DRAIN, target, succeeded()).await;
    }
    r.settled(&h, 4).await;
    for target in ["prod-2", "prod-3"] {
        ends(&h, r.health(target), HEALTH, target, healthy(true)).await;
    }
    assert!(
        matches!(r.outcome(&h).await, Kind::Succeeded(_)),
        "{:?}",
        r.log(&h).await
    );
}

/// Waits until `id`'s `kind` slot holds an event.
async fn on_record(h: &Harness, id: CommandId, kind: EventKind) {
    let start = Instant::now();
    while slot(h, id, kind).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {kind} of {id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request that waits for approvals, parked by `who` under `id`.
async fn park_under(h: &Harness, who: &Operator, id: CommandId) {
    let mut parked = support::workload("workloads/delete", "cart", "SRE-66");
    parked.command_id = id.to_string();
    h.submit(who, &parked).await;
    on_record(h, id, EventKind::Pending).await;
}

/// `name=value` for `target` alone.
fn per_target(
    target: &str,
    name: &str,
    value: i64,
) -> std::collections::BTreeMap<String, proto::Params> {
    let values = [(
        name.to_owned(),
        support::value(proto::value::Kind::Integer(value)),
    )]
    .into();
    [(target.to_owned(), proto::Params { values })].into()
}

/// A halt (or, with `resume`, a resume) of rollout `r`.
fn cancel_of(r: &Watched, justification: &str, resume: bool) -> proto::Submission {
    let mut submission = run(DRAIN, "_", [], justification);
    submission.request = Some(Request::Cancel(proto::Cancel {
        command_id: r.id.to_string(),
        resume,
    }));
    submission
}

#[tokio::test]
async fn a_halted_rollout_starts_nothing_more_and_ends_cancelled_once_its_children_end() {
    let (h, alice) = stack_with_alice().await;
    let bob = h.operator("bob", &["traffic_team"]).await;
    let r = started(&h, &alice, &rollout_of("prod-*", |_| {})).await;
    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 1).await, [Running, Waiting, Waiting, Waiting]);
    let halt = cancel_of(&r, "SRE-9", false);
    assert!(rejection(&h.decided(&bob, &halt).await).is_none());
    // On the rollout's timeline before prod-1 ends (its decision comes first).
    on_record(&h, r.id, EventKind::Cancel).await;
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    match r.outcome(&h).await {
        Kind::Cancelled(c) => assert!(c.reason.contains("halted by bob@example.com"), "{c:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.settled(&h, 1).await, [Ended, Waiting, Waiting, Waiting]);
    // A resume is for rollouts only.
    let mut not_a_rollout = cancel_of(&r, "SRE-9", true);
    let plain = drain("prod-2");
    h.decided(&alice, &plain).await;
    if let Some(Request::Cancel(c)) = &mut not_a_rollout.request {
        c.command_id = plain.command_id.clone();
    }
    let (code, message) = rejection(&h.decided(&bob, &not_a_rollout).await).unwrap();
    assert_eq!(code, C::UnknownCommand);
    assert!(message.contains("not a rollout"), "{message}");
}

#[tokio::test]
async fn a_child_whose_target_another_command_locks_is_refused_and_counts_as_failed() {
    let (h, alice) = stack_with_alice().await;
    let holder = drain("prod-2");
    h.decided(&alice, &holder).await;
    let r = started(
        &h,
        &alice,
        &rollout_of("prod-1,prod-2", |r| {
            r.max_concurrency = "2".into();
            r.max_errors = "1".into();
        }),
    )
    .await;
    use Seen::{Ended, Refused, Running};
    assert_eq!(r.settled(&h, 2).await, [Running, Refused]);
    let refusal = slot(&h, r.child("prod-2"), EventKind::Decision)
        .await
        .unwrap();
    let (code, message) = rejection(&refusal).unwrap();
    assert_eq!(code, C::Locked);
    assert!(message.contains(&holder.command_id), "{message}");
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    match r.outcome(&h).await {
        Kind::Failed(f) => {
            assert_eq!(f.code, "children_failed");
            assert!(
                f.message.contains("1 of 2 targets failed (prod-2)"),
                "{f:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.children(&h).await, [Ended, Refused]);
}

#[tokio::test]
async fn a_rollout_asks_for_what_its_operation_and_tower_allow() {
    let (h, alice) = stack_with_alice().await;
    let cases: Vec<(proto::Submission, &str)> = vec![
        (rollout_of("prod-9", |_| {}), "prod-9 names no target"),
        (
            rollout_of("prod-*", |r| r.waves = "50%,25%".into()),
            "is not larger than the one before",
        ),
        (
            rollout_of("prod-*", |r| r.max_concurrency = "0".into()),
            "at least 1",
        ),
        (
            rollout_of("prod-*", |r| r.health = "traffic/nope".into()),
            "the health check traffic/nope",
        ),
        (
            rollout_of("prod-*", |r| r.health = "workloads/restart".into()),
            "must be an operation of tower traffic",
        ),
        (
            {
                let mut s = rollout_of("prod-*", |_| {});
                s.operation = "traffic/check-health".into();
                s
            },
            "has no `fan_out`",
        ),
        (
            {
                let mut s = rollout_of("prod-1,prod-2", |r| {
                    r.params_by_target = per_target("prod-1", "keep_percent", 10);
                });
                if let Some(Request::Run(run)) = &mut s.request {
                    run.params.insert(
                        "keep_percent".into(),
                        support::value(proto::value::Kind::Integer(50)),
                    );
                }
                s
            },
            "keep_percent is given for every target and again for prod-1",
        ),
        (
            rollout_of("prod-1,prod-2", |r| {
                r.params_by_target = per_target("prod-9", "keep_percent", 10);
            }),
            "prod-9, which is not one of the rollout's targets",
        ),
        (
            rollout_of("prod-1,prod-2", |r| {
                r.params_by_target = per_target("prod-1", "cluster", 0);
            }),
            "name its cluster",
        ),
    ];
    for (submission, expected) in cases {
        let decision = h.decided(&alice, &submission).await;
        let (code, message) =
            rejection(&decision).unwrap_or_else(|| panic!("admitted: {decision:?}"));
        assert_eq!(code, C::InvalidParams, "{message}");
        assert!(message.contains(expected), "{expected:?}: {message}");
    }
}

#[tokio::test]
async fn the_coordinator_killed_mid_rollout_resumes_on_the_other_replica_sending_no_child_twice() {
    let mut h = Harness::start_with(|c| c.rollout_lease = Duration::from_secs(1)).await;
    let other = h.second_replica();
    let alice = h.operator("alice", &["sre_team"]).await;
    let r = started(
        &h,
        &alice,
        &rollout_of("prod-*", |r| r.max_concurrency = "2".into()),
    )
    .await;
    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 2).await, [Running, Running, Waiting, Waiting]);
    // Both replicas are up: whichever coordinates, stop the first; if it was the one, the
    // other takes over within its lease. Then stop the other and start the first again.
    h.stop_admission().await;
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    assert_eq!(r.settled(&h, 2).await, [Ended, Running, Running, Waiting]);
    other.stop().await;
    h.start_admission().await;
    ends(&h, r.child("prod-2"), DRAIN, "prod-2", succeeded()).await;
    ends(&h, r.child("prod-3"), DRAIN, "prod-3", succeeded()).await;
    assert_eq!(r.settled(&h, 2).await, [Ended, Ended, Ended, Running]);
    ends(&h, r.child("prod-4"), DRAIN, "prod-4", succeeded()).await;
    assert!(matches!(r.outcome(&h).await, Kind::Succeeded(_)));
    for target in &r.targets {
        let on = format!("rct.cmd.traffic.{target}.drain-cluster");
        assert_eq!(count(&h, "RCT_CMD", &on).await, 1, "{on}");
        assert_eq!(
            count(
                &h,
                "RCT_EVT",
                &subject::events_of_kind(r.child(target), EventKind::Decision)
            )
            .await,
            1
        );
    }
    assert_eq!(
        count(
            &h,
            "RCT_EVT",
            &subject::events_of_kind(r.id, EventKind::Outcome)
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_rollout_no_coordinator_starts_by_its_deadline_expires_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = quick_deadlines(dir.path());
    let h = Harness::start_with(move |c| {
        c.catalog = catalog.clone();
        c.rollout_lease = Duration::from_secs(1);
    })
    .await;
    // Another replica, gone, holds the coordinator's lease for a while.
    gone_holds_the_lease(&h).await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let r = started(&h, &alice, &rollout_of("prod-*", |_| {})).await;
    match r.outcome(&h).await {
        Kind::Expired(_) => {}
        other => panic!("{other:?}"),
    }
    let claim = slot(&h, r.id, EventKind::Claim).await.unwrap();
    assert!(matches!(claim.kind, Some(Kind::Started(s)) if s.without_running));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.children(&h).await, [Seen::Waiting; 4]);
    assert_eq!(count(&h, "RCT_CMD", "rct.cmd.traffic.>").await, 0);
}

#[tokio::test]
async fn a_command_under_a_childs_id_is_not_that_child() {
    let (h, alice) = stack_with_alice().await;
    let mallory = h.operator("mallory", &["traffic_team"]).await;
    let r = started(&h, &alice, &rollout_of("prod-1,prod-2,prod-3", |_| {})).await;
    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 1).await, [Running, Waiting, Waiting]);
    // Anyone can derive the ids the rollout will give its children. Mallory drains prod-2
    // under its child's id (it runs and succeeds, as her own command) and parks a request
    // that waits for approvals under prod-3's.
    let mut squat = drain("prod-2");
    squat.command_id = r.child("prod-2").to_string();
    assert!(rejection(&h.decided(&mallory, &squat).await).is_none());
    ends(&h, r.child("prod-2"), DRAIN, "prod-2", drained_from(100)).await;
    park_under(&h, &alice, r.child("prod-3")).await;
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", drained_from(100)).await;
    // prod-2 was never drained by the rollout: not counted, and said why.
    assert_eq!(r.settled(&h, 1).await, [Ended, Ended, Waiting]);
    let log = r.log(&h).await;
    assert!(
        log.iter()
            .any(|l| l.starts_with("prod-2: refused: its id is held by another command")),
        "{log:?}"
    );
    match r.outcome(&h).await {
        Kind::Failed(f) => assert!(f.message.contains("prod-2"), "{f:?}"),
        other => panic!("{other:?}"),
    }

    // Its undo takes back prod-1, and not Mallory's drain of prod-2.
    let mut undo = undo_of(&r, &[("prod-2", 100), ("prod-1", 100)]);
    if let Some(Request::Run(run)) = &mut undo.request {
        run.rollout.as_mut().unwrap().max_errors = "1".into();
    }
    let u = started(&h, &alice, &undo).await;
    assert_eq!(u.settled(&h, 1).await, [Seen::Refused, Running]);
    ends(&h, u.child("prod-1"), WEIGHTS, "prod-1", succeeded()).await;
    assert!(matches!(u.outcome(&h).await, Kind::Failed(_)));
    let refusal = slot(&h, u.child("prod-2"), EventKind::Decision)
        .await
        .unwrap();
    let why = support::refused(&refusal, C::NotUndoable);
    assert!(why.contains("not the undone rollout's child"), "{why}");
    assert_eq!(u.children(&h).await, [Seen::Refused, Ended]);
}

#[tokio::test]
async fn a_child_takes_its_locks_whatever_someone_parked_under_its_id() {
    let (h, alice) = stack_with_alice().await;
    let r = started(&h, &alice, &rollout_of("prod-1,prod-2", |_| {})).await;
    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 1).await, [Running, Waiting]);
    park_under(&h, &alice, r.child("prod-2")).await;
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    assert_eq!(r.settled(&h, 1).await, [Ended, Running]);
    // prod-2's child runs holding its lock: another change of prod-2 is refused, naming it.
    let message = support::refused(&h.decided(&alice, &drain("prod-2")).await, C::Locked);
    assert!(
        message.contains(&r.child("prod-2").to_string()),
        "{message}"
    );
}

/// A replica that is gone holds the coordinator's lease, for 3 s from now.
async fn gone_holds_the_lease(h: &Harness) {
    let store = rct_streams::locks::bucket(&h.js).await.unwrap();
    let lease = rct_streams::locks::ROLLOUT_LEASE;
    assert!(
        rct_streams::locks::lease(&store, lease, "gone", Duration::from_secs(3))
            .await
            .unwrap()
    );
}

/// The example catalog with drains that must start within a second.
fn quick_deadlines(dir: &std::path::Path) -> std::path::PathBuf {
    support::catalog_with(
        dir,
        "deadline: 2m              # must start within",
        "deadline: 1s",
    )
}

#[tokio::test]
async fn a_child_decided_by_a_coordinator_that_died_before_sending_it_is_sent_by_the_next() {
    let h = Harness::start_with(|c| c.rollout_lease = Duration::from_secs(1)).await;
    // A replica that coordinates, then dies: it holds the lease (never renewed)...
    gone_holds_the_lease(&h).await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let asked = rollout_of("prod-1,prod-2", |_| {});
    let decision = h.decided(&alice, &asked).await;
    let r = Watched {
        id: asked.command_id.parse().unwrap(),
        targets: vec!["prod-1".into(), "prod-2".into()],
    };
    // ...and decided prod-1's child, but never sent its command.
    let policy = h.replica_policy("gone");
    let child = policy
        .child(&decision, "prod-1", false, time::OffsetDateTime::now_utc())
        .unwrap();
    let writer = rct_streams::Publisher::new(h.js.clone()).signing(std::sync::Arc::new(
        rct_bus::provenance::Signer::admission(h.admission_keypair()),
    ));
    let sequence = support::submission_sequence(&decision).unwrap();
    writer
        .event(&"traffic".parse().unwrap(), &child, sequence)
        .await
        .unwrap();
    let on = "rct.cmd.traffic.prod-1.drain-cluster";
    assert_eq!(count(&h, "RCT_CMD", on).await, 0);
    // Once its lease lapses, this replica takes over and sends it: the same child.
    let start = Instant::now();
    while count(&h, "RCT_CMD", on).await == 0 {
        assert!(start.elapsed() < Duration::from_secs(15), "never sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = h.command_on(on).await;
    let envelope = proto::SignedEnvelope::decode(sent.payload).unwrap();
    let command = proto::Command::decode(envelope.body.as_slice()).unwrap();
    assert_eq!(command.command_id, r.child("prod-1").to_string());
    use Seen::{Ended, Running, Waiting};
    assert_eq!(r.settled(&h, 1).await, [Running, Waiting]);
    for target in ["prod-1", "prod-2"] {
        if target == "prod-2" {
            assert_eq!(r.settled(&h, 1).await, [Ended, Running]);
        }
        ends(&h, r.child(target), DRAIN, target, succeeded()).await;
    }
    assert!(matches!(r.outcome(&h).await, Kind::Succeeded(_)));
    assert_eq!(count(&h, "RCT_CMD", on).await, 1);
}

#[tokio::test]
async fn a_child_no_agent_starts_by_its_deadline_expires_and_counts_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = quick_deadlines(dir.path());
    let h = Harness::start_with(move |c| c.catalog = catalog.clone()).await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let r = started(
        &h,
        &alice,
        &rollout_of("prod-1,prod-2", |r| r.max_concurrency = "2".into()),
    )
    .await;
    use Seen::Ended;
    // prod-2's agent runs it; prod-1 has none: ended expired through its claim slot, so a
    // late agent finds the claim taken.
    ends(&h, r.child("prod-2"), DRAIN, "prod-2", succeeded()).await;
    match r.outcome(&h).await {
        Kind::Failed(f) => {
            assert_eq!(f.code, "halted");
            assert!(f.message.contains("1 targets failed"), "{f:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.children(&h).await, [Ended, Ended]);
    let claim = slot(&h, r.child("prod-1"), EventKind::Claim).await.unwrap();
    assert!(matches!(claim.kind, Some(Kind::Started(s)) if s.without_running));
    assert!(matches!(
        slot(&h, r.child("prod-1"), EventKind::Outcome)
            .await
            .and_then(|o| o.kind),
        Some(Kind::Expired(_))
    ));
}

const WEIGHTS: &str = "traffic/set-weights";

/// A drain that succeeded from weight `before`.
fn drained_from(before: i64) -> Kind {
    Kind::Succeeded(proto::Succeeded {
        summary: "drained".into(),
        outputs: [("previous_weight".to_owned(), before.to_string())].into(),
    })
}

/// An undo of rollout `r` as a rollout of set-weights, giving each target its weight.
fn undo_of(r: &Watched, weights: &[(&str, i64)]) -> proto::Submission {
    let targets: Vec<&str> = weights.iter().map(|(t, _)| *t).collect();
    let mut submission = rollout_of(&targets.join(","), |asked| {
        asked.params_by_target = weights
            .iter()
            .map(|(t, w)| {
                let values = [(
                    "weight".to_owned(),
                    support::value(proto::value::Kind::Integer(*w)),
                )]
                .into();
                ((*t).to_owned(), proto::Params { values })
            })
            .collect();
    });
    submission.operation = WEIGHTS.into();
    if let Some(Request::Run(run)) = &mut submission.request {
        run.undo_of = r.id.to_string();
    }
    submission
}

#[tokio::test]
async fn a_rollout_is_undone_as_a_rollout_of_its_succeeded_children_in_reverse_order() {
    let (h, alice) = stack_with_alice().await;
    let r = started(
        &h,
        &alice,
        &rollout_of("prod-1,prod-2,prod-3", |r| r.max_errors = "1".into()),
    )
    .await;
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", drained_from(70)).await;
    r.settled(&h, 1).await;
    ends(&h, r.child("prod-2"), DRAIN, "prod-2", failed()).await;
    r.settled(&h, 1).await;
    // Not ended yet: its undo is refused.
    let early = h.decided(&alice, &undo_of(&r, &[("prod-1", 70)])).await;
    let (code, message) = rejection(&early).unwrap();
    assert_eq!(code, C::NotUndoable);
    assert!(message.contains("has not ended"), "{message}");
    ends(&h, r.child("prod-3"), DRAIN, "prod-3", drained_from(100)).await;
    assert!(matches!(r.outcome(&h).await, Kind::Failed(_)));

    let refused_child = |u: &Watched, target: &str| {
        let id = u.child(target);
        let h = &h;
        async move {
            let decision = slot(h, id, EventKind::Decision).await.unwrap();
            support::refused(&decision, C::NotUndoable)
        }
    };
    // Another weight than prod-1's record gives; a target whose child failed; a target the
    // rollout did not have: each refused, nothing set.
    let wrong = started(&h, &alice, &undo_of(&r, &[("prod-1", 50)])).await;
    assert!(matches!(wrong.outcome(&h).await, Kind::Failed(_)));
    assert!(refused_child(&wrong, "prod-1").await.contains("weight"));
    let unsucceeded = started(&h, &alice, &undo_of(&r, &[("prod-2", 100)])).await;
    assert!(matches!(unsucceeded.outcome(&h).await, Kind::Failed(_)));
    assert!(
        refused_child(&unsucceeded, "prod-2")
            .await
            .contains("did not succeed")
    );
    let stranger = h.decided(&alice, &undo_of(&r, &[("prod-4", 100)])).await;
    let (code, message) = rejection(&stranger).unwrap();
    assert_eq!(code, C::NotUndoable);
    assert!(
        message.contains("prod-4 is not one of its targets"),
        "{message}"
    );

    // The succeeded children, in reverse order, each with what its record gives.
    let u = started(&h, &alice, &undo_of(&r, &[("prod-3", 100), ("prod-1", 70)])).await;
    use Seen::{Ended, Running, Waiting};
    assert_eq!(u.settled(&h, 1).await, [Running, Waiting]);
    let first = slot(&h, u.child("prod-3"), EventKind::Decision)
        .await
        .unwrap();
    let Some(Kind::Admitted(admitted)) = &first.kind else {
        panic!("{first:?}");
    };
    let request = admitted.request.as_ref().unwrap();
    assert_eq!(request.undo_of, r.child("prod-3").to_string());
    assert_eq!(
        request.params.get("weight").and_then(|v| v.kind.clone()),
        Some(proto::value::Kind::Integer(100))
    );
    ends(&h, u.child("prod-3"), WEIGHTS, "prod-3", succeeded()).await;
    assert_eq!(u.settled(&h, 1).await, [Ended, Running]);
    ends(&h, u.child("prod-1"), WEIGHTS, "prod-1", succeeded()).await;
    assert!(matches!(u.outcome(&h).await, Kind::Succeeded(_)));
    // The original children's timelines say who undid them.
    for target in ["prod-3", "prod-1"] {
        let original = Watched {
            id: r.child(target),
            targets: Vec::new(),
        };
        let lines = original.log(&h).await;
        let link = format!("undone by command {}", u.child(target));
        assert!(lines.iter().any(|l| l.contains(&link)), "{lines:?}");
    }
    let last = slot(&h, u.child("prod-1"), EventKind::Decision)
        .await
        .unwrap();
    assert_eq!(
        support::decided_params(&last)
            .get("weight")
            .and_then(|v| v.kind.clone()),
        Some(proto::value::Kind::Integer(70))
    );
    // Undone already: a second undo takes nothing back.
    let again = started(&h, &alice, &undo_of(&r, &[("prod-3", 100)])).await;
    assert!(matches!(again.outcome(&h).await, Kind::Failed(_)));
    assert!(
        refused_child(&again, "prod-3")
            .await
            .contains("undone already")
    );
}

#[tokio::test]
async fn a_freeze_started_while_a_rollout_runs_refuses_its_next_children() {
    let (h, alice) = stack_with_alice().await;
    let lead = h.operator("lee", &["sre_leads"]).await;
    let r = started(
        &h,
        &alice,
        &rollout_of("prod-1,prod-2", |r| r.max_errors = "1".into()),
    )
    .await;
    use Seen::{Ended, Refused, Running, Waiting};
    assert_eq!(r.settled(&h, 1).await, [Running, Waiting]);
    let now = time::OffsetDateTime::now_utc();
    let freeze = proto::Submission {
        command_id: CommandId::generate().to_string(),
        operation: "_freeze/traffic".into(),
        justification: "INC-7".into(),
        requested_at: Some(rct_streams::timestamp::from_datetime(now)),
        expires_at: Some(rct_streams::timestamp::from_datetime(
            now + time::Duration::minutes(1),
        )),
        client: None,
        request: Some(Request::Freeze(proto::Freeze {
            duration: Some(Duration::from_secs(3600).try_into().unwrap()),
            end: false,
        })),
    };
    assert!(rejection(&h.decided(&lead, &freeze).await).is_none());
    // The coordinator reads the freezes once a look: the next look sees it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ends(&h, r.child("prod-1"), DRAIN, "prod-1", succeeded()).await;
    assert_eq!(r.settled(&h, 1).await, [Ended, Refused]);
    let refusal = slot(&h, r.child("prod-2"), EventKind::Decision)
        .await
        .unwrap();
    assert!(support::refused(&refusal, C::Frozen).contains("frozen"));
    assert!(matches!(r.outcome(&h).await, Kind::Failed(_)));
}
