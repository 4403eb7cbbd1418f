//! Real nats-server processes for tests: a single server on a free port with a temporary
//! store, restartable on the same port, killable with SIGKILL, and a three-node cluster.
//! Everything is removed when the handle is dropped.
//!
//! The binary comes from `NATS_SERVER_BIN`, else the project-local install made by
//! `ops/bootstrap`, else `PATH`.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a server may take to accept connections with JetStream ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `ops/bootstrap` installs nats-server, relative to the workspace root.
const LOCAL_INSTALL: &str = ".tools/nats/bin/nats-server";

/// The nats-server binary tests use.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(LOCAL_INSTALL);
    if local.is_file() {
        return local;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server not found: run ops/bootstrap (it installs nats-server 2.15.1 into \
             .tools/nats) or set NATS_SERVER_BIN to a nats-server >= 2.11"
        )
    })
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// How a [`Server`] differs from the default single JetStream server.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// Top-level config text appended (accounts, authorization, leafnodes, …).
    pub extra: String,
    /// Files written next to the server's config before it starts, for `include`.
    pub files: Vec<(String, String)>,
    /// The JetStream domain (as the hub has, so clients behind leaf nodes can reach it).
    pub domain: Option<String>,
    /// No JetStream at all (a leaf node in a firewalled cluster).
    pub no_jetstream: bool,
    /// `sync_interval: always`: fsync before every acknowledgement, as production runs.
    pub sync_always: bool,
}

/// A nats-server child process with JetStream and its own store directory.
#[derive(Debug)]
pub struct Server {
    name: String,
    port: u16,
    cluster: Option<ClusterPorts>,
    setup: Setup,
    dir: TempDir,
    child: Option<Child>,
}

#[derive(Clone, Debug)]
struct ClusterPorts {
    own: u16,
    routes: Vec<u16>,
}

