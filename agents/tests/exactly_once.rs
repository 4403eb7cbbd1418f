//! At most once, exactly one outcome, and a journal that says what happened — at the edges:
//! an outcome recorded before a claim lands, a claim whose acknowledgement was lost, a rival
//! outcome, a panicking handler, a command no agent can take now, a catalog that changed
//! since admission, a genuine command the agent cannot verify, a claim taken and never
//! started when the agent stops.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rct_agents::{Context, Outcome, Params, Tower};
use rct_bus::catalog::{Catalog, Served};
use rct_bus::proto::{self, event::Kind};
use rct_bus::{EventKind, KeyPair, Tower as TowerName};
use rct_streams::testkit::Setup;
use rct_streams::timestamp::from_datetime;
use support::{Harness, Ledger, drain_agent, drain_handler, example_catalog, outcome, target};
use time::OffsetDateTime;

fn drain(h: &Harness) -> proto::Command {
    h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1"))],
    )
}

/// An event for `command` as another writer (`source`) would publish it.
fn event(command: &proto::Command, source: &str, kind: Kind) -> proto::Event {
    proto::Event {
        command_id: command.command_id.clone(),
        at: Some(from_datetime(OffsetDateTime::now_utc())),
        source: source.into(),
        operation: command.operation.clone(),
        target: command.target.clone(),
        kind: Some(kind),
    }
}

/// Writes `event` as its writer would sign it: an agent of its target (the instance its
/// source names) for the kinds agents write, admission for the others.
async fn write(h: &Harness, event: &proto::Event, n: &str) {
    let tower = TowerName::new("traffic").unwrap();
    let kind = EventKind::of(event).unwrap();
    // The instance: the one a claim names, else the last part of the source.
    let instance = match &event.kind {
        Some(Kind::Started(started)) => started.agent.clone(),
        _ => event
            .source
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let publisher = if kind.is_written_by_agents() {
        h.as_agent(&event.target, &instance)
    } else {
        h.as_admission()
    };
    publisher.event(&tower, event, n).await.unwrap();
}

fn kinds(records: &[rct_streams::Record], kind: EventKind) -> usize {
    records.iter().filter(|r| r.kind == kind).count()
}

/// A rival recorded `Expired` while this copy was on its way to its claim: the claim lands
/// (its slot was free) but the outcome slot is read after it, and the command is not run.
/// Before, the stream said Expired and the drain happened.
#[tokio::test]
async fn an_outcome_recorded_before_the_claim_landed_stops_the_run() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let command = drain(&h);
    let expired = event(
        &command,
        "agent/traffic/prod-1/rival",
        Kind::Expired(proto::Expired {
            deadline: command.deadline,
        }),
    );
    write(&h, &expired, "rival").await;
    let agent = drain_agent(&h, "prod-1", "a", &ledger);
    h.publish(&command).await;
    // The agent settles the command: a good one published after it runs, so it was seen.
    let after = drain(&h);
    h.publish(&after).await;
    h.finished(&after.command_id).await;
    let records = h.events(&command.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Expired(_)),
        "{records:#?}"
    );
    assert_eq!(ledger.executions(&command.command_id), 0, "never run");
    assert_eq!(kinds(&records, EventKind::Outcome), 1);
    agent.stop().await;
}

/// The claim was stored but its acknowledgement lost, so the retry came back `duplicate`:
/// that is this agent's own claim, and the command runs. Before, it ended `Unknown` without
/// ever running.
#[tokio::test]
async fn a_claim_whose_acknowledgement_was_lost_is_ours_and_the_command_runs() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = drain_agent(&h, "prod-1", "a", &ledger);
    let instance = h.present("traffic", 1).await.remove(0).instance;
    let command = drain(&h);
    // What the lost attempt stored: the claim, under the id this agent's claims carry.
    let claim = event(
        &command,
        &format!("agent/traffic/prod-1/{instance}"),
        Kind::Started(proto::Started {
            agent: instance.clone(),
            host: String::new(),
            target: "prod-1".into(),
            without_running: false,
        }),
    );
    write(&h, &claim, &instance).await;
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Succeeded(_)),
        "{records:#?}"
    );
    assert_eq!(ledger.executions(&command.command_id), 1);
    assert_eq!(kinds(&records, EventKind::Claim), 1);
    // On its first delivery: a claim taken for a rival's would be looked at again on a
    // redelivery, and still run then.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        h.js.get_consumer_from_stream("tower-traffic@prod-1", "RCT_CMD")
            .await
            .unwrap();
    assert_eq!(
        consumer.info().await.unwrap().delivered.consumer_sequence,
        1,
        "the command was delivered again"
    );
    agent.stop().await;
}

