//! A hub nats-server running the shipped `ops/nats/accounts.conf` (every identity of
//! `ops/nats/identities.conf` given a freshly generated nkey), and the rct components, each
//! connected as its own identity.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rct_agents::{Context, Failure, Outcome, Params, Tower};
use rct_streams::Connection;
use rct_streams::testkit::{Server, Setup};
use tokio_util::sync::CancellationToken;

pub const RCT: &str = env!("CARGO_BIN_EXE_rct");

/// The identity provider the hub's admission trusts (no development issuer runs next to a
/// real one), and the key it signs id_tokens with.
const IDP: &str = "https://idp.test";
const IDP_KEY: &str = include_str!("../../../admission/tests/fixtures/idp-rsa.key");
const IDP_PUB: &str = include_str!("../../../admission/tests/fixtures/idp-rsa.pub");

/// An id_token of the hub's identity provider for alice (sre_team), valid for an hour.
fn idp_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": IDP, "aud": "rct", "sub": "alice", "email": "alice@example.com",
        "groups": ["sre_team"], "iat": now, "exp": now + 3600,
    });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(IDP_KEY.as_bytes()).unwrap();
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

pub fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// One identity of identities.conf: its variable name and the seed file that proves it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub seed_file: PathBuf,
    pub public: String,
}

