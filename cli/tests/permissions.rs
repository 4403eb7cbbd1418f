//! Least privilege, enforced by NATS: a server running the shipped `ops/nats/accounts.conf`.
//! Every identity does its whole job without one refusal, and every attempt outside its job
//! is refused by the server and changes nothing.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::Hub;
use tokio_util::sync::CancellationToken;

/// Runs blocking `rct` calls off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_does_its_job_within_its_permissions() {
    let hub = Hub::start().await;
    let shutdown = CancellationToken::new();
    let operator = hub.running(&shutdown).await;
    let (url, posts) = support::webhook();
    hub.notifier(&url, &shutdown).await;

    // Each call fails with the server's refusals, when there are any.
    let rct = |args: &'static [&'static str]| {
        let op = operator.clone();
        async move { blocking(move || op.rct(args)).await }
    };
    let checked = |out: std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}\n{text}\nrefusals:\n{}",
            String::from_utf8_lossy(&out.stderr),
            hub.violations().join("\n")
        );
        text
    };
    let op = operator.clone();
    let drained = checked(blocking(move || op.fire_drain("prod-1", &[], &[])).await);
    assert!(
        drained.contains("succeeded") && drained.contains("prod-1 drained"),
        "{drained}"
    );
    let id = drained.split_whitespace().next().unwrap().to_owned();
    let history = checked(rct(&["history"]).await);
    let agents = checked(rct(&["agents"]).await);
    // The drain took its lock (admission's writes), and operators may list the locks.
    let locks = checked(rct(&["locks", "--output", "json"]).await);
    assert!(locks.trim().is_empty(), "the drain ended, yet: {locks}");
    let op = operator.clone();
    let status = checked(
        blocking({
            let id = id.clone();
            move || op.rct(&["status", &id])
        })
        .await,
    );
    assert!(history.contains(&id), "{history}");
    assert!(status.contains("succeeded"), "{status}");
    assert!(agents.contains("prod-1"), "{agents}");

    // The notifier, on its own identity, posted the drain's start and outcome.
    let deadline = Instant::now() + Duration::from_secs(60);
    while posts
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.contains(&id))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the notifier did not post the drain: {:?}",
            posts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent's reads that only happen at the edges (a redelivery, a catalog that changed
    // since admission): the journal and a holder's presence from the stream leader, and an
    // earlier catalog revision.
    let agent = hub.connection(AGENT.0, AGENT.1);
    let js = agent.jetstream(agent.connect("agent", true).await.unwrap());
    let tower = rct_bus::Tower::new("traffic").unwrap();
    let prod1 = rct_bus::Target::new("prod-1").unwrap();
    let look = rct_streams::journal::look(&js, &tower, &prod1, id.parse().unwrap())
        .await
        .unwrap();
    assert!(look.outcome.is_some(), "{look:?}");
    let holder = look.holder().unwrap().to_owned();
    let key = rct_bus::presence::key("traffic", "prod-1", &holder);
    assert!(rct_streams::journal::present(&js, &key).await.unwrap());
    let catalog = js.get_key_value("rct_catalog").await.unwrap();
    assert!(
        catalog
            .entry_for_revision("catalog", 1)
            .await
            .unwrap()
            .is_some()
    );

    shutdown.cancel();
    let violations = hub.violations();
    assert!(
        violations.is_empty(),
        "refused while doing their jobs:\n{}",
        violations.join("\n")
    );
}

/// One attempt outside an identity's job.
struct Case {
    who: &'static str,
    inbox: &'static str,
    what: &'static str,
    attempt: Attempt,
}