/// Another writer recorded an outcome while the handler ran (it took the agent for dead).
/// Outcome ids name their writer, so the agent sees the slot was a rival's, and it writes on
/// the timeline what really happened. Before, every outcome had the id `<id>.outcome.0`: the
/// rival's was taken for the agent's own, and the stream kept silent about the run.
#[tokio::test]
async fn a_rival_outcome_is_not_taken_for_our_own_and_the_run_is_on_record() {
    let h = Harness::start().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (s, r) = (started.clone(), release.clone());
    let agent = h.run(
        Tower::new("traffic")
            .cluster("prod-1")
            .operation("drain-cluster", move |_ctx: Context, _p: Params| {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    s.notify_one();
                    r.notified().await;
                    Ok(Outcome::new("drained"))
                }
            })
            .config(h.config("a")),
    );
    let command = drain(&h);
    h.publish(&command).await;
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("the handler starts");
    let unknown = event(
        &command,
        "agent/traffic/prod-1/rival",
        Kind::Unknown(proto::Unknown {
            reason: "rival".into(),
        }),
    );
    // The id every outcome carried before.
    write(&h, &unknown, "0").await;
    release.notify_one();
    let records = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let records = h.events(&command.command_id).await;
            if records.iter().any(|r| {
                matches!(&r.event.kind, Some(Kind::Log(l))
                    if l.stream == proto::LogStream::Agent as i32 && l.line.contains("succeeded"))
            }) {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent records that its run succeeded though another outcome came first");
    assert!(matches!(outcome(&records), Kind::Unknown(_)));
    assert_eq!(kinds(&records, EventKind::Outcome), 1);
    agent.stop().await;
}

/// A panic in a handler is that command's failure: code `panic`, the message acknowledged,
/// and every task the command started stopped. Before, the command stayed `running` forever
/// while its in-progress acks went on.
#[tokio::test]
async fn a_panicking_handler_fails_with_code_panic_and_leaves_nothing_running() {
    let h = Harness::start().await;
    let ticks = Arc::new(AtomicUsize::new(0));
    let t = ticks.clone();
    let agent = h.run(
        Tower::new("traffic")
            .cluster("prod-1")
            .operation("drain-cluster", move |ctx: Context, _p: Params| {
                let t = t.clone();
                async move {
                    let token = ctx.token();
                    tokio::spawn(async move {
                        while !token.is_cancelled() {
                            t.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if ctx.command_id().is_empty() {
                        return Ok(Outcome::new("unreachable"));
                    }
                    panic!("the load balancer API returned nonsense");
                }
            })
            .config(h.config("a")),
    );
    let command = drain(&h);
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(failed.code, "panic");
    assert!(failed.message.contains("returned nonsense"), "{failed:?}");

    h.acknowledged("tower-traffic@prod-1").await;
    let before = ticks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        ticks.load(Ordering::SeqCst),
        before,
        "the handler's task stopped with the command"
    );
    agent.stop().await;
}

/// No agent can take it now (this one has no handler for it): it is delivered again and
/// again, never given up, until its deadline ends it with `Expired`. Before, the consumer
/// gave it up after 10 deliveries and it stayed `admitted` forever.
#[tokio::test]
async fn a_command_no_agent_can_take_waits_until_its_deadline_and_expires() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = h.run(
        Tower::new("traffic")
            .cluster("prod-1")
            .operation("drain-cluster", drain_handler(ledger.clone(), "a"))
            .config(rct_agents::Config {
                retry_pause: Duration::from_millis(100),
                ..h.config("a")
            }),
    );
    let mut command = h.command(
        "traffic/set-weights",
        "prod-1",
        &[
            ("cluster", target("prod-1")),
            (
                "weight",
                proto::Value {
                    kind: Some(proto::value::Kind::Integer(5)),
                },
            ),
        ],
    );
    // Twenty deliveries fit before the deadline: more than any bounded max_deliver allowed.
    command.deadline = Some(from_datetime(
        OffsetDateTime::now_utc() + time::Duration::seconds(4),
    ));
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Expired(_)),
        "{records:#?}"
    );
    // Its one claim was taken only to end it: never started.
    let claims: Vec<_> = records
        .iter()
        .filter(|r| r.kind == EventKind::Claim)
        .collect();
    assert_eq!(claims.len(), 1, "{records:#?}");
    assert!(
        matches!(&claims[0].event.kind, Some(Kind::Started(s)) if s.without_running),
        "{records:#?}"
    );
    assert_eq!(ledger.executions(&command.command_id), 0);
    agent.stop().await;
}

