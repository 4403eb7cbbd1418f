//! Fail closed: with admission stopped, or the command stream unwritable, nothing runs, the
//! operator is told so within the wait, and nothing is lost: what was asked is decided (or
//! refused as stale) once the part is back.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rct_bus::CommandId;
use rct_bus::proto::RejectionCode;
use rct_bus::proto::event::Kind;
use rct_streams::replay::{self, Record};
use support::Hub;
use tokio_util::sync::CancellationToken;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The command id rct printed when it submitted.
fn submitted_id(stderr: &str) -> CommandId {
    stderr
        .lines()
        .filter(|l| l.starts_with("submitted"))
        .flat_map(str::split_whitespace)
        .find_map(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("nothing submitted: {stderr}"))
}

/// Waits until the command's history satisfies `done`; the history.
async fn history_until(
    js: &async_nats::jetstream::Context,
    id: CommandId,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let history = replay::command_history(js, id).await.unwrap();
        if done(&history) {
            return history;
        }
        assert!(Instant::now() < deadline, "never came: {history:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn has(history: &[Record], kind: fn(&Kind) -> bool) -> bool {
    history
        .iter()
        .any(|r| r.event.kind.as_ref().is_some_and(kind))
}

async fn commands_stored(js: &async_nats::jetstream::Context) -> u64 {
    let mut stream = js.get_stream("RCT_CMD").await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn admin(hub: &Hub) -> async_nats::jetstream::Context {
    let admin = hub.connection("admin", "_INBOX_admin");
    admin.jetstream(admin.connect("admin", false).await.unwrap())
}

/// `rct` running in the background; what it printed on stderr so far.
struct Background {
    child: std::process::Child,
    stderr: Arc<std::sync::Mutex<String>>,
    stdout: Arc<std::sync::Mutex<String>>,
}

/// Keeps what `from` says, line by line, as it comes.
fn kept(from: impl std::io::Read + Send + 'static) -> Arc<std::sync::Mutex<String>> {
    use std::io::BufRead as _;
    let text = Arc::new(std::sync::Mutex::new(String::new()));
    let kept = text.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            let mut kept = kept.lock().unwrap();
            kept.push_str(&line);
            kept.push('\n');
        }
    });
    text
}