impl Server {
    /// Starts a single server with JetStream on a free port and waits until JetStream answers.
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    /// Starts a single server set up beyond the defaults (accounts, included files, a
    /// JetStream domain, a leaf node without JetStream) and waits until it is ready.
    pub async fn start_with(setup: Setup) -> Self {
        for attempt in 1..=PORT_ATTEMPTS {
            let mut server = Self::new("s1".into(), None, setup.clone());
            server.spawn();
            match server.try_ready().await {
                Ok(()) => return server,
                Err(exited) if exited.lost_a_port() && attempt < PORT_ATTEMPTS => continue,
                Err(Exited { log }) => {
                    panic!("nats-server exited while starting; its log:\n{log}")
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn new(name: String, cluster: Option<ClusterPorts>, setup: Setup) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rct-nats-")
            .tempdir()
            .expect("a temporary directory");
        Self {
            name,
            port: free_port(),
            cluster,
            setup,
            dir,
            child: None,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port; the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory; kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// A connected client that retries forever and logs connection events.
    pub async fn client(&self) -> async_nats::Client {
        connect(&[self.url()]).await
    }

    /// A JetStream context on a fresh client.
    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// The process id, while it runs (a chaos run reads its state from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no shutdown, no flush. The store stays for [`Server::start_again`]. The exit
    /// status says whether the kill is what ended it.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes (connections stay open, nothing is answered).
    pub fn pause(&mut self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&mut self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&mut self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Starts the server again on the same port with the same store, after a kill or stop.
    pub async fn start_again(&mut self) {
        assert!(!self.is_running(), "{} is still running", self.name);
        // While it was down, another process's connection may have taken its port for a
        // moment: wait for the port rather than move (clients know this one).
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.spawn();
            match self.try_ready().await {
                Ok(()) => return,
                Err(exited) if exited.lost_a_port() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Exited { log }) => panic!(
                    "nats-server {} exited while starting again; its log:\n{log}",
                    self.name
                ),
            }
        }
    }

    /// Stops cleanly and starts again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_again().await;
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Waits until the server's log contains `needle` (a leaf connection, a route).
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{} never logged {needle:?} within {READY_TIMEOUT:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the config as `setup` says and has the running server reload it (SIGHUP):
    /// users and permissions change under connected clients. Returns once the log says so.
    pub async fn reconfigure(&mut self, setup: Setup) {
        let reloads = |log: &str| log.matches("Reloaded server configuration").count();
        let before = reloads(&self.log());
        self.setup = setup;
        self.write_config();
        self.signal(Signal::SIGHUP);
        let deadline = Instant::now() + READY_TIMEOUT;
        while reloads(&self.log()) == before {
            assert!(
                Instant::now() < deadline,
                "{} did not reload its config; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn write_config(&self) -> PathBuf {
        for (name, contents) in &self.setup.files {
            fs::write(self.dir.path().join(name), contents).expect("write an included file");
        }
        let conf = self.dir.path().join("server.conf");
        fs::write(&conf, self.config()).expect("write server config");
        conf
    }

    fn spawn(&mut self) {
        let conf = self.write_config();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run ops/bootstrap or set NATS_SERVER_BIN",
                    nats_server_bin().display()
                )
            });
        self.child = Some(child);
    }

    fn config(&self) -> String {
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nlog_file: {log:?}\n",
            name = self.name,
            port = self.port,
            log = self.dir.path().join("server.log"),
        );
        if !self.setup.no_jetstream {
            let domain = self
                .setup
                .domain
                .as_ref()
                .map(|d| format!("  domain: {d}\n"))
                .unwrap_or_default();
            let sync = if self.setup.sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            };
            conf.push_str(&format!(
                "jetstream {{\n  store_dir: {store:?}\n{domain}{sync}}}\n",
                store = self.store_dir()
            ));
        }
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            conf.push_str(&format!(
                "cluster {{\n  name: rct-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                cluster.own,
                routes.join(", ")
            ));
        }
        conf.push_str(&self.setup.extra);
        conf
    }

    /// Ready, or exited while starting (with its log); panics when it takes too long.
    async fn try_ready(&mut self) -> Result<(), Exited> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !self.is_running() {
                return Err(Exited { log: self.log() });
            }
            // A plain single server is ready when JetStream answers an anonymous client;
            // clusters, servers with accounts and leaf nodes say so in their log.
            let plain =
                self.cluster.is_none() && self.setup.extra.is_empty() && !self.setup.no_jetstream;
            if plain && jetstream_ready(&self.url()).await {
                return Ok(());
            }
            if !plain && self.log().contains("Server is ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "nats-server {} not ready after {READY_TIMEOUT:?}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A server that exited while starting.
struct Exited {
    log: String,
}

impl Exited {
    /// A port picked as free was taken before the server bound it (another process's
    /// connection got it meanwhile): worth another try on other ports.
    fn lost_a_port(&self) -> bool {
        self.log.contains("address already in use")
    }
}

/// Tries to start servers this many times when a picked port is taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream context for a readiness probe: a quick connection, short requests.
async fn probe(url: &str, timeout: Duration) -> Option<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(500))
        .connect(url)
        .await
        .ok()?;
    Some(
        jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client),
    )
}

/// Whether a server at `url` accepts a connection and answers a JetStream account request.
async fn jetstream_ready(url: &str) -> bool {
    match probe(url, Duration::from_secs(1)).await {
        Some(js) => js.query_account().await.is_ok(),
        None => false,
    }
}

/// Whether the cluster at `url` has a meta leader that knows enough peers to place a
/// three-replica stream: one is created and deleted (a leader alone is not enough).
async fn replicated_stream_possible(url: &str) -> bool {
    let Some(js) = probe(url, Duration::from_secs(2)).await else {
        return false;
    };
    let probe = jetstream::stream::Config {
        name: "TESTKIT_READY".into(),
        subjects: vec!["testkit.ready".into()],
        num_replicas: 3,
        ..Default::default()
    };
    if js.get_or_create_stream(probe).await.is_err() {
        return false;
    }
    js.delete_stream("TESTKIT_READY").await.is_ok()
}

async fn connect(urls: &[String]) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| u.parse().expect("a server address"))
        .collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            tracing::debug!(%event, "nats connection event");
        })
        .connect(addrs)
        .await
        .expect("connect to the test server")
}

/// Three JetStream servers routed into one cluster (`rct-test`), for replicated streams.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Server>,
}