enum Attempt {
    /// A publish: a message, an event, or a JetStream API call.
    Publish(&'static str),
    /// A subscription.
    Subscribe(&'static str),
}

const OPERATOR: (&str, &str) = ("operator", "_INBOX_rct");
const AGENT: (&str, &str) = ("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
const ADMISSION: (&str, &str) = ("admission", "_INBOX_admission");
const NOTIFIER: (&str, &str) = ("notifier", "_INBOX_notifier");
/// The hub-side identity of prod-1's leaf node, connecting as a client: what it may publish is
/// what may flow from the leaf into the hub.
const LEAF: (&str, &str) = ("leaf_prod1", "_INBOX_agent.traffic.prod-1");

fn case(id: (&'static str, &'static str), what: &'static str, attempt: Attempt) -> Case {
    Case {
        who: id.0,
        inbox: id.1,
        what,
        attempt,
    }
}

fn cases() -> Vec<Case> {
    use Attempt::{Publish, Subscribe};
    vec![
        case(
            OPERATOR,
            "publish a command",
            Publish("rct.cmd.traffic.prod-1.drain-cluster"),
        ),
        case(
            OPERATOR,
            "publish an event",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.outcome"),
        ),
        case(
            OPERATOR,
            "delete the audit stream",
            Publish("$JS.API.STREAM.DELETE.RCT_EVT"),
        ),
        case(
            OPERATOR,
            "purge the audit stream",
            Publish("$JS.API.STREAM.PURGE.RCT_EVT"),
        ),
        case(
            OPERATOR,
            "delete an audit event",
            Publish("$JS.API.STREAM.MSG.DELETE.RCT_EVT"),
        ),
        case(
            OPERATOR,
            "pull admission's submissions",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_SUBMIT.admission"),
        ),
        case(
            OPERATOR,
            "pull a tower's commands",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-traffic@prod-1"),
        ),
        case(
            OPERATOR,
            "pull the notifier's events",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_EVT.notifier"),
        ),
        case(
            OPERATOR,
            "create a consumer on commands",
            Publish("$JS.API.CONSUMER.CREATE.RCT_CMD.x.rct.cmd.>"),
        ),
        case(
            OPERATOR,
            "read commands through a consumer",
            Publish("$JS.API.CONSUMER.CREATE.RCT_CMD"),
        ),
        case(
            OPERATOR,
            "write the catalog",
            Publish("$KV.rct_catalog.catalog"),
        ),
        case(
            OPERATOR,
            "take a lock",
            Publish("$KV.rct_locks.lock.prod-1"),
        ),
        case(
            AGENT,
            "release a lock",
            Publish("$KV.rct_locks.lock.prod-1"),
        ),
        case(
            OPERATOR,
            "announce a fake agent",
            Publish("$KV.rct_agents.traffic.prod-1.fake"),
        ),
        case(
            OPERATOR,
            "read admission's replies",
            Subscribe("_INBOX_admission.>"),
        ),
        case(OPERATOR, "sniff commands", Subscribe("rct.cmd.>")),
        // A push consumer's deliver subject is not checked against its creator's permissions
        // (nats-server#8274): a consumer could copy events onto any subject.
        case(
            OPERATOR,
            "create a consumer on the audit stream",
            Publish("$JS.API.CONSUMER.CREATE.RCT_EVT"),
        ),
        case(
            OPERATOR,
            "create a named consumer on the audit stream",
            Publish("$JS.API.CONSUMER.CREATE.RCT_EVT.x.rct.evt.>"),
        ),
        case(
            OPERATOR,
            "create a durable consumer on the audit stream",
            Publish("$JS.API.CONSUMER.DURABLE.CREATE.RCT_EVT.x"),
        ),
        case(
            OPERATOR,
            "create a consumer on the agent list",
            Publish("$JS.API.CONSUMER.CREATE.KV_rct_agents"),
        ),
        case(
            OPERATOR,
            "ask the development issuer for a token",
            Publish("rct.auth.dev-token"),
        ),
        case(
            ADMISSION,
            "serve the development issuer",
            Subscribe("rct.auth.dev-token"),
        ),
        case(
            AGENT,
            "pull another target's commands",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-traffic@prod-2"),
        ),
        case(
            AGENT,
            "pull another tower's commands",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-workloads"),
        ),
        case(
            AGENT,
            "acknowledge another target's command",
            Publish("$JS.ACK.RCT_CMD.tower-traffic@prod-2.1.1.1.0.0"),
        ),
        case(
            AGENT,
            "publish another tower's events",
            Publish("rct.evt.workloads._.01J00000000000000000000000.outcome"),
        ),
        case(
            AGENT,
            "claim another target's command",
            Publish("rct.evt.traffic.prod-2.01J00000000000000000000000.claim"),
        ),
        case(
            AGENT,
            "record another target's outcome",
            Publish("rct.evt.traffic.prod-2.01J00000000000000000000000.outcome"),
        ),
        case(
            AGENT,
            "log on another target's command",
            Publish("rct.evt.traffic.prod-2.01J00000000000000000000000.log"),
        ),
        case(
            AGENT,
            "record a decision",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.decision"),
        ),
        case(
            AGENT,
            "ask to cancel a command",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.cancel"),
        ),
        case(
            AGENT,
            "record an approval",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.approval"),
        ),
        case(
            AGENT,
            "write an event of another shape",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.claim.x"),
        ),
        case(
            AGENT,
            "forge a command",
            Publish("rct.cmd.traffic.prod-1.drain-cluster"),
        ),
        case(
            AGENT,
            "submit as an operator",
            Publish("rct.submit.traffic.drain-cluster"),
        ),
        case(
            AGENT,
            "heartbeat as another target",
            Publish("$KV.rct_agents.traffic.prod-2.x"),
        ),
        case(
            AGENT,
            "read another agent's replies",
            Subscribe("_INBOX_agent.traffic.prod-2.>"),
        ),
        case(
            AGENT,
            "delete the command stream",
            Publish("$JS.API.STREAM.DELETE.RCT_CMD"),
        ),
        case(
            AGENT,
            "read other towers' commands through a consumer",
            Publish("$JS.API.CONSUMER.CREATE.RCT_CMD"),
        ),
        case(
            AGENT,
            "create its own consumer",
            Publish("$JS.API.CONSUMER.CREATE.RCT_CMD.x.rct.cmd.>"),
        ),
        case(
            AGENT,
            "create a consumer on the audit stream",
            Publish("$JS.API.CONSUMER.CREATE.RCT_EVT"),
        ),
        case(
            AGENT,
            "hear another target's events",
            Subscribe("rct.evt.traffic.prod-2.*.cancel"),
        ),
        case(
            LEAF,
            "record a decision",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.decision"),
        ),
        case(
            LEAF,
            "ask to cancel a command",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.cancel"),
        ),
        case(
            LEAF,
            "record an approval",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.approval"),
        ),
        case(
            LEAF,
            "claim another target's command",
            Publish("rct.evt.traffic.prod-2.01J00000000000000000000000.claim"),
        ),
        case(
            LEAF,
            "write an event of another shape",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.claim.x"),
        ),
        case(
            ADMISSION,
            "delete the audit stream",
            Publish("$JS.API.STREAM.DELETE.RCT_EVT"),
        ),
        case(
            ADMISSION,
            "purge the submissions",
            Publish("$JS.API.STREAM.PURGE.RCT_SUBMIT"),
        ),
        case(
            ADMISSION,
            "delete an audit event",
            Publish("$JS.API.STREAM.MSG.DELETE.RCT_EVT"),
        ),
        case(
            ADMISSION,
            "pull a tower's commands",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-traffic@prod-1"),
        ),
        case(
            ADMISSION,
            "submit as an operator",
            Publish("rct.submit.traffic.drain-cluster"),
        ),
        case(
            NOTIFIER,
            "publish an event",
            Publish("rct.evt.traffic.prod-1.01J00000000000000000000000.outcome"),
        ),
        case(
            NOTIFIER,
            "publish a command",
            Publish("rct.cmd.traffic.prod-1.drain-cluster"),
        ),
        case(
            NOTIFIER,
            "pull admission's submissions",
            Publish("$JS.API.CONSUMER.MSG.NEXT.RCT_SUBMIT.admission"),
        ),
        // Enrolment: the subject an agent enrols on is what admission certifies its key for,
        // so no one may enrol on another's.
        case(
            AGENT,
            "enrol as another target's agent",
            Publish("rct.auth.enrol.traffic.prod-2"),
        ),
        case(
            AGENT,
            "enrol as another tower's agent",
            Publish("rct.auth.enrol.workloads._"),
        ),
        case(
            LEAF,
            "enrol as another target's agent",
            Publish("rct.auth.enrol.traffic.prod-2"),
        ),
        case(
            OPERATOR,
            "enrol as an agent",
            Publish("rct.auth.enrol.traffic.prod-1"),
        ),
        case(
            NOTIFIER,
            "enrol as an agent",
            Publish("rct.auth.enrol.traffic.prod-1"),
        ),
        case(
            AGENT,
            "answer enrolments in admission's place",
            Subscribe("rct.auth.enrol.>"),
        ),
    ]
}

/// Connects as `who`, makes the attempt, and waits for the server's refusal; the refusal
/// text, or `None` when none came within the wait.
async fn attempt(hub: &Hub, case: &Case) -> Option<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let seed = std::fs::read_to_string(&hub.id(case.who).seed_file).unwrap();
    let client = async_nats::ConnectOptions::with_nkey(seed)
        .custom_inbox_prefix(case.inbox)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(hub.server.url())
        .await
        .unwrap();
    let _subscription = match case.attempt {
        Attempt::Publish(subject) => {
            client
                .publish_with_reply(subject, client.new_inbox(), "{}".into())
                .await
                .unwrap();
            None
        }
        Attempt::Subscribe(subject) => Some(client.subscribe(subject).await.unwrap()),
    };
    client.flush().await.unwrap();
    // The refusal of this attempt: it names the subject (another refusal, say of the
    // client's own inbox, would not do).
    let subject = match case.attempt {
        Attempt::Publish(subject) | Attempt::Subscribe(subject) => subject,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(error)) = tokio::time::timeout_at(deadline.into(), rx.recv()).await {
        if error.contains("Permissions Violation") && error.contains(subject) {
            return Some(error);
        }
    }
    None
}

#[tokio::test]
async fn what_is_outside_an_identitys_job_is_refused_and_changes_nothing() {
    let hub = Hub::start().await;
    hub.provision().await;
    let admin = hub.connection("admin", "_INBOX_admin");
    let js = admin.jetstream(admin.connect("admin", false).await.unwrap());

    let mut table = String::from("| identity | attempt | refused by NATS |\n|---|---|---|\n");
    let mut allowed = Vec::new();
    for case in cases() {
        let refusal = attempt(&hub, &case).await;
        table.push_str(&format!(
            "| {} | {} | {} |\n",
            case.who,
            case.what,
            if refusal.is_some() { "yes" } else { "NO" }
        ));
        if refusal.is_none() {
            allowed.push(format!("{}: {}", case.who, case.what));
        }
    }
    eprintln!("{table}");
    assert!(
        allowed.is_empty(),
        "not refused:\n{}\n{table}",
        allowed.join("\n")
    );

    // Nothing got through: the streams are there and empty, no agent was announced.
    for stream in ["RCT_SUBMIT", "RCT_CMD", "RCT_EVT"] {
        let mut stream = js.get_stream(stream).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(
            info.state.messages,
            0,
            "{stream:?}",
            stream = info.config.name
        );
    }
    let agents = js.get_key_value("rct_agents").await.unwrap();
    assert_eq!(agents.keys().await.unwrap().count().await, 0);
    let catalog = js.get_key_value("rct_catalog").await.unwrap();
    assert!(catalog.get("catalog").await.unwrap().is_none());
}

/// Each agent block of the shipped permissions grants exactly the event subjects an agent of
/// its tower and target writes ([`rct_bus::subject::agent_event_grants`]): no decision, no
/// cancel request, no other target.
#[test]
fn each_agent_may_write_only_its_own_targets_agent_events() {
    let accounts = std::fs::read_to_string(support::ops().join("nats/accounts.conf")).unwrap();
    let events = |block: &str, list: &str| -> Vec<String> {
        let start = accounts.find(&format!("{block}: {{")).unwrap();
        let end = start + accounts[start..].find("\n}\n").unwrap();
        let part = &accounts[start..end];
        let from = part.find(&format!("{list}: [")).unwrap();
        let to = from + part[from..].find(']').unwrap();
        part[from..to]
            .lines()
            .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
            .filter(|l| l.starts_with("rct.evt."))
            .map(str::to_owned)
            .collect()
    };
    for (block, tower, target) in [
        ("PERMS_AGENT_TRAFFIC_PROD1", "traffic", "prod-1"),
        ("PERMS_AGENT_TRAFFIC_PROD2", "traffic", "prod-2"),
        ("PERMS_AGENT_WORKLOADS", "workloads", "_"),
    ] {
        let wanted =
            rct_bus::subject::agent_event_grants(&tower.parse().unwrap(), &target.parse().unwrap());
        assert_eq!(events(block, "allow"), wanted, "{block}");
    }
    // The leaf's, on the hub, as its target's events less every kind agents do not write,
    // and every other shape (see the comment in accounts.conf).
    assert_eq!(
        events("PERMS_LEAF_PROD1", "allow"),
        ["rct.evt.traffic.prod-1.>"]
    );
    let mut denied: Vec<String> = rct_bus::EventKind::ALL
        .into_iter()
        .filter(|k| !k.is_written_by_agents())
        .map(|k| format!("rct.evt.traffic.prod-1.*.{k}"))
        .collect();
    denied.push("rct.evt.traffic.prod-1.*.*.>".into());
    assert_eq!(events("PERMS_LEAF_PROD1", "deny"), denied);
}

/// The agent of prod-2, on its own identity, writes what its grants allow under the id of a
/// prod-1 command before prod-1's agent comes: a claim and a failed outcome, at its own
/// target. They are stored (its target is its own), yet they are not the command's: the prod-1
/// agent claims and runs it, `rct status` says succeeded, and `rct show` marks the two as
/// UNVERIFIED. Before the target was in the event subject, they took the command's own slots:
/// the command never ran and was recorded failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_targets_agent_cannot_claim_or_end_a_command() {
    use prost::Message as _;
    use rct_bus::proto::{self, event::Kind};
    let (hub, shutdown, key, posts, operator) = notified_hub().await;
    let id = fire_detached(&operator, "prod-1").await;

    // prod-2's agent learns the id from the audit stream, which it may read.
    let rival = hub.connection("agent_traffic_prod2", "_INBOX_agent.traffic.prod-2");
    let js = rival.jetstream(rival.connect("agent", true).await.unwrap());
    let publisher = rct_streams::Publisher::new(js.clone());
    let tower = rct_bus::Tower::new("traffic").unwrap();
    let any = rct_bus::subject::events_of_kind(id, rct_bus::EventKind::Decision);
    let decision = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let stream = js.get_stream_no_info("RCT_EVT").await.unwrap();
            if let Ok(stored) = stream.get_last_raw_message_by_subject(&any).await {
                return proto::Event::decode(stored.payload).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no decision");
    assert_eq!(decision.target, "prod-1");
    let forged = |kind| proto::Event {
        source: "agent/traffic/prod-2/rival".into(),
        target: "prod-2".into(),
        kind: Some(kind),
        ..decision.clone()
    };
    for event in [
        forged(Kind::Started(proto::Started {
            agent: "rival".into(),
            target: "prod-2".into(),
            ..Default::default()
        })),
        forged(Kind::Failed(proto::Failed {
            code: "forged".into(),
            message: "prod-2 says it failed".into(),
            ..Default::default()
        })),
    ] {
        let written = publisher.event(&tower, &event, "rival").await.unwrap();
        assert!(
            matches!(written, rct_streams::Slot::Written(_)),
            "{written:?}"
        );
    }

    // prod-1's agent comes and runs it.
    let agent = hub.connection(AGENT.0, AGENT.1);
    hub.traffic_agent("prod-1", agent, key, &shutdown).await;
    let about = |verb: &'static str| {
        let op = operator.clone();
        let id = id.to_string();
        blocking(move || op.rct(&[verb, &id]))
    };
    let watched = about("watch").await;
    assert!(watched.status.success(), "{watched:?}");
    let status = String::from_utf8_lossy(&about("status").await.stdout).into_owned();
    assert!(status.contains("succeeded"), "{status}");
    let shown = String::from_utf8_lossy(&about("show").await.stdout).into_owned();
    assert!(shown.contains("prod-1 drained"), "{shown}");
    assert_eq!(
        shown
            .matches("UNVERIFIED: at traffic prod-2, ignored")
            .count(),
        2,
        "{shown}"
    );
    // The notifier tells the channel what happened on prod-1, and nothing prod-2 wrote.
    let posted = succeeded_posted(&posts, id).await;
    assert!(
        !posted
            .iter()
            .any(|p| p.contains("prod-2 says it failed") || p.contains("agent rival")),
        "{posted:?}"
    );
    shutdown.cancel();
}

/// Events under a command's id that its entitled writer did not sign, written by the
/// break-glass `admin` identity (which NATS lets write anything, as anyone restoring a
/// backup or editing the stream could): an unsigned cancel request and one signed by a key
/// that is not admission's, for a command running on prod-1, and an unsigned failed outcome
/// for a command no agent has taken. None is obeyed or counted: the agent runs the first to
/// success, the second stays admitted, `rct show` marks each forged event UNVERIFIED with why,
/// `rct watch` ignores them, and the notifier tells no channel about the forged outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_their_entitled_writer_did_not_sign_are_unverified_and_never_obeyed() {
    use rct_bus::proto::{self, event::Kind};
    let (hub, shutdown, key, posts, operator) = notified_hub().await;
    let (running, waiting) = (
        fire_detached(&operator, "prod-1").await,
        fire_detached(&operator, "prod-2").await,
    );