/// The shipped identities.conf with every key replaced by a new one, and the seeds.
pub fn identities(dir: &Path) -> (String, BTreeMap<String, Identity>) {
    let shipped = std::fs::read_to_string(ops().join("nats/identities.conf")).unwrap();
    let mut out = String::new();
    let mut ids = BTreeMap::new();
    for line in shipped.lines() {
        match line.split_once(':') {
            Some((name, _)) if name.starts_with("RCT_NKEY_") => {
                let pair = nkeys::KeyPair::new_user();
                let seed_file = dir.join(format!("{name}.nk"));
                std::fs::write(&seed_file, pair.seed().unwrap()).unwrap();
                out.push_str(&format!("{name}: {}\n", pair.public_key()));
                ids.insert(
                    name.trim_start_matches("RCT_NKEY_").to_lowercase(),
                    Identity {
                        seed_file,
                        public: pair.public_key(),
                    },
                );
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    (out, ids)
}

/// The hub with accounts and permissions as shipped.
#[derive(Debug)]
pub struct Hub {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub ids: BTreeMap<String, Identity>,
    pub leaf_port: u16,
}

impl Hub {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (identities, ids) = identities(dir.path());
        let accounts = std::fs::read_to_string(ops().join("nats/accounts.conf")).unwrap();
        let leaf_port = rct_streams::testkit::free_port();
        let server = Server::start_with(Setup {
            extra: format!(
                "leafnodes {{ listen: 127.0.0.1:{leaf_port} }}\ninclude ./accounts.conf\n"
            ),
            files: vec![
                ("accounts.conf".into(), accounts),
                ("identities.conf".into(), identities),
            ],
            domain: Some("hub".into()),
            ..Setup::default()
        })
        .await;
        Self {
            server,
            dir,
            ids,
            leaf_port,
        }
    }

    /// How `who` (an identity: `admin`, `agent_traffic_prod1`, …) connects, with `inbox`.
    pub fn connection(&self, who: &str, inbox: &str) -> Connection {
        Connection {
            nkey_file: Some(self.id(who).seed_file.clone()),
            inbox_prefix: Some(inbox.into()),
            timeout: Duration::from_secs(5),
            ..Connection::to([self.server.url()])
        }
    }

    pub fn id(&self, who: &str) -> &Identity {
        self.ids
            .get(who)
            .unwrap_or_else(|| panic!("no identity {who} in ops/nats/identities.conf"))
    }

    /// Permission refusals the server has logged so far.
    pub fn violations(&self) -> Vec<String> {
        self.server
            .log()
            .lines()
            .filter(|l| l.contains(" Violation - "))
            .map(String::from)
            .collect()
    }

    /// The admission config every component of these tests shares.
    pub fn admission_config(&self, who: &str, inbox: &str) -> rct_admission::Config {
        rct_admission::Config {
            nats: self.connection(who, inbox),
            instance: "secure".into(),
            catalog: ops().join("catalog.example.yaml"),
            signing_key: self.dir.path().join("admission.key"),
            generate_key: true,
            issuers: vec![rct_admission::identity::IssuerConfig {
                keys: vec![rct_admission::identity::KeyConfig {
                    pem: Some(IDP_PUB.into()),
                    ..Default::default()
                }],
                ..rct_admission::identity::IssuerConfig::new(
                    IDP,
                    "rct",
                    jsonwebtoken::Algorithm::RS256,
                )
            }],
            ..rct_admission::Config::default()
        }
    }

    /// The admin provisions everything (streams, buckets, every tower's consumer).
    pub async fn provision(&self) {
        let config = self.admission_config("admin", "_INBOX_admin");
        let client = config.nats.connect("admin", false).await.unwrap();
        let js = config.nats.jetstream(client);
        rct_admission::provision(&js, &config).await.unwrap();
    }

    /// Admission (deciding) as its own identity; returns its public key once it serves.
    pub async fn admission(&self, shutdown: &CancellationToken) -> rct_bus::PublicKey {
        self.admission_with(shutdown, |_| {}).await.0
    }

    /// Admission with settings changed by `change`; its task ends once `shutdown` fires and
    /// it has stopped.
    pub async fn admission_with(
        &self,
        shutdown: &CancellationToken,
        change: impl FnOnce(&mut rct_admission::Config),
    ) -> (rct_bus::PublicKey, tokio::task::JoinHandle<()>) {
        let mut config = rct_admission::Config {
            role: rct_admission::Role::Decide,
            ..self.admission_config("admission", "_INBOX_admission")
        };
        change(&mut config);
        let client = config.nats.connect("admission", false).await.unwrap();
        let admission = rct_admission::Admission::new(config, client).unwrap();
        let key = admission.public_key().clone();
        let shutdown = shutdown.clone();
        let task = tokio::spawn(async move { admission.run(shutdown).await.unwrap() });
        (key, task)
    }

    /// The notifier as its own identity, posting to `url`.
    pub async fn notifier(&self, url: &str, shutdown: &CancellationToken) {
        let mut config = rct_admission::Config {
            role: rct_admission::Role::Notify,
            ..self.admission_config("notifier", "_INBOX_notifier")
        };
        config
            .notify
            .channels
            .insert("rct-events".into(), url.into());
        let client = config.nats.connect("notifier", false).await.unwrap();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { rct_admission::run(config, client, shutdown).await.unwrap() });
    }

    /// An agent of `traffic` for `target`, as its own identity, through `connection`.
    pub async fn traffic_agent(
        &self,
        target: &str,
        connection: Connection,
        trusted: rct_bus::PublicKey,
        shutdown: &CancellationToken,
    ) {
        let client = connection.connect("agent", true).await.unwrap();
        let config = rct_agents::Config {
            nats: connection,
            instance: format!("agent-{target}"),
            heartbeat: Duration::from_secs(1),
            ..rct_agents::Config::default()
        };
        let tower = Tower::new("traffic")
            .cluster(target)
            .operation("drain-cluster", drain)
            .trust(trusted)
            .config(config);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { tower.run(client, shutdown).await.unwrap() });
    }

    /// The whole system on its identities, until `shutdown`: provisioned, admission
    /// deciding, the prod-1 traffic agent serving, and an operator (alice, sre_team) logged in.
    pub async fn running(&self, shutdown: &CancellationToken) -> Arc<Operator> {
        self.provision().await;
        let key = self.admission(shutdown).await;
        let agent = self.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
        self.traffic_agent("prod-1", agent, key, shutdown).await;
        // Running once the agent is present (certified by admission, heartbeating).
        let admin = self.connection("admin", "_INBOX_admin");
        let js = admin.jetstream(admin.connect("admin", false).await.unwrap());
        let agents = js.get_key_value("rct_agents").await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let mut keys = agents.keys().await.unwrap();
                while let Some(key) = futures::StreamExt::next(&mut keys).await {
                    if key.is_ok_and(|k| k.starts_with("traffic.prod-1.")) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the prod-1 agent is present");
        let operator = Arc::new(self.operator());
        let op = operator.clone();
        tokio::task::spawn_blocking(move || op.login())
            .await
            .unwrap();
        operator
    }

    /// An operator's `rct`, with a context connecting as the `operator` identity.
    pub fn operator(&self) -> Operator {
        let operator = Operator {
            home: tempfile::tempdir().unwrap(),
            id_token: Some(idp_token()),
        };
        let seed = self.id("operator").seed_file.display().to_string();
        operator.ok(&[
            "context",
            "set",
            "hub",
            "--server",
            &self.server.url(),
            "--nkey",
            &seed,
        ]);
        operator
    }
}

/// The traffic agent for prod-1 with `config`, counting its drains in `runs`.
pub async fn spawn_traffic_agent(
    config: rct_agents::Config,
    runs: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: &CancellationToken,
) {
    let client = config.nats.connect("agent", true).await.unwrap();
    let tower = Tower::new("traffic")
        .cluster("prod-1")
        .operation("drain-cluster", move |ctx, params| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drain(ctx, params)
        })
        .config(config);
    let shutdown = shutdown.clone();
    tokio::spawn(async move { tower.run(client, shutdown).await.unwrap() });
}