impl Cluster {
    /// Starts three nodes and waits until they have elected a JetStream meta leader.
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    /// Starts three nodes set up alike (`sync_always`, extra config) and waits until they
    /// have elected a JetStream meta leader.
    pub async fn start_with(setup: Setup) -> Self {
        let mut attempt = 1;
        let nodes = loop {
            let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
            let mut nodes: Vec<Server> = cluster_ports
                .iter()
                .enumerate()
                .map(|(i, own)| {
                    let cluster = ClusterPorts {
                        own: *own,
                        routes: cluster_ports.clone(),
                    };
                    Server::new(format!("n{}", i + 1), Some(cluster), setup.clone())
                })
                .collect();
            for node in &mut nodes {
                node.spawn();
            }
            let mut failed = None;
            for node in &mut nodes {
                if let Err(exited) = node.try_ready().await {
                    failed = Some((node.name.clone(), exited));
                    break;
                }
            }
            match failed {
                None => break nodes,
                // Dropping the nodes kills the others; all start again on new ports.
                Some((_, exited)) if exited.lost_a_port() && attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                }
                Some((name, Exited { log })) => {
                    panic!("nats-server {name} exited while starting; its log:\n{log}")
                }
            }
        };
        let cluster = Self { nodes };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !replicated_stream_possible(&cluster.nodes[0].url()).await {
            assert!(
                Instant::now() < deadline,
                "the cluster cannot hold an R3 stream after {READY_TIMEOUT:?}; n1's log:\n{}",
                cluster.nodes[0].log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster
    }

    /// The client URLs of all nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Server::url).collect()
    }

    /// A client that knows every node and fails over between them.
    pub async fn client(&self) -> async_nats::Client {
        connect(&self.urls()).await
    }

    /// A JetStream context on a fresh client.
    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// Node `i` (0, 1 or 2), to kill, stop or start again.
    pub fn node(&mut self, i: usize) -> &mut Server {
        &mut self.nodes[i]
    }
}

/// `GET path` from a local HTTP listener (telemetry): the status code and the body.
pub fn http_get(address: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `GET path` until `wanted` holds for its status and body (60 s at most); the body.
pub async fn http_until(
    address: std::net::SocketAddr,
    path: &str,
    wanted: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = tokio::task::spawn_blocking({
            let path = path.to_owned();
            move || http_get(address, &path)
        })
        .await
        .expect("the probe runs");
        if let Ok((status, body)) = &answer
            && wanted(*status, body)
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{path} never as wanted: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Answers agents' enrolments on `rct.auth.enrol.>` as admission does, certifying every key
/// for the tower and target of the subject it came on with `admission`'s key for an hour:
/// for tests that run agents without admission (commands signed with a test key). Stops
/// when the handle is dropped.
pub async fn enroller(
    client: &async_nats::Client,
    admission: &rct_bus::KeyPair,
) -> tokio_util::task::AbortOnDropHandle<()> {
    use futures::StreamExt;
    use prost::Message as _;
    use rct_bus::proto::{self, enrol_response::Result as R};

    let admission = rct_bus::KeyPair::from_pem(&admission.to_pem()).expect("the key reads back");
    let mut requests = client
        .subscribe(rct_bus::subject::enrolments())
        .await
        .expect("subscribe to enrolments");
    client.flush().await.expect("flush the subscription");
    let client = client.clone();
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let Some(reply) = request.reply else { continue };
            let (Ok(rct_bus::Subject::Enrol { tower, target }), Ok(asked)) = (
                request.subject.parse::<rct_bus::Subject>(),
                proto::EnrolRequest::decode(request.payload),
            ) else {
                continue;
            };
            let Ok(key) = rct_bus::PublicKey::from_bytes(&asked.public_key) else {
                continue;
            };
            let now = std::time::SystemTime::now();
            let certificate = rct_bus::provenance::certify(
                &admission,
                &tower,
                &target,
                &asked.agent,
                &key,
                now,
                now + Duration::from_secs(3600),
            );
            let answer = proto::EnrolResponse {
                result: Some(R::Certificate(certificate)),
            };
            let _ = client.publish(reply, answer.encode_to_vec().into()).await;
        }
    }))
}