/// The catalog changed after the command was admitted (its limit is now lower): the agent
/// checks the command against the version it was admitted under, from the bucket's history.
/// Before, it checked against the latest and refused an admitted command.
#[tokio::test]
async fn a_command_is_checked_against_the_catalog_version_it_was_admitted_under() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let command = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[
            ("cluster", target("prod-1")),
            (
                "keep_percent",
                proto::Value {
                    kind: Some(proto::value::Kind::Integer(80)),
                },
            ),
        ],
    );
    let stricter = support::example_catalog_text().replace(
        "keep_percent: { type: integer, min: 0, max: 100,",
        "keep_percent: { type: integer, min: 0, max: 50,",
    );
    let stricter: Catalog = serde_yaml_ng::from_str(&stricter).unwrap();
    assert_ne!(stricter.version(), command.catalog_version);
    let served = Served {
        version: stricter.version(),
        catalog: stricter,
    };
    h.js.get_key_value("rct_catalog")
        .await
        .unwrap()
        .put("catalog", serde_json::to_vec(&served).unwrap().into())
        .await
        .unwrap();
    let agent = drain_agent(&h, "prod-1", "a", &ledger);
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.outputs["kept"], "80");

    // A version the bucket does not hold is refused with a code that says so.
    let mut unknown = drain(&h);
    unknown.catalog_version = "000000000000".into();
    h.publish(&unknown).await;
    let records = h.finished(&unknown.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(failed.code, "catalog_unknown", "{failed:?}");
    assert_eq!(ledger.executions(&unknown.command_id), 0);
    agent.stop().await;
}

/// A genuine command the agent cannot verify (it does not trust admission's current key):
/// the refusal is a note on that command's own timeline at once (never a slot: a forgery
/// could carry a real command's id), and on record under an id derived from the message.
/// Before, nothing reached the command's timeline and its operator waited for the deadline.
#[tokio::test]
async fn a_refused_command_gets_a_note_on_its_own_timeline_and_no_slot() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    // This agent trusts another key only.
    let agent = h.run_trusting(
        Tower::new("traffic")
            .cluster("prod-1")
            .operation("drain-cluster", drain_handler(ledger.clone(), "a"))
            .config(h.config("a")),
        KeyPair::generate().public().clone(),
    );
    let command = drain(&h);
    h.publish(&command).await;
    let note = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let records = h.events(&command.command_id).await;
            if let Some(note) = records.iter().find_map(|r| rct_bus::refusal_note(&r.event)) {
                assert!(!note.dropped, "a key not trusted yet is retried: {note:?}");
                return (note.reason.to_owned(), records);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a refusal note on the command's timeline");
    let (note, _) = note;
    assert!(note.contains("does not trust"), "{note}");
    // Retried: after a later delivery too, no slot is taken and nothing runs.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        h.js.get_consumer_from_stream("tower-traffic@prod-1", "RCT_CMD")
            .await
            .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while consumer.info().await.unwrap().delivered.consumer_sequence < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the refused copy is delivered again");
    let records = h.events(&command.command_id).await;
    assert!(
        records.iter().all(|r| !r.kind.is_single_slot()),
        "no decision, claim or outcome under its id: {records:#?}"
    );
    assert_eq!(ledger.executions(&command.command_id), 0);
    agent.stop().await;
}

/// Users for a server where the agent may do everything except read the event stream's
/// slots (`STREAM.MSG.GET` on `RCT_EVT`): its claims land, but it never learns whether an
/// outcome came first. The harness connects without credentials, as `admin`.
const AGENT_CANNOT_READ_SLOTS: &str = r#"
authorization {
  users = [
    { user: admin, password: admin }
    { user: agent, password: agent, permissions: {
        publish: { allow: ">", deny: "$JS.API.STREAM.MSG.GET.RCT_EVT" }
        subscribe: ">"
    } }
  ]
}
no_auth_user: admin
"#;

/// A drain claimed by an agent that cannot read the slots (user `agent`, which
/// `AGENT_CANNOT_READ_SLOTS` restricts) and waits `shutdown_grace` for its commands when
/// stopped.
struct Unread {
    h: Harness,
    ledger: Ledger,
    /// The agent's instance name.
    instance: String,
    shutdown: tokio_util::sync::CancellationToken,
    agent: tokio::task::JoinHandle<Result<(), rct_agents::Error>>,
    command: proto::Command,
}