/// The drain the tests run: a few progress steps, then done.
async fn drain(ctx: Context, _params: Params) -> Result<Outcome, Failure> {
    for step in 1..=3u32 {
        ctx.progress(step * 33, format!("step {step}"), "moving traffic");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Outcome::new(format!("{} drained", ctx.target())))
}

/// The `rct` binary with its own home.
#[derive(Debug)]
pub struct Operator {
    pub home: tempfile::TempDir,
    /// The id_token it logs in with; `None`: the development issuer's.
    pub id_token: Option<String>,
}

impl Operator {
    pub fn rct(&self, args: &[&str]) -> Output {
        self.rct_with(args, &[])
    }

    /// `rct` with extra environment variables.
    pub fn rct_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(RCT)
            .args(args)
            .envs(env.iter().copied())
            .env("RCT_HOME", self.home.path())
            .env_remove("RCT_CONTEXT")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Logs in as alice (sre_team), with its id_token or through the development issuer,
    /// retrying while admission starts.
    pub fn login(&self) {
        let started = std::time::Instant::now();
        let token_file = self.home.path().join("id_token");
        let args: Vec<&str> = match &self.id_token {
            Some(token) => {
                std::fs::write(&token_file, token).unwrap();
                vec!["login", "--token-file", token_file.to_str().unwrap()]
            }
            None => vec!["login", "--dev", "--user", "alice", "--groups", "sre_team"],
        };
        loop {
            let out = self.rct(&args);
            if out.status.success() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "login never succeeded: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `rct traffic drain-cluster --cluster <cluster> -j SRE-101 <extra>` with `env`, as is.
    pub fn fire_drain(&self, cluster: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut args = vec![
            "traffic",
            "drain-cluster",
            "--cluster",
            cluster,
            "-j",
            "SRE-101",
        ];
        args.extend(extra);
        self.rct_with(&args, env)
    }

    /// Drains `cluster`, asserting success; stdout.
    pub fn drain(&self, cluster: &str) -> String {
        let out = self.fire_drain(cluster, &[], &[]);
        assert!(
            out.status.success(),
            "the drain failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `args`, asserting success; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.rct(args);
        assert!(
            out.status.success(),
            "rct {args:?} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A webhook receiver answering 200 to everything; the bodies it got.
pub fn webhook() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Read, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, bodies)
}