impl Background {
    fn start(op: &support::Operator, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = std::process::Command::new(support::RCT)
            .args(args)
            .envs(env.iter().copied())
            .env("RCT_HOME", op.home.path())
            .env_remove("RCT_CONTEXT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = kept(child.stderr.take().unwrap());
        let stdout = kept(child.stdout.take().unwrap());
        Self {
            child,
            stderr,
            stdout,
        }
    }

    fn printed(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn said(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds `needle`; how long that took.
    async fn until_said(&self, needle: &str, within: Duration) -> Duration {
        let started = Instant::now();
        while !self.said().contains(needle) {
            assert!(
                started.elapsed() < within,
                "never said {needle:?}: {}",
                self.said()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    }

    async fn exit(mut self, within: Duration) -> (Option<i32>, String) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader has the last lines once the pipe closes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return (status.code(), self.said());
            }
            assert!(started.elapsed() < within, "still running: {}", self.said());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole system on its identities (admission, the prod-1 agent, alice logged in), until
/// the token is cancelled; the hub must be kept alive meanwhile.
async fn running() -> (Hub, CancellationToken, Arc<support::Operator>) {
    let hub = Hub::start().await;
    let shutdown = CancellationToken::new();
    let operator = hub.running(&shutdown).await;
    (hub, shutdown, operator)
}

/// The hub with the prod-1 agent and alice logged in, after admission stopped: the hub, an
/// admin's JetStream, the operator, and the token that stops the agent.
async fn admission_stopped() -> (
    Hub,
    async_nats::jetstream::Context,
    Arc<support::Operator>,
    CancellationToken,
) {
    let hub = Hub::start().await;
    hub.provision().await;
    let js = admin(&hub).await;
    let stop_admission = CancellationToken::new();
    let (key, admission) = hub.admission_with(&stop_admission, |_| {}).await;
    let agents = CancellationToken::new();
    let agent = hub.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
    hub.traffic_agent("prod-1", agent, key, &agents).await;
    let operator = Arc::new(hub.operator());
    let op = operator.clone();
    blocking(move || op.login()).await;
    stop_admission.cancel();
    admission.await.unwrap();
    (hub, js, operator, agents)
}

/// Admission is down when the operator fires: rct says the request is stored and will still be
/// decided if admission returns in time, keeps watching, and when admission returns the drain
/// runs and rct ends with its outcome (it used to say "admission may be down", exit 2, and the
/// drain ran later anyway). Detached, it says the same and exits 4, "not known yet".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_admission_down_the_operator_is_told_it_is_stored_and_it_runs_when_admission_returns()
{
    let (hub, js, operator, agents) = admission_stopped().await;

    let watching = Background::start(
        &operator,
        &[
            "traffic",
            "drain-cluster",
            "--cluster",
            "prod-1",
            "-j",
            "SRE-101",
        ],
        &[("RCT_DECISION_WAIT", "2s")],
    );
    watching
        .until_said(
            "), and not decided after 2s: admission may be down",
            Duration::from_secs(20),
        )
        .await;
    let said = watching.said();
    assert!(
        said.contains("If admission returns before")
            && said.contains("Do not fire it again")
            && !said.contains("admission may be down. Nothing runs"),
        "{said}"
    );
    assert_eq!(
        commands_stored(&js).await,
        0,
        "a command without a decision"
    );

    let op = operator.clone();
    // Another cluster: two drains of prod-1 at once would be refused `locked`.
    let detached =
        blocking(move || op.fire_drain("prod-2", &["--detach"], &[("RCT_DECISION_WAIT", "1s")]))
            .await;
    let detached_said = text(&detached.stderr);
    assert_eq!(detached.status.code(), Some(4), "{detached_said}");
    assert!(
        detached_said.contains("is stored, and not decided after 1s"),
        "{detached_said}"
    );

    // Admission returns in time: both are decided and admitted, the prod-1 drain runs, and the
    // watcher ends with it.
    let again = CancellationToken::new();
    hub.admission_with(&again, |_| {}).await;
    let (code, said) = watching.exit(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("admitted"), "{said}");
    assert_eq!(commands_stored(&js).await, 2);
    again.cancel();
    agents.cancel();
}

/// Admission stays down past the request's expiry: rct says it will not run, exit 1, and when
/// admission returns it refuses it, on record, and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_decided_before_it_expires_is_said_not_to_run_and_never_runs() {
    let (hub, js, operator, agents) = admission_stopped().await;

    let op = operator.clone();
    let out = blocking(move || {
        op.fire_drain(
            "prod-1",
            &[],
            &[("RCT_DECISION_WAIT", "1s"), ("RCT_REQUEST_TTL", "1s")],
        )
    })
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("was not decided by") && stderr.contains("it will not run"),
        "{stderr}"
    );
    let id = submitted_id(&stderr);

    let again = CancellationToken::new();
    hub.admission_with(&again, |_| {}).await;
    let history = history_until(&js, id, |h| has(h, |k| matches!(k, Kind::Rejected(_)))).await;
    let Some(Kind::Rejected(rejected)) = history[0].event.kind.as_ref() else {
        panic!("{history:#?}");
    };
    assert!(
        [RejectionCode::Stale as i32, RejectionCode::Expired as i32].contains(&rejected.code),
        "{rejected:?}"
    );
    assert!(!has(&history, |k| matches!(
        k,
        Kind::Admitted(_) | Kind::Started(_)
    )));
    assert_eq!(commands_stored(&js).await, 0);
    again.cancel();
    agents.cancel();
}

/// Admitted for a target no agent serves: said at once, with its deadline, while waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_a_target_with_no_live_agent_says_so_at_once() {
    let (_hub, shutdown, operator) = running().await;
    let watching = Background::start(
        &operator,
        &[
            "traffic",
            "drain-cluster",
            "--cluster",
            "prod-2",
            "-j",
            "SRE-102",
        ],
        &[],
    );
    let took = watching
        .until_said(
            "no live agent serves traffic/drain-cluster on prod-2 now (rct agents): it waits for \
             one until its deadline",
            Duration::from_secs(20),
        )
        .await;
    assert!(took < Duration::from_secs(10), "took {took:?}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_command_stream_unwritable_nothing_runs_until_it_is_back() {
    let (hub, shutdown, operator) = running().await;
    let js = admin(&hub).await;

    // RCT_CMD stops taking rct.cmd.>: every command write fails.
    let mut stream = js.get_stream("RCT_CMD").await.unwrap();
    let original = stream.info().await.unwrap().config.clone();
    let parked = async_nats::jetstream::stream::Config {
        subjects: vec!["rct.parked.>".into()],
        ..original.clone()
    };
    js.update_stream(parked).await.unwrap();

    let op = operator.clone();
    let out = blocking(move || op.fire_drain("prod-1", &["--detach"], &[])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = submitted_id(&text(&out.stderr));

    // Admission decides and records, but cannot write the command: nothing starts.
    history_until(&js, id, |h| has(h, |k| matches!(k, Kind::Admitted(_)))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let history = replay::command_history(&js, id).await.unwrap();
    assert!(
        !has(&history, |k| matches!(k, Kind::Started(_))),
        "{history:#?}"
    );
    assert_eq!(commands_stored(&js).await, 0);

    // Writable again: admission's retry publishes the command, which runs once.
    js.update_stream(original).await.unwrap();
    let history = history_until(&js, id, |h| has(h, |k| matches!(k, Kind::Succeeded(_)))).await;
    let started = history
        .iter()
        .filter(|r| matches!(r.event.kind, Some(Kind::Started(_))))
        .count();
    assert_eq!(started, 1, "{history:#?}");
    assert_eq!(commands_stored(&js).await, 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quorum_lost_nothing_runs_and_the_operator_is_told_what_to_check() {
    let mut cluster = rct_streams::testkit::Cluster::start().await;
    let urls = cluster.urls();
    let dir = tempfile::tempdir().unwrap();
    let config = rct_admission::Config {
        nats: rct_streams::Connection::to(urls.clone()),
        catalog: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ops/catalog.example.yaml"),
        signing_key: dir.path().join("admission.key"),
        generate_key: true,
        dev_issuer: true,
        streams: rct_streams::Config {
            replicas: 3,
            ..rct_streams::Config::default()
        },
        ..rct_admission::Config::default()
    };
    let client = config.nats.connect("admission", true).await.unwrap();
    let js = config.nats.jetstream(client.clone());
    rct_admission::provision(&js, &config).await.unwrap();
    let admission = rct_admission::Admission::new(config, client).unwrap();
    std::fs::write(
        dir.path().join("admission.pub"),
        admission.public_key().to_pem(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(admission.run(shutdown.clone()));
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let agent = rct_agents::Config {
        nats: rct_streams::Connection::to(urls.clone()),
        trusted_keys: vec![dir.path().join("admission.pub")],
        ..rct_agents::Config::default()
    };
    support::spawn_traffic_agent(agent, runs.clone(), &shutdown).await;

    let operator = Arc::new(support::Operator {
        id_token: None,
        home: tempfile::tempdir().unwrap(),
    });
    let mut context = vec!["context", "set", "cluster", "--timeout", "1s"];
    for url in &urls {
        context.extend(["--server", url.as_str()]);
    }
    let context: Vec<String> = context.into_iter().map(String::from).collect();
    let op = operator.clone();
    blocking(move || {
        let args: Vec<&str> = context.iter().map(String::as_str).collect();
        op.ok(&args);
        op.login();
        op.ok(&["ops"]);
    })
    .await;

    // Two of three nodes down: no stream can take a write.
    cluster.node(1).kill();
    cluster.node(2).kill();
    let op = operator.clone();
    let out = blocking(move || op.fire_drain("prod-1", &[], &[])).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // The surviving node answers that no stream took it (nothing stored), or, had the
    // leader taken it without a quorum to commit, that it may be on record and how to check.
    let refused = stderr.contains("nothing was stored and nothing will run")
        && stderr.contains("lost their quorum");
    let unsure = stderr.contains("may or may not be on record") && stderr.contains("rct status");
    assert!(refused || unsure, "{stderr}");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Quorum back: nothing that was refused runs later; an unsure request at most once.
    cluster.node(1).start_again().await;
    cluster.node(2).start_again().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        match js.get_stream("RCT_SUBMIT").await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => break info.state.messages,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            },
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if refused {
        assert_eq!(stored, 0, "refused, yet on record");
    } else if stored > 0 {
        // Unsure, and on record after all: wait until it is decided and, if admitted, has
        // ended, before counting how often it ran (counted earlier, a run still to come
        // would pass unseen).
        let id = stderr
            .split(|c: char| !c.is_ascii_alphanumeric())
            .find_map(|word| word.parse::<CommandId>().ok())
            .unwrap_or_else(|| panic!("no command id said: {stderr}"));
        history_until(&js, id, |h| {
            has(h, |k| {
                matches!(
                    k,
                    Kind::Rejected(_)
                        | Kind::Succeeded(_)
                        | Kind::Failed(_)
                        | Kind::Expired(_)
                        | Kind::Unknown(_)
                )
            })
        })
        .await;
    }
    let ran = runs.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        ran as u64 <= stored.min(1),
        "ran {ran} times for {stored} stored"
    );
    shutdown.cancel();
}

/// The agent refuses a genuine command (it does not trust admission's key): the operator
/// watching it is told why at once, not only at the deadline, `rct status` says its agent
/// refused it, and nothing ran. Before, rct was silent until the deadline and the command
/// stayed `admitted` with no reason anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_its_agent_refuses_is_reported_at_once_with_the_reason() {
    use std::io::BufRead as _;
    let hub = Hub::start().await;
    hub.provision().await;
    let js = admin(&hub).await;
    let shutdown = CancellationToken::new();
    hub.admission(&shutdown).await;
    let agent = hub.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
    let stranger = rct_bus::KeyPair::generate().public().clone();
    hub.traffic_agent("prod-1", agent, stranger, &shutdown)
        .await;
    let operator = Arc::new(hub.operator());
    let op = operator.clone();
    blocking(move || op.login()).await;

    let op = operator.clone();
    let out = blocking(move || op.fire_drain("prod-1", &["--detach"], &[])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = submitted_id(&text(&out.stderr));

    // `rct watch` says why while it waits (the deadline is two minutes away).
    let home = operator.home.path().to_owned();
    let told = blocking(move || {
        let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_rct"))
            .args(["watch", &id.to_string()])
            .env("RCT_HOME", &home)
            .env_remove("RCT_CONTEXT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = watch.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("is not started yet") {
                    let _ = tx.send(line);
                    return;
                }
            }
        });
        let told = rx.recv_timeout(Duration::from_secs(30));
        let _ = watch.kill();
        let _ = watch.wait();
        told.expect("rct watch told the operator why it has not started")
    })
    .await;
    assert!(told.contains("does not trust"), "{told}");

    let op = operator.clone();
    let status = blocking(move || op.rct(&["status", &id.to_string()])).await;
    assert!(
        text(&status.stdout).contains("refused by its agent"),
        "{}",
        text(&status.stdout)
    );
    let history = replay::command_history(&js, id).await.unwrap();
    assert!(
        !has(&history, |k| matches!(k, Kind::Started(_))),
        "{history:#?}"
    );
    shutdown.cancel();
}

/// `rct agents`: the live agents, and every place the catalog has no live agent for; one
/// time format; `--output json` one object per line, like every other verb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lists_the_targets_no_agent_serves() {
    let (_hub, shutdown, operator) = running().await;
    let op = operator.clone();
    let text_out = blocking(move || op.rct(&["agents"])).await;
    let listing = text(&text_out.stdout);
    assert_eq!(
        text_out.status.code(),
        Some(0),
        "{}",
        text(&text_out.stderr)
    );
    let row = |target: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(target))
            .unwrap_or_else(|| panic!("no {target} row:\n{listing}"))
            .to_owned()
    };
    assert!(!row("prod-1").contains("no agent"), "{listing}");
    let since = row("prod-1").split_whitespace().nth(4).unwrap().to_owned();
    assert!(
        since.len() == 10 && since.as_bytes()[4] == b'-',
        "{listing}"
    );
    for target in ["prod-2", "prod-3", "prod-4", "_"] {
        assert!(row(target).contains("no agent"), "{target}: {listing}");
    }
    let op = operator.clone();
    let json_out = blocking(move || op.rct(&["agents", "--output", "json"])).await;
    let objects: Vec<serde_json::Value> = text(&json_out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let live = |target: &str| {
        objects
            .iter()
            .find(|o| o["target"] == target)
            .map(|o| o["live"].clone())
    };
    assert_eq!(live("prod-1"), Some(true.into()), "{objects:?}");
    assert_eq!(live("prod-2"), Some(false.into()), "{objects:?}");
    assert_eq!(objects.len(), 5, "{objects:?}");
    shutdown.cancel();
}

/// NATS restarts while a command is watched: rct says it is reconnecting, then that it is
/// back, and the watch goes on to the outcome having shown every event of the command once.
#[tokio::test]
async fn a_lost_connection_mid_watch_is_said_and_no_event_is_missed_or_repeated() {
    let mut hub = Hub::start().await;
    let shutdown = CancellationToken::new();
    hub.provision().await;
    let key = hub.admission(&shutdown).await;
    // A drain slow enough to span the restart: twenty steps over about six seconds.
    let connection = hub.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
    let client = connection.connect("agent", true).await.unwrap();
    let tower = rct_agents::Tower::new("traffic")
        .cluster("prod-1")
        .operation("drain-cluster", |ctx, _params| async move {
            for step in 1..=20u32 {
                ctx.progress(step * 5, format!("step {step}"), "moving traffic");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(rct_agents::Outcome::new("prod-1 drained"))
        })
        .trust(key)
        .config(rct_agents::Config {
            nats: connection,
            instance: "agent-prod-1".into(),
            ..rct_agents::Config::default()
        });
    let agent = shutdown.clone();
    tokio::spawn(async move { tower.run(client, agent).await.unwrap() });
    let op = Arc::new(hub.operator());
    let login = op.clone();
    blocking(move || login.login()).await;
    let watch = Background::start(
        &op,
        &[
            "traffic",
            "drain-cluster",
            "--cluster",
            "prod-1",
            "-j",
            "SRE-1",
            "--output",
            "json",
        ],
        &[],
    );
    let started = Instant::now();
    while !watch.printed().contains("\"started\"") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}{}",
            watch.said(),
            watch.printed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.server.restart().await;
    watch
        .until_said(
            "NATS connection lost: reconnecting…",
            Duration::from_secs(10),
        )
        .await;
    watch
        .until_said("reconnected to NATS", Duration::from_secs(30))
        .await;
    let stdout = watch.stdout.clone();
    // The drain has about five seconds to go: the watch resumes at once, not when the pull
    // that was waiting times out (tens of seconds later).
    let (code, said) = watch.exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "{said}");
    let printed: Vec<u64> = stdout
        .lock()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| v["sequence"].as_u64().unwrap())
        .collect();
    let id: CommandId = stdout
        .lock()
        .unwrap()
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["command_id"].as_str().and_then(|id| id.parse().ok()))
        .expect("the first line names the command");
    let stored: Vec<u64> = replay::command_history(&admin(&hub).await, id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.sequence)
        .collect();
    assert_eq!(printed, stored, "every event once, in order:\n{said}");
    assert!(stored.len() > 5, "progress across the restart: {stored:?}");
}