impl Unread {
    /// Starts the server and the agent, publishes the drain and waits until it is claimed.
    async fn claimed(shutdown_grace: Duration) -> Self {
        let setup = Setup {
            extra: AGENT_CANNOT_READ_SLOTS.into(),
            ..Setup::default()
        };
        let h = Harness::start_with(setup, example_catalog()).await;
        let ledger = Ledger::default();
        let client =
            async_nats::ConnectOptions::with_user_and_password("agent".into(), "agent".into())
                .connect(h.server.url())
                .await
                .unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let tower = Tower::new("traffic")
            .cluster("prod-1")
            .operation("drain-cluster", drain_handler(ledger.clone(), "a"))
            .config(rct_agents::Config {
                shutdown_grace,
                ..h.config("a")
            })
            .trust(h.admission.public().clone());
        let agent = tokio::spawn(tower.run(client, shutdown.clone()));
        let instance = h.present("traffic", 1).await.remove(0).instance;
        let command = drain(&h);
        h.publish(&command).await;
        let tower = TowerName::new("traffic").unwrap();
        let id = command.command_id.parse().unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            let prod1 = rct_bus::Target::new("prod-1").unwrap();
            while rct_streams::journal::slot(&h.js, &tower, &prod1, id, EventKind::Claim)
                .await
                .unwrap()
                .is_none()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the agent claims the command");
        Self {
            h,
            ledger,
            instance,
            shutdown,
            agent,
            command,
        }
    }

    fn executions(&self) -> usize {
        self.ledger.executions(&self.command.command_id)
    }

    /// Stops the agent and waits until it has.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), &mut self.agent)
            .await
            .expect("the agent stops")
            .unwrap()
            .unwrap();
    }
}

/// An agent claims a command and cannot read its outcome slot for a while (a server
/// paused or failing over right after the claim): the delivery that claimed it keeps it,
/// reads again, and runs it once it can. Before, it handed the delivery back, and the copies
/// went to agents that could only find the claim held, while the claim's holder waited.
#[tokio::test]
async fn a_claim_whose_outcome_slot_cannot_be_read_yet_is_run_by_the_same_delivery() {
    let mut u = Unread::claimed(Duration::from_secs(30)).await;
    // At least one read refused, then the slots are readable again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(u.executions(), 0, "run without its slot read");
    u.h.server.reconfigure(Setup::default()).await;

    let records = u.h.finished(&u.command.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Succeeded(_)),
        "{records:#?}"
    );
    assert_eq!(u.executions(), 1);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        u.h.js
            .get_consumer_from_stream("tower-traffic@prod-1", "RCT_CMD")
            .await
            .unwrap();
    assert_eq!(
        consumer.info().await.unwrap().delivered.consumer_sequence,
        1,
        "the command was handed back and delivered again"
    );
    u.stop().await;
}

/// The agent claims a command, then cannot read its outcome slot (as when the server
/// pauses or fails over right after the claim), and is stopped gracefully before it could.
/// The claim is this instance's and nothing ran, so the stop ends it `not_run`, saying why.
/// Before, the stop left the claim with no outcome; the next agent took its holder for gone
/// and recorded `Unknown` for a command that never ran.
#[tokio::test]
async fn a_claim_never_started_is_ended_not_run_when_its_agent_stops() {
    let mut u = Unread::claimed(Duration::from_secs(3)).await;
    u.stop().await;
    let records = u.h.events(&u.command.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("not ended as not run: {records:#?}");
    };
    assert_eq!(failed.code, "not_run", "{failed:?}");
    assert!(
        failed.message.contains(&u.instance) && failed.message.contains("not run"),
        "the outcome says who held it and that it did not run: {failed:?}"
    );
    assert_eq!(kinds(&records, EventKind::Outcome), 1);
    assert_eq!(u.executions(), 0, "never run");
}

/// As above, but the slots become readable again after the stop was asked for: the agent
/// starts nothing once it is stopping (its presence is about to go, and a handler cut short
/// by the exit would end `Unknown`), so the stop ends the claim `not_run`.
#[tokio::test]
async fn a_claim_is_not_started_once_its_agent_is_stopping() {
    let mut u = Unread::claimed(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    u.shutdown.cancel();
    u.h.server.reconfigure(Setup::default()).await;
    u.stop().await;
    let records = u.h.events(&u.command.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Failed(f) if f.code == "not_run"),
        "{records:#?}"
    );
    assert_eq!(u.executions(), 0, "started while stopping");
}
