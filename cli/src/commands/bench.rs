//! `rct bench`: what rct costs on top of NATS, measured as ratios against bare-JetStream
//! floors in one run, on one machine. Starts its own nats-server and components.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use prost::Message as _;
use rct_agents::{Context, Outcome, Params, Tower};
use rct_bus::proto;
use rct_bus::{CommandId, EventKind, KeyPair, OperationName, Subject};
use rct_streams::replay::{self, Filter, Item};
use rct_streams::timestamp::from_datetime;
use rct_streams::{Outgoing, Publisher};
use time::OffsetDateTime;

use crate::commands::login;
use crate::exit::{Error, Exit, Result};
use crate::session::Session;
use crate::stack::Stack;

/// Measure rct against the bare-JetStream floor and print a markdown table.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Small sizes, for a smoke test (under a minute).
    #[arg(long)]
    pub quick: bool,
    /// Only these scenarios (repeatable): latency, throughput, replay, fanout, footprint,
    /// cluster, verify.
    #[arg(long = "scenario", value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Latency: operations, one after the other.
    #[arg(long)]
    pub operations: Option<usize>,
    /// Throughput: submissions in all.
    #[arg(long)]
    pub submissions: Option<usize>,
    /// Throughput: concurrent submitters.
    #[arg(long, default_value_t = 8)]
    pub submitters: usize,
    /// Replay: events, largest size (the table also has a tenth of it).
    #[arg(long)]
    pub events: Option<usize>,
    /// Fan-out: cluster agents (one target each).
    #[arg(long)]
    pub agents: Option<usize>,
    /// Fan-out: agents as separate `rct-agent` processes (one target each), as a deployment
    /// runs them.
    #[arg(long)]
    pub agent_processes: Option<usize>,
    /// Evaluate every row's target and exit 1 when one is missed (each miss said).
    #[arg(long)]
    pub check: bool,
}

/// A bench scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Submit to Started and to Succeeded, one after the other.
    Latency,
    /// Admitted decisions per second.
    Throughput,
    /// Folding the event stream into history.
    Replay,
    /// One operation to each of many cluster agents, at once and as a rollout in four
    /// waves.
    Fanout,
    /// Memory of admission and an idle agent; CLI start to PubAck.
    Footprint,
    /// Latency and throughput on three nodes with R3 streams and `sync_interval: always`.
    Cluster,
    /// Checking who wrote events, as every reader does.
    Verify,
}

/// One row of the table.
struct Row {
    scenario: String,
    rct: String,
    floor: String,
    ratio: String,
    /// The targets, as checked (`--check`) and as printed.
    checks: Vec<Check>,
}

/// A target a row must meet, with what was measured for it.
#[derive(Clone, Copy, Debug)]
enum Check {
    /// A cost: rct's figure over the floor's, at most `max`.
    RatioAtMost { ratio: f64, max: f64 },
    /// A rate: rct's figure over the floor's, at least `min`.
    RatioAtLeast { ratio: f64, min: f64 },
    /// A figure in `unit`, below `max`.
    Below {
        value: f64,
        max: f64,
        unit: &'static str,
    },
}

impl Check {
    /// The target as the table shows it.
    fn label(&self) -> String {
        match self {
            Check::RatioAtMost { max, .. } => format!("≤ {max}×"),
            Check::RatioAtLeast { min, .. } => format!("≥ {min}×"),
            Check::Below { max, unit, .. } => format!("< {max} {unit}"),
        }
    }

    /// Whether it was met.
    fn met(&self) -> bool {
        match *self {
            Check::RatioAtMost { ratio, max } => ratio.is_finite() && ratio <= max,
            Check::RatioAtLeast { ratio, min } => ratio.is_finite() && ratio >= min,
            Check::Below { value, max, .. } => value.is_finite() && value < max,
        }
    }

    /// What was measured, in the target's terms.
    fn measured(&self) -> String {
        match self {
            Check::RatioAtMost { ratio, .. } | Check::RatioAtLeast { ratio, .. } => {
                format!("{ratio:.2}×")
            }
            Check::Below { value, unit, .. } => format!("{value:.2} {unit}"),
        }
    }
}

impl Row {
    fn target(&self) -> String {
        self.checks
            .iter()
            .map(Check::label)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The rows' targets not met, one sentence each.
fn misses(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .flat_map(|row| {
            row.checks.iter().filter(|c| !c.met()).map(|c| {
                format!(
                    "{}: {} misses the target {}",
                    row.scenario,
                    c.measured(),
                    c.label()
                )
            })
        })
        .collect()
}

fn catalog(targets: usize) -> String {
    let list: Vec<String> = (0..targets.max(1)).map(target).collect();
    format!(
        "towers:\n  bench:\n    flavour: cluster\n    targets: [{}]\n\
         operations:\n  bench/noop:\n    allowed_groups: [bench]\n    params:\n      target: {{ type: target }}\n    \
         fan_out: {{ max_targets: {} }}\n",
        list.join(", "),
        targets.max(2)
    )
}

fn target(i: usize) -> String {
    format!("t-{i:03}")
}

async fn noop(_ctx: Context, _params: Params) -> std::result::Result<Outcome, rct_agents::Failure> {
    Ok(Outcome::new("nothing done"))
}

/// Runs `rct bench`.
#[allow(clippy::print_stdout)] // the table is the result
pub async fn run(args: Args) -> Result {
    let all = [
        Scenario::Latency,
        Scenario::Throughput,
        Scenario::Replay,
        Scenario::Fanout,
        Scenario::Footprint,
        Scenario::Cluster,
        Scenario::Verify,
    ];
    let args_check = args.check;
    let scenarios: Vec<Scenario> = if args.scenarios.is_empty() {
        all.to_vec()
    } else {
        args.scenarios.clone()
    };
    let quick = args.quick;
    let operations = args.operations.unwrap_or(if quick { 30 } else { 2_000 });
    let submissions = args.submissions.unwrap_or(if quick { 300 } else { 5_000 });
    let events = args
        .events
        .unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let agents = args.agents.unwrap_or(if quick { 10 } else { 200 });
    let processes = args.agent_processes.unwrap_or(if quick { 3 } else { 50 });

    let scratch = tempfile::Builder::new()
        .prefix("rct-bench-")
        .tempdir()
        .map_err(|e| Error::usage(format!("cannot make a scratch folder: {e}")))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::usage(format!("no free port: {e}")))?;
    eprintln!(
        "rct bench: starting nats-server and admission in {}",
        scratch.path().display()
    );
    let (mut stack, client) = Stack::nats(&scratch.path().join("stack"), port).await?;
    let trusted = stack.admission(&client, &catalog(agents + processes))?;
    stack.wait_for_admission(&client).await?;
    let js = async_nats::jetstream::new(client.clone());
    let token = login::dev_token(&client, "bench", &["bench".into()]).await?;
    let session = login::exchange(&client, &token).await?;

    let mut rows = Vec::new();
    for scenario in &scenarios {
        eprintln!("rct bench: {scenario:?}");
        match scenario {
            Scenario::Latency => {
                let tower = Tower::new("bench")
                    .cluster(&target(0))
                    .operation("noop", noop)
                    .trust(trusted.clone())
                    .config(stack.agent_config());
                stack.spawn(tower, &client);
                stack.wait_for_agents(&js, 1).await?;
                rows.extend(latency(&js, &session, operations).await?);
            }
            Scenario::Throughput => {
                rows.push(throughput(&js, &session, submissions, args.submitters).await?)
            }
            Scenario::Replay => {
                for n in [events / 10, events] {
                    rows.push(replay_rows(&js, n).await?);
                }
            }
            Scenario::Fanout => {
                for i in 1..agents {
                    let tower = Tower::new("bench")
                        .cluster(&target(i))
                        .operation("noop", noop)
                        .trust(trusted.clone())
                        .config(stack.agent_config());
                    stack.spawn(tower, &client);
                }
                // Target 0's agent is the latency scenario's, when it ran.
                if !scenarios.contains(&Scenario::Latency) {
                    let tower = Tower::new("bench")
                        .cluster(&target(0))
                        .operation("noop", noop)
                        .trust(trusted.clone())
                        .config(stack.agent_config());
                    stack.spawn(tower, &client);
                }
                stack.wait_for_agents(&js, agents).await?;
                rows.extend(fanout(&js, &session, 0..agents, "cluster agents").await?);
                rows.extend(rollout_rows(&js, &session, agents).await?);
                rows.extend(fanout_processes(&stack, &js, &session, agents, processes).await?);
            }
            Scenario::Footprint => rows.extend(footprint(&stack, &session).await?),
            Scenario::Verify => rows.push(verify_row(events / 10)?),
            Scenario::Cluster => rows.extend(
                cluster(
                    scratch.path(),
                    operations / 4,
                    submissions / 2,
                    args.submitters,
                )
                .await?,
            ),
        }
    }
    stack.stop().await;

    println!("| scenario | rct | bare JetStream floor | ratio | target |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.scenario,
            row.rct,
            row.floor,
            row.ratio,
            row.target()
        );
    }
    if args_check {
        let missed = misses(&rows);
        if !missed.is_empty() {
            for miss in &missed {
                eprintln!("rct bench: {miss}");
            }
            eprintln!("rct bench: {} target(s) missed", missed.len());
            return Ok(Exit::Failed);
        }
        eprintln!("rct bench: every target met");
    }
    Ok(Exit::Ok)
}