    let admin = hub.connection("admin", "_INBOX_admin");
    let js = admin.jetstream(admin.connect("admin", false).await.unwrap());
    let unsigned = rct_streams::Publisher::new(js.clone());
    let impostor = unsigned.signing(Arc::new(rct_bus::provenance::Signer::admission(
        rct_bus::KeyPair::generate(),
    )));
    let tower = rct_bus::Tower::new("traffic").unwrap();
    let event = |id: rct_bus::CommandId, target: &str, kind| proto::Event {
        command_id: id.to_string(),
        at: Some(rct_streams::timestamp::from_datetime(
            time::OffsetDateTime::now_utc(),
        )),
        source: "admission/forged".into(),
        operation: "traffic/drain-cluster".into(),
        target: target.into(),
        kind: Some(kind),
    };
    let cancel = || {
        Kind::CancelRequested(proto::CancelRequested {
            by: Some(proto::Operator {
                subject: "mallory".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    for (publisher, n) in [(&unsigned, "forged-1"), (&impostor, "forged-2")] {
        let written = publisher
            .event(&tower, &event(running, "prod-1", cancel()), n)
            .await
            .unwrap();
        assert!(
            matches!(written, rct_streams::Slot::Written(_)),
            "{written:?}"
        );
    }
    let failed = Kind::Failed(proto::Failed {
        code: "forged".into(),
        message: "mallory says it failed".into(),
        ..Default::default()
    });
    let written = unsigned
        .event(&tower, &event(waiting, "prod-2", failed), 0)
        .await
        .unwrap();
    assert!(
        matches!(written, rct_streams::Slot::Written(_)),
        "{written:?}"
    );

    // prod-1's agent runs its command long enough to look for cancel requests, and stops
    // at once when it is told to.
    let agent = hub.connection(AGENT.0, AGENT.1);
    let client = agent.connect("agent", true).await.unwrap();
    let tower = rct_agents::Tower::new("traffic")
        .cluster("prod-1")
        .operation("drain-cluster", |ctx, _params| async move {
            for step in 1..=4u32 {
                ctx.progress(step * 25, format!("step {step}"), "moving traffic");
                tokio::select! {
                    _ = ctx.cancelled() => {
                        return Err(rct_agents::Failure::new("stopped", "told to stop"));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            Ok(rct_agents::Outcome::new("prod-1 drained"))
        })
        .trust(key)
        .config(rct_agents::Config {
            nats: agent,
            instance: "agent-prod-1".into(),
            heartbeat: Duration::from_secs(1),
            ..rct_agents::Config::default()
        });
    let stop = shutdown.clone();
    tokio::spawn(async move { tower.run(client, stop).await.unwrap() });

    let about = |verb: &'static str, id: rct_bus::CommandId| {
        let op = operator.clone();
        blocking(move || op.rct(&[verb, &id.to_string()]))
    };
    let watched = about("watch", running).await;
    let said = String::from_utf8_lossy(&watched.stderr).into_owned();
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(
        said.matches("UNVERIFIED: a cancel event").count(),
        2,
        "{said}"
    );
    let shown = String::from_utf8_lossy(&about("show", running).await.stdout).into_owned();
    assert!(shown.contains("prod-1 drained"), "{shown}");
    assert_eq!(
        shown
            .matches("UNVERIFIED: it is not signed, ignored")
            .count(),
        1,
        "{shown}"
    );
    assert_eq!(
        shown.matches("which is not admission's").count(),
        1,
        "{shown}"
    );
    // Only the forged ones: admission's decision and the agent's claim, progress and outcome
    // verify.
    assert_eq!(shown.matches("UNVERIFIED:").count(), 2, "{shown}");

    let status = String::from_utf8_lossy(&about("status", waiting).await.stdout).into_owned();
    assert!(!status.contains("failed"), "{status}");
    let shown = String::from_utf8_lossy(&about("show", waiting).await.stdout).into_owned();
    assert!(
        shown.contains("UNVERIFIED: it is not signed, ignored"),
        "{shown}"
    );
    let history = blocking({
        let op = operator.clone();
        move || op.rct(&["history", "--since", "10m"])
    })
    .await;
    let rows = String::from_utf8_lossy(&history.stdout).into_owned();
    let row = rows
        .lines()
        .find(|l| l.contains(&waiting.to_string()))
        .unwrap_or_else(|| panic!("{waiting} not in {rows}"));
    assert!(
        !row.contains("failed") && row.contains("UNVERIFIED"),
        "{row}"
    );

    // The notifier told of the real outcome, never of the forged one.
    let posted = succeeded_posted(&posts, running).await;
    assert!(!posted.iter().any(|p| p.contains("mallory")), "{posted:?}");
    shutdown.cancel();
}

/// Waits (a minute at most) until the webhook got the `Succeeded` post of `id`; every post
/// so far.
async fn succeeded_posted(
    posts: &std::sync::Mutex<Vec<String>>,
    id: rct_bus::CommandId,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let posted = posts.lock().unwrap().clone();
        if posted
            .iter()
            .any(|p| p.contains("Succeeded") && p.contains(&id.to_string()))
        {
            return posted;
        }
        assert!(Instant::now() < deadline, "{posted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hub on its identities with admission deciding, the notifier posting to a webhook, and
/// alice logged in: the hub, what stops them, admission's key, the posts, the operator.
async fn notified_hub() -> (
    Hub,
    CancellationToken,
    rct_bus::PublicKey,
    Arc<std::sync::Mutex<Vec<String>>>,
    Arc<support::Operator>,
) {
    let hub = Hub::start().await;
    hub.provision().await;
    let shutdown = CancellationToken::new();
    let key = hub.admission(&shutdown).await;
    let (url, posts) = support::webhook();
    hub.notifier(&url, &shutdown).await;
    let operator = Arc::new(hub.operator());
    let op = operator.clone();
    blocking(move || op.login()).await;
    (hub, shutdown, key, posts, operator)
}

/// Fires a drain of `cluster` without watching it: its command id.
async fn fire_detached(
    operator: &Arc<support::Operator>,
    cluster: &'static str,
) -> rct_bus::CommandId {
    let op = operator.clone();
    let fired = blocking(move || op.fire_drain(cluster, &["--detach"], &[])).await;
    assert!(fired.status.success(), "{fired:?}");
    let stdout = String::from_utf8_lossy(&fired.stdout).into_owned();
    stdout
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no command id in {stdout:?}"))
}