fn signed(session: &Session, target_name: &str) -> (CommandId, OperationName, Bytes) {
    signed_run(
        session,
        proto::Run {
            target: target_name.to_owned(),
            params: [(
                "target".to_owned(),
                proto::Value {
                    kind: Some(proto::value::Kind::Target(target_name.to_owned())),
                },
            )]
            .into(),
            dry_run: false,
            break_glass: String::new(),
            plan: false,
            undo_of: String::new(),
            rollout: None,
        },
    )
}

/// `run` of bench/noop as a signed submission, with its new id.
fn signed_run(session: &Session, run: proto::Run) -> (CommandId, OperationName, Bytes) {
    let id = CommandId::generate();
    let now = OffsetDateTime::now_utc();
    let submission = proto::Submission {
        command_id: id.to_string(),
        operation: "bench/noop".into(),
        justification: String::new(),
        requested_at: Some(from_datetime(now)),
        expires_at: Some(from_datetime(now + time::Duration::minutes(5))),
        client: None,
        request: Some(proto::submission::Request::Run(run)),
    };
    let envelope = session.sign(&submission);
    (
        id,
        "bench/noop".parse().expect("valid"),
        envelope.encode_to_vec().into(),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Scenario: who wrote each of `n` agent-signed progress events (the agent's certificate in
/// each), checked as readers check them (`Trust::check`); floor: bare Ed25519 verification of
/// the same signatures over the same bytes, and nothing else.
fn verify_row(n: usize) -> Result<Row> {
    use base64::Engine as _;
    use rct_bus::provenance::{Author, Provenance, Signer, Trust, certify};
    let io = |e: &dyn std::fmt::Display| Error::usage(format!("verify: {e}"));
    let admission = rct_bus::KeyPair::generate();
    let tower = rct_bus::Tower::new("bench").map_err(|e| io(&e))?;
    let place = rct_bus::Target::new(target(0)).map_err(|e| io(&e))?;
    let key = rct_bus::KeyPair::generate();
    let agent_key = key.public().clone();
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let certificate = certify(
        &admission,
        &tower,
        &place,
        "bench-a1",
        &agent_key,
        now - hour,
        now + hour,
    );
    let signer = Signer::agent(key, certificate);
    let events: Vec<(String, Vec<u8>, String)> = (0..n)
        .map(|i| {
            let id = CommandId::generate();
            let subject =
                Subject::event(&tower, &place, id, rct_bus::EventKind::Progress).to_string();
            let payload = proto::Event {
                command_id: id.to_string(),
                target: place.to_string(),
                operation: "bench/noop".into(),
                kind: Some(proto::event::Kind::Progress(proto::Progress {
                    percent: (i % 100) as u32,
                    step: "moving".into(),
                    message: "traffic".into(),
                })),
                ..proto::Event::default()
            }
            .encode_to_vec();
            let signature = signer.sign(&subject, &payload).expect("enrolled");
            (subject, payload, signature)
        })
        .collect();
    let trust = Trust::new(rct_bus::Verifier::new([admission.public().clone()]));
    let begin = Instant::now();
    for (subject, payload, signature) in &events {
        let said = trust.check(
            (&tower, &place, rct_bus::EventKind::Progress),
            subject,
            payload,
            Some(signature),
            now,
        );
        if said != Provenance::Verified(Author::Agent("bench-a1".into())) {
            return Err(io(&format!(
                "an event signed by its agent reads as {said:?}"
            )));
        }
    }
    let ours = begin.elapsed();
    // The floor: the signed bytes and signatures laid out beforehand, verified bare.
    let bare: Vec<(Vec<u8>, Vec<u8>)> = events
        .iter()
        .map(|(subject, payload, signature)| {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(signature)
                .expect("base64");
            let signature = proto::EventSignature::decode(decoded.as_slice())
                .expect("a signature")
                .signature;
            let mut message = format!("rct/v1/event\n{subject}\n").into_bytes();
            message.extend_from_slice(payload);
            (message, signature)
        })
        .collect();
    let begin = Instant::now();
    for (message, signature) in &bare {
        agent_key
            .verify_raw(message, signature)
            .map_err(|e| io(&e))?;
    }
    let floor = begin.elapsed();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    Ok(Row {
        scenario: format!("who wrote an event ({n} agent-signed events)"),
        rct: format!("{:.0} events/s ({:.2} s)", rate(ours), ours.as_secs_f64()),
        floor: format!(
            "{:.0} events/s ({:.2} s, bare Ed25519)",
            rate(floor),
            floor.as_secs_f64()
        ),
        ratio: ratio(rate(ours), rate(floor)),
        checks: vec![Check::RatioAtLeast {
            ratio: rate(ours) / rate(floor),
            min: 0.8,
        }],
    })
}

fn ratio(ours: f64, floor: f64) -> String {
    if floor > 0.0 {
        format!("{:.2}×", ours / floor)
    } else {
        "-".into()
    }
}

/// Scenario 1: submit → Started and → Succeeded, as the submitter sees them. rct's operations
/// and the floor's alternate, so whatever else the machine does weighs on both alike.
async fn latency(
    js: &async_nats::jetstream::Context,
    session: &Session,
    n: usize,
) -> Result<Vec<Row>> {
    let publisher = Publisher::new(js.clone());
    // A first operation, not counted: the floor sends its messages byte for byte.
    let (id, submission) = rct_operation(js, session, &publisher).await?.2;
    let floor = Floor::start(js, Payloads::of(js, id, submission, true).await?).await?;
    let (mut started, mut succeeded) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut floor_started, mut floor_done) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (s, d, _) = rct_operation(js, session, &publisher).await?;
        started.push(s);
        succeeded.push(d);
        let (s, d) = floor.operation(js).await?;
        floor_started.push(s);
        floor_done.push(d);
    }
    floor.stop();
    let mut rows = Vec::new();
    for (label, mut ours, mut floor) in [
        ("submit → Started", started, floor_started),
        ("submit → Succeeded", succeeded, floor_done),
    ] {
        ours.sort();
        floor.sort();
        for (p, name, max) in [
            (0.5, "p50", Some(1.5)),
            (0.99, "p99", Some(2.0)),
            (0.999, "p99.9", None),
        ] {
            let (o, f) = (percentile(&ours, p), percentile(&floor, p));
            let measured = o.as_secs_f64() / f.as_secs_f64();
            rows.push(Row {
                scenario: format!("latency {label} {name} (n={n})"),
                rct: ms(o),
                floor: ms(f),
                ratio: ratio(o.as_secs_f64(), f.as_secs_f64()),
                checks: max
                    .map(|max| Check::RatioAtMost {
                        ratio: measured,
                        max,
                    })
                    .into_iter()
                    .collect(),
            });
        }
    }
    Ok(rows)
}

/// One operation through rct: until the submitter sees `Started`, and `Succeeded`.
async fn rct_operation(
    js: &async_nats::jetstream::Context,
    session: &Session,
    publisher: &Publisher,
) -> Result<(Duration, Duration, (CommandId, Bytes))> {
    let (id, name, bytes) = signed(session, &target(0));
    let begin = Instant::now();
    publisher
        .send(Outgoing::new(
            Subject::submit(&name),
            id.msg_id(),
            bytes.clone(),
        ))
        .await
        .map_err(|e| Error::usage(e.to_string()))?;
    let mut events = replay::follow(js, &Filter::command(id))
        .await
        .map_err(|e| Error::usage(e.to_string()))?;
    let mut started = Duration::ZERO;
    loop {
        let item = tokio::time::timeout(WAIT, events.next())
            .await
            .map_err(|_| Error::usage(format!("no outcome for {id} within {WAIT:?}")))?;
        let Some(item) = item else { break };
        if let Ok(Item::Event(record)) = item {
            match record.kind {
                EventKind::Claim => started = begin.elapsed(),
                EventKind::Outcome => return Ok((started, begin.elapsed(), (id, bytes))),
                EventKind::Decision
                    if matches!(record.event.kind, Some(proto::event::Kind::Rejected(_))) =>
                {
                    return Err(Error::usage(format!(
                        "bench submission rejected: {:?}",
                        record.event.kind
                    )));
                }
                _ => {}
            }
        }
    }
    Err(Error::usage("the event stream ended"))
}

/// What rct writes per operation, taken from one that ran: the floor sends the same bytes.
#[derive(Clone)]
struct Payloads {
    submission: Bytes,
    decision: Bytes,
    command: Bytes,
    claim: Bytes,
    outcome: Bytes,
}

impl Payloads {
    /// The messages of command `id`, admitted (and, when `ran`, run) on `target(0)`; the
    /// claim and outcome of a command that did not run are left empty.
    async fn of(
        js: &async_nats::jetstream::Context,
        id: CommandId,
        submission: Bytes,
        ran: bool,
    ) -> Result<Self> {
        let io = |e: &dyn std::fmt::Display| Error::usage(format!("floor payloads: {e}"));
        let tower: rct_bus::Tower = "bench".parse().expect("valid");
        let at: rct_bus::Target = target(0).parse().expect("valid");
        let mut events = Vec::new();
        for kind in [EventKind::Decision, EventKind::Claim, EventKind::Outcome] {
            if !ran && kind != EventKind::Decision {
                events.push(Bytes::new());
                continue;
            }
            let record = replay::slot(js, &tower, &at, id, kind)
                .await
                .map_err(|e| io(&e))?
                .ok_or_else(|| io(&format!("no {kind:?} for {id}")))?;
            events.push(Bytes::from(record.event.encode_to_vec()));
        }
        let command = js
            .get_stream("RCT_CMD")
            .await
            .map_err(|e| io(&e))?
            .get_last_raw_message_by_subject(&format!("rct.cmd.bench.{}.noop", target(0)))
            .await
            .map_err(|e| io(&e))?
            .payload;
        let [decision, claim, outcome] = events.try_into().expect("three events");
        Ok(Self {
            submission,
            decision,
            command,
            claim,
            outcome,
        })
    }
}

/// The same hops with bare JetStream and rct's own plumbing: the same publisher (a
/// `Nats-Msg-Id` on every message, `Nats-Expected-Last-Subject-Sequence: 0` on the single-slot
/// decision, claim and outcome, acks awaited), the same consume loop (`work::consume`, with
/// admission's and the agent's default concurrency) and rct's payloads byte for byte; observed
/// by an ordered consumer created after the publish, as rct's watcher is. What differs: no
/// signature made or verified, no policy, no journal or presence reads, no in-progress acks.
struct Floor {
    relay: Relay,
    worker: Relay,
    events: async_nats::jetstream::stream::Stream,
    payloads: Payloads,
}

impl Floor {
    async fn start(js: &async_nats::jetstream::Context, payloads: Payloads) -> Result<Self> {
        let io = |e: &dyn std::fmt::Display| Error::usage(format!("floor: {e}"));
        let relay = relay_consumer(js, "RCT_SUBMIT", "floor-relay", "rct.submit.floor.>").await?;
        let worker = relay_consumer(js, "RCT_CMD", "floor-worker", "rct.cmd.floor.>").await?;
        let relay = Relay::start(
            js,
            relay,
            rct_admission::Config::default().concurrency,
            None,
            admission_hop("floor", payloads.clone()),
        );
        let worker = Relay::start(
            js,
            worker,
            rct_agents::Config::default().concurrency,
            None,
            {
                let p = payloads.clone();
                move |id| {
                    vec![
                        Outgoing::new(
                            format!("rct.evt.floor.x.{id}.claim"),
                            format!("{id}.claim"),
                            p.claim.clone(),
                        )
                        .once(),
                        Outgoing::new(
                            format!("rct.evt.floor.x.{id}.outcome"),
                            format!("{id}.outcome"),
                            p.outcome.clone(),
                        )
                        .once(),
                    ]
                }
            },
        );
        let events = js.get_stream("RCT_EVT").await.map_err(|e| io(&e))?;
        Ok(Self {
            relay,
            worker,
            events,
            payloads,
        })
    }

    async fn operation(&self, js: &async_nats::jetstream::Context) -> Result<(Duration, Duration)> {
        use async_nats::jetstream::consumer::pull;
        let io = |e: &dyn std::fmt::Display| Error::usage(format!("floor: {e}"));
        let id = CommandId::generate();
        let begin = Instant::now();
        Publisher::new(js.clone())
            .send(Outgoing::new(
                "rct.submit.floor.noop".to_owned(),
                id.msg_id(),
                self.payloads.submission.clone(),
            ))
            .await
            .map_err(|e| io(&e))?;
        let observer = self
            .events
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("rct.evt.floor.x.{id}.>"),
                ..Default::default()
            })
            .await
            .map_err(|e| io(&e))?;
        let mut messages = observer.messages().await.map_err(|e| io(&e))?;
        let mut started = Duration::ZERO;
        loop {
            let next = tokio::time::timeout(WAIT, messages.next())
                .await
                .map_err(|_| io(&format!("no outcome for {id} within {WAIT:?}")))?;
            match next {
                Some(Ok(m)) if m.subject.ends_with(".claim") => started = begin.elapsed(),
                Some(Ok(m)) if m.subject.ends_with(".outcome") => {
                    return Ok((started, begin.elapsed()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(io(&e)),
                None => return Err(io(&"the floor's event stream ended")),
            }
        }
    }

    fn stop(self) {
        self.relay.stop();
        self.worker.stop();
    }
}

/// The floor's admission hop for `prefix`: a single-slot decision and a command, of rct's
/// bytes, for command `id`.
fn admission_hop(
    prefix: &'static str,
    p: Payloads,
) -> impl Fn(&str) -> Vec<Outgoing> + Send + Sync {
    move |id| {
        vec![
            Outgoing::new(
                format!("rct.evt.{prefix}.x.{id}.decision"),
                format!("{id}.decision"),
                p.decision.clone(),
            )
            .once(),
            Outgoing::new(
                format!("rct.cmd.{prefix}.x.noop"),
                id.to_string(),
                p.command.clone(),
            ),
        ]
    }
}

/// The longest any one wait of the bench may take; each says what it waited for.
const WAIT: Duration = Duration::from_secs(60);

async fn relay_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    name: &str,
    filter: &str,
) -> Result<async_nats::jetstream::consumer::PullConsumer> {
    use async_nats::jetstream::consumer::pull;
    let io = |e: &dyn std::fmt::Display| Error::usage(format!("floor: {e}"));
    js.get_stream(stream)
        .await
        .map_err(|e| io(&e))?
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            filter_subject: filter.into(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await
        .map_err(|e| io(&e))
}

/// Scenario 2: admitted decisions per second with K submitters; floor: pull → two publishes
/// → ack on the same streams.
async fn throughput(
    js: &async_nats::jetstream::Context,
    session: &Session,
    total: usize,
    submitters: usize,
) -> Result<Row> {
    let io = |e: &dyn std::fmt::Display| Error::usage(format!("throughput: {e}"));
    let decided_before = count(js, "rct.evt.bench.*.*.decision").await?;
    let prepared: Vec<(CommandId, OperationName, Bytes)> =
        (0..total).map(|_| signed(session, &target(0))).collect();
    let begin = Instant::now();
    let mut chunks = Vec::new();
    for chunk in prepared.chunks(total.div_ceil(submitters.max(1))) {
        let chunk = chunk.to_vec();
        let publisher = Publisher::new(js.clone());
        chunks.push(tokio::spawn(async move {
            for (id, name, bytes) in chunk {
                publisher
                    .send(Outgoing::new(Subject::submit(&name), id.msg_id(), bytes))
                    .await
                    .expect("submit");
            }
        }));
    }
    for chunk in chunks {
        chunk.await.map_err(|e| io(&e))?;
    }
    let until = Instant::now() + WAIT.max(Duration::from_secs_f64(total as f64 / 50.0));
    loop {
        let decided = count(js, "rct.evt.bench.*.*.decision").await? - decided_before;
        if decided >= total {
            break;
        }
        if Instant::now() > until {
            return Err(io(&format!(
                "admission decided {decided} of {total} submissions in {:?}",
                begin.elapsed()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ours = total as f64 / begin.elapsed().as_secs_f64();

    // Floor: the same submissions through rct's consume loop and publisher, publishing
    // rct's decision and command bytes.
    let (sample, _, submission) = prepared.last().cloned().expect("at least one");
    let payloads = Payloads::of(js, sample, submission, false).await?;
    let relay = relay_consumer(
        js,
        "RCT_SUBMIT",
        "floor-throughput",
        "rct.submit.floorput.>",
    )
    .await?;
    // The relay runs first, like admission; the same submitters then publish to it.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let relay_task = Relay::start(
        js,
        relay,
        rct_admission::Config::default().concurrency,
        Some(tx),
        admission_hop("floorput", payloads),
    );
    let begin = Instant::now();
    let mut chunks = Vec::new();
    for chunk in prepared.chunks(total.div_ceil(submitters.max(1))) {
        let chunk = chunk.to_vec();
        let publisher = Publisher::new(js.clone());
        chunks.push(tokio::spawn(async move {
            for (id, _, bytes) in chunk {
                publisher
                    .send(Outgoing::new(
                        "rct.submit.floorput.noop".to_owned(),
                        format!("floorput-{}", id.msg_id()),
                        bytes,
                    ))
                    .await
                    .expect("submit");
            }
        }));
    }
    for chunk in chunks {
        chunk.await.map_err(|e| io(&e))?;
    }
    for done in 0..total {
        tokio::time::timeout(WAIT, rx.recv()).await.map_err(|_| {
            io(&format!(
                "the floor relayed {done} of {total} within {WAIT:?} of the last"
            ))
        })?;
    }
    relay_task.stop();
    let floor = total as f64 / begin.elapsed().as_secs_f64();
    Ok(Row {
        scenario: format!("admission throughput ({total} submissions, {submitters} submitters)"),
        rct: format!("{ours:.0} decisions/s"),
        floor: format!("{floor:.0} msg/s"),
        ratio: ratio(ours, floor),
        checks: vec![Check::RatioAtLeast {
            ratio: ours / floor,
            min: 0.7,
        }],
    })
}

/// A floor hop: rct's consume loop and publisher; per message (its command id in its
/// `Nats-Msg-Id`), the messages `out` makes, each acknowledged by the server, then the ack. Each
/// handled message is reported on `done`.
struct Relay {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn start(
        js: &async_nats::jetstream::Context,
        consumer: async_nats::jetstream::consumer::PullConsumer,
        concurrency: usize,
        done: Option<tokio::sync::mpsc::UnboundedSender<()>>,
        out: impl Fn(&str) -> Vec<Outgoing> + Send + Sync + 'static,
    ) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        // Admission and agents publish with the operation's trace context, as a header.
        let publisher = Publisher::new(js.clone()).traced(&rct_bus::trace::TraceContext::root());
        let out = std::sync::Arc::new(out);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let tracker = tokio_util::task::TaskTracker::new();
            let _ = rct_streams::work::consume(&consumer, concurrency, &stop, &tracker, |m| {
                let (publisher, out, done) = (publisher.clone(), out.clone(), done.clone());
                async move {
                    // Like rct's, the floor's subjects name the operation, not the command:
                    // the command is in the message id.
                    let id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default();
                    for outgoing in out(&id) {
                        if let Err(e) = publisher.send(outgoing).await {
                            eprintln!("rct bench: the floor could not publish: {e}");
                            return;
                        }
                    }
                    let _ = m.ack().await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            })
            .await;
        });
        Self { shutdown, task }
    }

    fn stop(self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

async fn count(js: &async_nats::jetstream::Context, subjects: &str) -> Result<usize> {
    let stream = js
        .get_stream("RCT_EVT")
        .await
        .map_err(|e| Error::usage(e.to_string()))?;
    let info = stream
        .info_with_subjects(subjects)
        .await
        .map_err(|e| Error::usage(e.to_string()))?;
    futures::pin_mut!(info);
    let mut total = 0;
    while let Some(entry) = info.next().await {
        total += entry.map_err(|e| Error::usage(e.to_string()))?.1;
    }
    Ok(total)
}

/// Scenario 3: folding N events into history vs draining them with a raw ordered consumer.
async fn replay_rows(js: &async_nats::jetstream::Context, n: usize) -> Result<Row> {
    let io = |e: &dyn std::fmt::Display| Error::usage(format!("replay: {e}"));
    // A fresh tower per size, so each replay reads exactly its own events.
    let tower: rct_bus::Tower = format!("replay{n}").parse().map_err(|e| io(&e))?;
    let target: rct_bus::Target = "t".parse().map_err(|e| io(&e))?;
    let per_command = 10;
    let published_from = OffsetDateTime::now_utc();
    // Signed as admission signs them, and checked as `rct history` checks them.
    let admission = KeyPair::generate();
    let trust =
        rct_bus::provenance::Trust::new(rct_bus::Verifier::new([admission.public().clone()]));
    let signer = rct_bus::provenance::Signer::admission(admission);
    let mut first_sequence = None;
    let mut acks = Vec::with_capacity(1024);
    let mut command = CommandId::generate();
    // Each command as history sees one: its decision, progress, its outcome.
    for i in 0..n {
        if i % per_command == 0 {
            command = CommandId::generate();
        }
        let kind = match i % per_command {
            0 => proto::event::Kind::Admitted(proto::Admitted {
                request: Some(proto::Request {
                    justification: "BENCH-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            last if last == per_command - 1 => {
                proto::event::Kind::Succeeded(proto::Succeeded::default())
            }
            _ => proto::event::Kind::Progress(proto::Progress {
                percent: (i % 100) as u32,
                step: "step".into(),
                message: String::new(),
            }),
        };
        let event = proto::Event {
            command_id: command.to_string(),
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: "bench".into(),
            operation: format!("{tower}/noop"),
            target: "t".into(),
            kind: Some(kind),
        };
        let slot = EventKind::of(&event).expect("an event with a kind");
        let subject = Subject::event(&tower, &target, command, slot).to_string();
        let payload = event.encode_to_vec();
        let mut headers = async_nats::HeaderMap::new();
        let signature = signer.sign(&subject, &payload).expect("admission signs");
        headers.insert(rct_bus::provenance::HEADER, signature.as_str());
        acks.push(
            js.publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| io(&e))?,
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                let ack = ack.await.map_err(|e| io(&e))?;
                first_sequence.get_or_insert(ack.sequence);
            }
        }
    }
    for ack in acks.drain(..) {
        let ack = ack.await.map_err(|e| io(&e))?;
        first_sequence.get_or_insert(ack.sequence);
    }
    // As `rct history --since … --tower …` reads: from a time, one tower's events, checking
    // who wrote each (progress left unchecked, as history leaves it).
    let filter = Filter {
        tower: Some(tower.clone()),
        since: Some(published_from),
        trust: Some(std::sync::Arc::new(trust)),
        progress_unchecked: true,
        ..Filter::default()
    };

    // The peak resident set of this process while history folds: reset, then read after.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let resident_before = status_kb("VmRSS:");
    let begin = Instant::now();
    let mut folder = rct_streams::Folder::new();
    let mut history = replay::history(js, &filter).await.map_err(|e| io(&e))?;
    let (mut seen, mut ended, mut most_open) = (0, 0, 0);
    while let Some(record) = tokio::time::timeout(WAIT, history.next())
        .await
        .map_err(|_| io(&format!("history stalled after {seen} of {n} events")))?
    {
        let record = record.map_err(|e| io(&e))?;
        seen += 1;
        if let rct_streams::Folded::Ended(_) = folder.absorb(record) {
            ended += 1;
        }
        most_open = most_open.max(folder.open());
    }
    let ours = begin.elapsed();
    let peak = status_kb("VmHWM:");
    let commands = n.div_ceil(per_command);
    if seen != n || ended + folder.open() != commands {
        return Err(Error::usage(format!(
            "replay read {seen} of {n} events, ended {ended} of {commands} commands"
        )));
    }
    // What `rct history` keeps: only the commands in flight (here one at a time).
    if most_open > 1 {
        return Err(Error::usage(format!(
            "replay held {most_open} open commands; history must keep only those in flight"
        )));
    }

    use async_nats::jetstream::consumer::pull;
    let begin = Instant::now();
    let stream = js.get_stream("RCT_EVT").await.map_err(|e| io(&e))?;
    // The same events read the same way, without decoding or folding them: from the first
    // of them, the whole stream, counting the tower's.
    let raw = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: rct_bus::subject::all_events(),
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first_sequence.unwrap_or(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| io(&e))?;
    let mut messages = raw.messages().await.map_err(|e| io(&e))?;
    let prefix = format!("rct.evt.{tower}.");
    let mut drained = 0;
    while drained < n {
        let next = tokio::time::timeout(WAIT, messages.next())
            .await
            .map_err(|_| io(&format!("the raw read stalled at {drained} of {n} events")))?;
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(io(&e)),
            None => {
                return Err(io(&format!(
                    "the raw read ended at {drained} of {n} events"
                )));
            }
        };
        if message.subject.starts_with(prefix.as_str()) {
            drained += 1;
        }
    }
    let floor = begin.elapsed();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    Ok(Row {
        scenario: format!("replay into history ({n} events, {commands} commands)"),
        rct: format!(
            "{:.0} events/s ({:.2} s; peak RSS {})",
            rate(ours),
            ours.as_secs_f64(),
            match (peak, resident_before) {
                (Some(peak), Some(before)) => format!(
                    "{:.0} MB, {:+.0} MB while folding",
                    peak as f64 / 1024.0,
                    (peak as f64 - before as f64) / 1024.0
                ),
                _ => "unknown".into(),
            }
        ),
        floor: format!("{:.0} events/s ({:.2} s)", rate(floor), floor.as_secs_f64()),
        ratio: ratio(rate(ours), rate(floor)),
        checks: {
            let mut checks = vec![Check::RatioAtLeast {
                ratio: rate(ours) / rate(floor),
                min: 0.5,
            }];
            if n >= 1_000_000 {
                checks.push(Check::Below {
                    value: ours.as_secs_f64(),
                    max: 5.0,
                    unit: "s",
                });
            }
            checks
        },
    })
}

/// Scenario 4: one operation to each of N cluster agents.
async fn fanout(
    js: &async_nats::jetstream::Context,
    session: &Session,
    targets: std::ops::Range<usize>,
    what: &str,
) -> Result<Vec<Row>> {
    let agents = targets.len();
    let (all_started, all_done) = fan_times(js, session, targets).await?;
    Ok(vec![
        Row {
            scenario: format!("fan-out to {agents} {what}: all started"),
            rct: ms(all_started),
            floor: "-".into(),
            ratio: "-".into(),
            checks: vec![Check::Below {
                value: all_started.as_secs_f64(),
                max: 2.0,
                unit: "s",
            }],
        },
        Row {
            scenario: format!("fan-out to {agents} {what}: all succeeded"),
            rct: ms(all_done),
            floor: "-".into(),
            ratio: "-".into(),
            checks: Vec::new(),
        },
    ])
}

/// The bench tower's events from now on.
async fn bench_events(
    js: &async_nats::jetstream::Context,
) -> std::result::Result<
    impl futures::Stream<Item = rct_streams::Result<Item>> + Unpin + use<>,
    String,
> {
    replay::follow(
        js,
        &Filter {
            tower: Some("bench".parse().map_err(|e| format!("{e}"))?),
            since: Some(OffsetDateTime::now_utc()),
            ..Filter::default()
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// One command to each of `targets`, submitted at once: how long until every one started,
/// and until every one succeeded.
async fn fan_times(
    js: &async_nats::jetstream::Context,
    session: &Session,
    targets: std::ops::Range<usize>,
) -> Result<(Duration, Duration)> {
    let agents = targets.len();
    let io = |e: &dyn std::fmt::Display| Error::usage(format!("fan-out: {e}"));
    let mut events = bench_events(js).await.map_err(|e| io(&e))?;
    let publisher = Publisher::new(js.clone());
    let mut ids = std::collections::HashSet::new();
    let begin = Instant::now();
    for i in targets {
        let (id, name, bytes) = signed(session, &target(i));
        ids.insert(id);
        publisher
            .send(Outgoing::new(Subject::submit(&name), id.msg_id(), bytes))
            .await
            .map_err(|e| io(&e))?;
    }
    let (mut started, mut done) = (0, 0);
    let (mut all_started, mut all_done) = (Duration::ZERO, Duration::ZERO);
    while done < agents {
        let next = tokio::time::timeout(WAIT, events.next()).await.map_err(|_| {
            io(&format!(
                "{started} of {agents} agents started, {done} succeeded; nothing more within {WAIT:?}"
            ))
        })?;
        let Some(item) = next else {
            return Err(io(&format!(
                "the event stream ended with {started} of {agents} started, {done} succeeded"
            )));
        };
        if let Ok(Item::Event(record)) = item
            && ids.contains(&record.command_id)
        {
            match record.kind {
                EventKind::Claim => {
                    started += 1;
                    if started == agents {
                        all_started = begin.elapsed();
                    }
                }
                EventKind::Outcome => {
                    done += 1;
                    if done == agents {
                        all_done = begin.elapsed();
                    }
                }
                _ => {}
            }
        }
    }
    Ok((all_started, all_done))
}

/// Scenario 4c: one rollout of the operation to every one of `agents` targets, in four
/// waves of a quarter each (all of a wave at once, no bake, no health check): how long
/// until its last child started, and until the rollout ended. The floor is the same waves
/// driven by the client as plain fan-outs (each wave submitted once the one before
/// succeeded), so the ratio is what the coordinator costs: its look every 200 ms, deciding
/// each child through locks and freezes, its log and progress lines.
async fn rollout_rows(
    js: &async_nats::jetstream::Context,
    session: &Session,
    agents: usize,
) -> Result<Vec<Row>> {
    let io = |e: &dyn std::fmt::Display| Error::usage(format!("rollout: {e}"));
    let waves = rct_bus::rollout::wave_ends("25%,50%,75%,100%", agents).map_err(|e| io(&e))?;
    // The floor: each wave as a plain fan-out, the next once it succeeded.
    let mut floor = Duration::ZERO;
    let mut start = 0;
    for (n, &end) in waves.iter().enumerate() {
        let (started, done) = fan_times(js, session, start..end).await?;
        floor += if n + 1 == waves.len() { started } else { done };
        start = end;
    }

    let mut events = bench_events(js).await.map_err(|e| io(&e))?;
    let (id, name, bytes) = signed_run(
        session,
        proto::Run {
            target: rct_bus::rollout::PARENT_TARGET.to_owned(),
            rollout: Some(proto::Rollout {
                targets: (0..agents).map(target).collect::<Vec<_>>().join(","),
                waves: "25%,50%,75%,100%".into(),
                max_concurrency: "100%".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let children: std::collections::HashSet<CommandId> = (0..agents)
        .map(|i| {
            let t = rct_bus::Target::new(target(i)).expect("a target name");
            rct_bus::rollout::child_id(id, &t)
        })
        .collect();
    let begin = Instant::now();
    Publisher::new(js.clone())
        .send(Outgoing::new(Subject::submit(&name), id.msg_id(), bytes))
        .await
        .map_err(|e| io(&e))?;
    let (mut started, mut last_started, mut ended) = (0, Duration::ZERO, None);
    while ended.is_none() {
        let next = tokio::time::timeout(WAIT, events.next())
            .await
            .map_err(|_| {
                io(&format!(
                    "{started} of {agents} children started; nothing more within {WAIT:?}"
                ))
            })?;
        let Some(item) = next else {
            return Err(io(&"the event stream ended"));
        };
        let Ok(Item::Event(record)) = item else {
            continue;
        };
        match record.kind {
            EventKind::Claim if children.contains(&record.command_id) => {
                started += 1;
                if started == agents {
                    last_started = begin.elapsed();
                }
            }
            EventKind::Outcome if record.command_id == id => {
                ended = Some((begin.elapsed(), record.event.kind));
            }
            _ => {}
        }
    }
    let (all_done, outcome) = ended.expect("the loop ends on it");
    if started < agents || !matches!(outcome, Some(proto::event::Kind::Succeeded(_))) {
        return Err(io(&format!(
            "the rollout ended {outcome:?} with {started} of {agents} children started"
        )));
    }
    let ratio = last_started.as_secs_f64() / floor.as_secs_f64();
    Ok(vec![
        Row {
            scenario: format!(
                "rollout to {agents} targets in {} waves: last child started",
                waves.len()
            ),
            rct: ms(last_started),
            floor: format!("{} (the waves as plain fan-outs)", ms(floor)),
            ratio: format!("{ratio:.2}×"),
            checks: vec![Check::RatioAtMost { ratio, max: 2.0 }],
        },
        Row {
            scenario: format!(
                "rollout to {agents} targets in {} waves: rollout succeeded",
                waves.len()
            ),
            rct: ms(all_done),
            floor: "-".into(),
            ratio: "-".into(),
            checks: Vec::new(),
        },
    ])
}

/// Scenario 4b: one operation to each of `processes` agents, each a `rct-agent` process of
/// its own (its own connection and runtime) serving a script that runs `/bin/true`, on the
/// targets after the in-process agents'.
async fn fanout_processes(
    stack: &Stack,
    js: &async_nats::jetstream::Context,
    session: &Session,
    first: usize,
    processes: usize,
) -> Result<Vec<Row>> {
    let Some(bin) = sibling("rct-agent") else {
        eprintln!("rct bench: rct-agent not found next to rct; skipping fan-out to processes");
        return Ok(Vec::new());
    };
    let mut children = Vec::new();
    let mut start = || -> Result<()> {
        for i in first..first + processes {
            let scripts = stack.dir.join(format!("fanout-{i}.yaml"));
            std::fs::write(
                &scripts,
                format!(
                    "tower: bench\ntarget: {}\noperations:\n  noop:\n    command: /bin/true\n",
                    target(i)
                ),
            )
            .map_err(|e| Error::usage(e.to_string()))?;
            let child = std::process::Command::new(&bin)
                .args(["--scripts".as_ref(), scripts.as_os_str()])
                .args(["--server", &stack.url, "--instance", &format!("fanout{i}")])
                .arg("--create-consumer")
                .arg("--trusted-key")
                .arg(stack.dir.join("admission.pub"))
                .env("RCT_LOG", "error")
                .stdin(std::process::Stdio::null())
                .spawn()
                .map_err(|e| Error::usage(format!("cannot start {}: {e}", bin.display())))?;
            children.push(child);
        }
        Ok(())
    };
    let started = start();
    let rows = match started {
        Ok(()) => {
            let present = crate::stack::wait_for_agents(
                js,
                processes,
                ".fanout",
                Duration::from_secs(30 + processes as u64),
            )
            .await;
            match present {
                Ok(()) => {
                    fanout(
                        js,
                        session,
                        first..first + processes,
                        "agent processes (rct-agent, a script each)",
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    rows
}

/// A binary next to this one.
fn sibling(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::current_exe().ok()?.parent()?.to_owned();
    Some(dir.join(name)).filter(|p| p.is_file())
}

/// Scenario 6: latency and throughput on three nodes with every stream R3 and
/// `sync_interval: always` (each write on a quorum's disks before its PubAck), rct and its
/// floors on the same cluster.
async fn cluster(
    scratch: &std::path::Path,
    operations: usize,
    submissions: usize,
    submitters: usize,
) -> Result<Vec<Row>> {
    use rct_streams::testkit::{Cluster, Setup};
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::usage(format!("{what}: {e}"));
    let nats = Cluster::start_with(Setup {
        sync_always: true,
        ..Setup::default()
    })
    .await;
    let connection = rct_streams::Connection::to(nats.urls());
    let client = connection
        .connect("rct bench cluster", true)
        .await
        .map_err(|e| fail("cannot connect to the cluster", &e))?;
    let js = connection.jetstream(client.clone());
    let streams = rct_streams::Config {
        replicas: 3,
        ..rct_streams::Config::default()
    };
    let dir = scratch.join("cluster");
    std::fs::create_dir_all(&dir).map_err(|e| fail("cannot make a folder", &e))?;
    std::fs::write(dir.join("catalog.yaml"), catalog(1)).map_err(|e| fail("cannot write", &e))?;
    let config = rct_admission::Config {
        nats: connection.clone(),
        instance: "bench".into(),
        catalog: dir.join("catalog.yaml"),
        signing_key: dir.join("admission.key"),
        generate_key: true,
        dev_issuer: true,
        streams: streams.clone(),
        ..rct_admission::Config::default()
    };
    rct_admission::provision(&js, &config)
        .await
        .map_err(|e| fail("cannot provision", &e))?;
    let admission = rct_admission::Admission::new(config, client.clone())
        .map_err(|e| fail("cannot start admission", &e))?;
    let trusted = admission.public_key();
    let stop = tokio_util::sync::CancellationToken::new();
    let admitting = tokio::spawn(admission.run(stop.clone()));
    let agent = Tower::new("bench")
        .cluster(&target(0))
        .operation("noop", noop)
        .trust(trusted)
        .config(rct_agents::Config {
            nats: connection.clone(),
            instance: "bench".into(),
            create_consumer: true,
            streams,
            ..rct_agents::Config::default()
        });
    let running = tokio::spawn(agent.run(client.clone(), stop.clone()));
    let until = Instant::now() + WAIT;
    let session = loop {
        match login::dev_token(&client, "bench", &["bench".into()]).await {
            Ok(token) => break login::exchange(&client, &token).await?,
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    crate::stack::wait_for_agents(&js, 1, "", WAIT).await?;
    let mut rows = latency(&js, &session, operations).await?;
    rows.push(throughput(&js, &session, submissions, submitters).await?);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), admitting).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), running).await;
    for row in &mut rows {
        row.scenario = format!("{} [3 nodes, R3, sync always]", row.scenario);
    }
    Ok(rows)
}

/// Scenario 5: RSS of admission and of an idle agent as their own processes; CLI start to
/// PubAck.
async fn footprint(stack: &Stack, session: &Session) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let key = stack.dir.join("admission.key");
    match sibling("rct-admission") {
        Some(bin) => {
            let mut command = std::process::Command::new(bin);
            command
                .args([
                    "--catalog".as_ref(),
                    stack.dir.join("catalog.yaml").as_os_str(),
                ])
                .args(["--signing-key".as_ref(), key.as_os_str()])
                .args(["--server", &stack.url, "--instance", "footprint"])
                .env("RCT_DEV_ISSUER", "true");
            let rss = idle_rss(command).await?;
            rows.push(rss_row(
                "RSS of admission (separate process, idle after start)",
                rss,
                30.0,
            ));
        }
        None => eprintln!("rct bench: rct-admission not found next to rct; skipping its footprint"),
    }
    match sibling("rct-agent") {
        Some(bin) => {
            let scripts = stack.dir.join("idle.yaml");
            std::fs::write(
                &scripts,
                "tower: bench\ntarget: t-000\noperations:\n  noop:\n    command: /bin/true\n",
            )
            .map_err(|e| Error::usage(e.to_string()))?;
            let mut command = std::process::Command::new(bin);
            command
                .args(["--scripts".as_ref(), scripts.as_os_str()])
                .args(["--server", &stack.url, "--instance", "footprint"])
                // Its consumer exists only if another scenario made it.
                .arg("--create-consumer")
                .arg("--trusted-key")
                .arg(stack.dir.join("admission.pub"));
            let rss = idle_rss(command).await?;
            rows.push(rss_row("RSS of an idle agent (rct-agent)", rss, 15.0));
        }
        None => eprintln!("rct bench: rct-agent not found next to rct; skipping its footprint"),
    }
    // CLI start to PubAck: `rct run … --detach` as a fresh process, against this stack.
    if let Ok(rct) = std::env::current_exe() {
        let home = stack.dir.join("home");
        let context = "bench";
        let mut contexts = crate::home::Contexts::default();
        contexts.contexts.insert(
            context.into(),
            rct_streams::Connection::to([stack.url.clone()]),
        );
        contexts.current = Some(context.into());
        let home_dir = crate::home::Home::at(&home);
        home_dir.save_contexts(&contexts)?;
        Session {
            key: KeyPair::from_pem(&session.key.to_pem())
                .map_err(|e| Error::usage(e.to_string()))?,
            certificate: session.certificate.clone(),
            identity: session.identity.clone(),
        }
        .save(&home_dir, context)?;
        let mut times = Vec::new();
        for _ in 0..20 {
            use tokio::io::AsyncBufReadExt as _;
            let begin = Instant::now();
            let mut child = tokio::process::Command::new(&rct)
                .args(["run", "bench/noop", "-p", "target=t-000", "--detach"])
                .env(rct_streams::runtime::ENV_HOME, &home)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| Error::usage(e.to_string()))?;
            // The id is printed once the PubAck is in: that is the time taken (--detach then
            // waits for the decision, which is not part of it).
            let mut id = String::new();
            let stdout = child.stdout.take().expect("piped");
            let read =
                tokio::time::timeout(WAIT, tokio::io::BufReader::new(stdout).read_line(&mut id))
                    .await;
            let acked = begin.elapsed();
            let status = tokio::time::timeout(WAIT, child.wait()).await;
            if matches!(read, Ok(Ok(n)) if n > 0) && matches!(status, Ok(Ok(s)) if s.success()) {
                times.push(acked);
            }
        }
        if times.is_empty() {
            return Err(Error::usage(
                "footprint: no `rct run --detach` printed its command id within 60 s",
            ));
        }
        times.sort();
        rows.push(Row {
            scenario: format!("CLI process start to PubAck, p50 of {}", times.len()),
            rct: ms(percentile(&times, 0.5)),
            floor: "-".into(),
            ratio: "-".into(),
            checks: vec![Check::Below {
                value: percentile(&times, 0.5).as_secs_f64() * 1000.0,
                max: 50.0,
                unit: "ms",
            }],
        });
    }
    Ok(rows)
}

/// Starts `command`, lets it settle for two seconds, reads its RSS, stops it.
async fn idle_rss(mut command: std::process::Command) -> Result<Option<f64>> {
    let mut child = command
        .env("RCT_LOG", "error")
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::usage(format!("cannot start {:?}: {e}", command.get_program())))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mb(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Ok(rss)
}

/// A field of `/proc/self/status`, in kB.
fn status_kb(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// A footprint row: `rss` (unknown: a miss) below `max` MB.
fn rss_row(scenario: &str, rss: Option<f64>, max: f64) -> Row {
    Row {
        scenario: scenario.into(),
        rct: rss.map_or("-".into(), |m| format!("{m:.1} MB")),
        floor: "-".into(),
        ratio: "-".into(),
        checks: vec![Check::Below {
            value: rss.unwrap_or(f64::NAN),
            max,
            unit: "MB",
        }],
    }
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(checks: Vec<Check>) -> Row {
        Row {
            scenario: "s".into(),
            rct: String::new(),
            floor: String::new(),
            ratio: String::new(),
            checks,
        }
    }

    /// Each kind of target says no when missed, and an unmeasured figure is a miss.
    #[test]
    fn every_target_can_be_missed() {
        let met = row(vec![
            Check::RatioAtMost {
                ratio: 1.2,
                max: 1.5,
            },
            Check::RatioAtLeast {
                ratio: 0.8,
                min: 0.5,
            },
            Check::Below {
                value: 4.9,
                max: 5.0,
                unit: "s",
            },
        ]);
        assert!(misses(&[met]).is_empty());
        let missed = row(vec![
            Check::RatioAtMost {
                ratio: 1.6,
                max: 1.5,
            },
            Check::RatioAtLeast {
                ratio: 0.4,
                min: 0.5,
            },
            Check::Below {
                value: 5.0,
                max: 5.0,
                unit: "s",
            },
            Check::Below {
                value: f64::NAN,
                max: 30.0,
                unit: "MB",
            },
            Check::RatioAtLeast {
                ratio: f64::INFINITY,
                min: 0.5,
            },
        ]);
        let said = misses(&[missed]);
        assert_eq!(said.len(), 5, "{said:#?}");
        assert!(
            said[0].contains("1.60× misses the target ≤ 1.5×"),
            "{said:#?}"
        );
        assert_eq!(
            row(vec![Check::Below {
                value: 1.0,
                max: 2.0,
                unit: "s"
            }])
            .target(),
            "< 2 s"
        );
    }
}
