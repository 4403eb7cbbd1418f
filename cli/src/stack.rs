//! The whole system on one machine, for `rct dev` and `rct demo`: a nats-server child process
//! (JetStream in a local folder, domain `hub`), the topology provisioned, admission with the
//! development issuer and a key generated on first use, and the demo towers (traffic agents
//! for prod-1..4 on a simulated load balancer, workloads through the script runner).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rct_agents::demo::{LoadBalancer, traffic_tower};
use rct_agents::script::Scripts;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::exit::{Error, Result};

/// The demo catalog and the workloads scripts, shipped inside the binary.
const CATALOG: &str = include_str!("../../ops/catalog.example.yaml");
const WORKLOADS: &str = include_str!("../../ops/examples/workloads.yaml");
const SCRIPTS: [(&str, &str); 5] = [
    (
        "failover.py",
        include_str!("../../ops/examples/failover.py"),
    ),
    (
        "restart-workload.py",
        include_str!("../../ops/examples/restart-workload.py"),
    ),
    ("scale.py", include_str!("../../ops/examples/scale.py")),
    (
        "set-secret.py",
        include_str!("../../ops/examples/set-secret.py"),
    ),
    (
        "delete-workload.py",
        include_str!("../../ops/examples/delete-workload.py"),
    ),
];
/// util-linux's `setpriv`, which starts nats-server with a parent-death signal.
const SETPRIV: &str = "/usr/bin/setpriv";
/// The workloads agents' secret key file in the state folder (it replaces the example key).
const WORKLOADS_KEY: &str = "workloads.agekey";
/// The traffic tower's targets in the demo catalog.
const TARGETS: [&str; 4] = ["prod-1", "prod-2", "prod-3", "prod-4"];
/// Where `ops/bootstrap` installs nats-server in this source tree.
const BOOTSTRAPPED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../.tools/nats/bin/nats-server"
);

/// A running local stack. Its nats-server runs in a process group of its own (a Ctrl-C at
/// the terminal reaches `rct` only, which stops everything in order) and, where `setpriv` is
/// available, is sent TERM should `rct` die.
#[derive(Debug)]
pub struct Stack {
    server: Child,
    /// The client URL.
    pub url: String,
    /// Where its state lives.
    pub dir: PathBuf,
    /// Stops the agents (first).
    agents_stop: CancellationToken,
    /// Stops admission (once the agents are done).
    admission_stop: CancellationToken,
    agents: Vec<JoinHandle<()>>,
    admission: Vec<JoinHandle<()>>,
    /// The admission in process (to reload its catalog).
    admitting: Option<rct_admission::Admission>,
    /// Agents of scripts files given with `rct dev --scripts`, restarted when a file changes.
    scripted: Vec<Scripted>,
    client: Option<async_nats::Client>,
}

/// Towers of your own for `rct dev`: a catalog in place of the demo's, and scripts files.
#[derive(Clone, Debug, Default)]
pub struct Own {
    /// The catalog admission serves (watched); the demo's when `None`.
    pub catalog: Option<PathBuf>,
    /// Scripts files, an agent each (watched).
    pub scripts: Vec<PathBuf>,
}

/// An agent of one scripts file.
#[derive(Debug)]
struct Scripted {
    file: PathBuf,
    /// The file's bytes it runs.
    bytes: Vec<u8>,
    tower: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// What [`Stack::reload`] found.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// One line per change or refusal, for the person at the terminal.
    pub said: Vec<String>,
}

/// The nats-server to run: `$NATS_SERVER_BIN`, then `PATH`, then this tree's bootstrap folder.
fn nats_server() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    if let Some(bin) = on_path {
        return Ok(bin);
    }
    let local = PathBuf::from(BOOTSTRAPPED);
    if local.is_file() {
        return Ok(local);
    }
    Err(Error::usage(
        "nats-server not found: run ops/bootstrap (installs nats-server 2.15.1 into .tools/nats), \
         put nats-server >= 2.11 on PATH, or set NATS_SERVER_BIN",
    ))
}

impl Stack {
    /// Starts everything, state in `dir`, NATS on `port`, with the demo towers; returns once
    /// the agents are live.
    pub async fn start(dir: &Path, port: u16) -> Result<Self> {
        Self::start_with(dir, port, &Own::default()).await
    }

    /// [`Stack::start`], with towers of your own: `own.catalog` in place of the demo's (the
    /// demo towers run for those of its towers they are: `traffic`, `workloads` without a
    /// scripts file of its own) and an agent per scripts file.
    pub async fn start_with(dir: &Path, port: u16, own: &Own) -> Result<Self> {
        let (mut stack, client) = Self::nats(dir, port).await?;
        let recipient = stack.workloads_key()?;
        let trusted = match &own.catalog {
            None => stack.admission(
                &client,
                &CATALOG.replace(rct_bus::sealed::EXAMPLE_RECIPIENT, &recipient),
            )?,
            Some(path) => {
                let path = path.canonicalize().map_err(|e| {
                    Error::usage(format!("cannot use the catalog {}: {e}", path.display()))
                })?;
                stack.admission_from(&client, &path)?
            }
        };
        stack.wait_for_admission(&client).await?;
        let js = async_nats::jetstream::new(client.clone());
        let served = rct_admission::catalog::load(&stack.catalog_file())
            .map_err(|e| Error::usage(e.to_string()))?;
        let agent_config = stack.agent_config();
        let mut expected = 0;
        // Your scripts files first: a workloads file of yours replaces the demo's.
        stack.client = Some(client.clone());
        for file in &own.scripts {
            let file = file.canonicalize().map_err(|e| {
                Error::usage(format!(
                    "cannot use the scripts file {}: {e}",
                    file.display()
                ))
            })?;
            let bytes = std::fs::read(&file).unwrap_or_default();
            let scripts = Scripts::load(&file).map_err(Error::usage)?;
            let tower = scripts.tower.clone();
            let mut scripted = Scripted {
                file,
                bytes,
                tower,
                stop: stack.agents_stop.child_token(),
                task: None,
            };
            stack.run_scripts(&mut scripted, scripts, &trusted);
            stack.scripted.push(scripted);
            expected += 1;
        }
        // The demo towers, for those of the catalog's towers no scripts file of yours serves.
        let mine: Vec<String> = stack.scripted.iter().map(|s| s.tower.clone()).collect();
        let mine = |tower: &str| mine.iter().any(|t| t == tower);
        if served.towers.contains_key("traffic") && !mine("traffic") {
            let lb = LoadBalancer::open(&js)
                .await
                .map_err(|e| Error::usage(format!("cannot open the demo load balancer: {e}")))?;
            let targets: Vec<String> = TARGETS.map(String::from).to_vec();
            for target in TARGETS {
                let tower = traffic_tower(lb.clone(), target, targets.clone())
                    .trust(trusted.clone())
                    .config(agent_config.clone());
                stack.spawn(tower, &client);
                expected += 1;
            }
        }
        if served.towers.contains_key("workloads") && !mine("workloads") {
            let examples = stack.dir.join("examples");
            write_scripts(&examples)?;
            let scripts = Scripts::load(&examples.join("workloads.yaml"))
                .map_err(|e| Error::usage(format!("cannot load the workloads scripts: {e}")))?;
            let workloads_config = rct_agents::Config {
                secret_keys: vec![stack.dir.join(WORKLOADS_KEY)],
                ..agent_config
            };
            stack.spawn(
                scripts.tower().trust(trusted).config(workloads_config),
                &client,
            );
            expected += 1;
        }
        stack.wait_for_agents(&js, expected).await?;
        Ok(stack)
    }

    /// The catalog file admission serves.
    pub fn catalog_file(&self) -> PathBuf {
        self.admitting
            .as_ref()
            .map(|a| a.catalog_file().to_owned())
            .unwrap_or_else(|| self.dir.join("catalog.yaml"))
    }

    /// Runs (or runs again) the agent of one scripts file.
    fn run_scripts(
        &mut self,
        scripted: &mut Scripted,
        scripts: Scripts,
        trusted: &rct_bus::PublicKey,
    ) {
        let config = rct_agents::Config {
            secret_keys: vec![self.dir.join(WORKLOADS_KEY)],
            ..self.agent_config()
        };
        let tower = scripts.tower().trust(trusted.clone()).config(config);
        let client = self.client.clone().expect("connected before agents start");
        let run = tower.run(client, scripted.stop.clone());
        let file = scripted.file.display().to_string();
        scripted.task = Some(tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::error!(error = %e, %file, "the agent of this scripts file stopped");
            }
        }));
    }

    /// Looks at the catalog and the scripts files: a changed catalog is reloaded by admission
    /// (checked first; the one in force stays when it is not sound), a changed scripts file
    /// is checked and its agent restarted with it (the running one stays when it is not
    /// sound). What happened, in lines for the terminal.
    pub async fn reload(&mut self) -> Reloaded {
        let mut said = Vec::new();
        // After a new catalog, an agent that stopped (its start-up check refused the old
        // one) is started again.
        let mut catalog_reloaded = false;
        if let Some(admission) = self.admitting.clone()
            && admission.catalog_file_changed()
        {
            match admission.reload("the catalog file changed (rct dev)").await {
                rct_admission::Reload::Loaded { from, to } => {
                    catalog_reloaded = true;
                    said.push(format!("catalog reloaded: {from} -> {to}"));
                }
                rct_admission::Reload::Unchanged(version) => {
                    said.push(format!("catalog unchanged ({version})"));
                }
                rct_admission::Reload::Refused(error) => said.push(format!(
                    "{error}\nthe catalog in force stays: fix the file and save it again"
                )),
                rct_admission::Reload::Unserved(message) => said.push(message),
            }
        }
        let trusted = self.admitting.as_ref().map(|a| a.public_key());
        let mut scripted = std::mem::take(&mut self.scripted);
        for agent in &mut scripted {
            let bytes = std::fs::read(&agent.file).unwrap_or_default();
            let stopped = agent.task.as_ref().is_some_and(|t| t.is_finished());
            if bytes == agent.bytes && !(catalog_reloaded && stopped) {
                continue;
            }
            agent.bytes = bytes;
            let file = agent.file.display().to_string();
            let scripts = match Scripts::load(&agent.file) {
                Ok(scripts) => scripts,
                Err(e) => {
                    said.push(format!(
                        "{e}\nthe agent keeps the scripts it had: fix the file and save it again"
                    ));
                    continue;
                }
            };
            // Checked against the catalog in force before the running agent is stopped.
            if let Some(admission) = &self.admitting {
                let problems = scripts.problems(&admission.catalog());
                if !problems.is_empty() {
                    said.push(format!(
                        "{file} does not fit the catalog in force:\n  {}\nthe agent keeps the \
                         scripts it had: fix the file (or the catalog) and save it again",
                        problems.join("\n  ")
                    ));
                    continue;
                }
            }
            // The old agent finishes what it runs, then the new one takes over.
            agent.stop.cancel();
            if let Some(mut task) = agent.task.take()
                && tokio::time::timeout(Duration::from_secs(15), &mut task)
                    .await
                    .is_err()
            {
                task.abort();
                said.push(format!(
                    "{file}: the old agent did not stop within 15 s and was stopped"
                ));
            }
            agent.stop = self.agents_stop.child_token();
            agent.tower = scripts.tower.clone();
            let operations: Vec<String> = scripts.operations.keys().cloned().collect();
            let tower = scripts.tower.clone();
            if let Some(trusted) = &trusted {
                self.run_scripts(agent, scripts, trusted);
            }
            said.push(format!(
                "{file} reloaded: tower {tower}, operations {}",
                operations.join(", ")
            ));
        }
        self.scripted = scripted;
        Reloaded { said }
    }

    /// Starts nats-server alone, with the topology provisioned.
    pub async fn nats(dir: &Path, port: u16) -> Result<(Self, async_nats::Client)> {
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::usage(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create the state folder", &e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| fail("cannot use the state folder", &e))?;
        let conf = dir.join("nats.conf");
        // A name of its own, so the server answering on the port is known to be this one.
        let name = format!(
            "rct-dev-{}",
            rct_bus::CommandId::generate().to_string().to_lowercase()
        );
        std::fs::write(
            &conf,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nlog_file: {log:?}\n\
                 pid_file: {pid:?}\n\
                 jetstream {{\n  store_dir: {store:?}\n  domain: hub\n}}\n",
                log = dir.join("nats.log"),
                pid = dir.join("nats.pid"),
                store = dir.join("jetstream"),
            ),
        )
        .map_err(|e| fail("cannot write the nats-server config", &e))?;
        let bin = nats_server()?;
        let setpriv = Path::new(SETPRIV);
        let mut command = if pdeathsig_works(setpriv) {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "TERM", "--"]).arg(&bin);
            command
        } else {
            Command::new(&bin)
        };
        use std::os::unix::process::CommandExt as _;
        let server = command
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| fail(&format!("cannot start {}", bin.display()), &e))?;
        let agents_stop = CancellationToken::new();
        let mut stack = Self {
            server,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
            admission_stop: CancellationToken::new(),
            agents_stop,
            agents: Vec::new(),
            admission: Vec::new(),
            admitting: None,
            scripted: Vec::new(),
            client: None,
        };
        let client = stack.wait_for_nats(&name, port).await?;
        let js = async_nats::jetstream::new(client.clone());
        rct_streams::provision(&js, &rct_streams::Config::default())
            .await
            .map_err(|e| fail("cannot provision the streams", &e))?;
        Ok((stack, client))
    }

    /// The workloads agents' secret key, made on first use (as `rct-agent keygen` does); its
    /// public half.
    fn workloads_key(&self) -> Result<String> {
        let fail = |e: &dyn std::fmt::Display| {
            Error::usage(format!("cannot make the workloads secret key: {e}"))
        };
        let path = self.dir.join(WORKLOADS_KEY);
        match std::fs::read_to_string(&path) {
            Ok(text) => rct_bus::sealed::Keys::parse(&text)
                .map(|keys| keys.recipients().join(", "))
                .map_err(|e| fail(&format!("{}: {e}", path.display()))),
            Err(_) => rct_agents::cli::Task::Keygen { out: path }
                .run()
                .map_err(|e| fail(&format!("{e:#}"))),
        }
    }

    /// Starts admission in-process with `catalog` and the development issuer; its public key.
    pub fn admission(
        &mut self,
        client: &async_nats::Client,
        catalog: &str,
    ) -> Result<rct_bus::PublicKey> {
        let path = self.dir.join("catalog.yaml");
        std::fs::write(&path, catalog)
            .map_err(|e| Error::usage(format!("cannot write the catalog: {e}")))?;
        self.admission_from(client, &path)
    }

    /// Starts admission in-process with the catalog file at `path`; its public key.
    pub fn admission_from(
        &mut self,
        client: &async_nats::Client,
        path: &Path,
    ) -> Result<rct_bus::PublicKey> {
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::usage(format!("{what}: {e}"));
        let path = path.to_owned();
        let admission = rct_admission::Admission::new(
            rct_admission::Config {
                nats: rct_streams::Connection::to([self.url.clone()]),
                instance: "dev".into(),
                catalog: path,
                signing_key: self.dir.join("admission.key"),
                generate_key: true,
                dev_issuer: true,
                ..rct_admission::Config::default()
            },
            client.clone(),
        )
        .map_err(|e| fail("cannot start admission", &e))?;
        // Its public half is in admission.pub, next to the generated key.
        let trusted = admission.public_key();
        self.admitting = Some(admission.clone());
        let shutdown = self.admission_stop.clone();
        self.admission.push(tokio::spawn(async move {
            if let Err(e) = admission.run(shutdown).await {
                tracing::error!(error = %e, "admission stopped");
            }
        }));
        Ok(trusted)
    }

    /// Waits until admission answers requests (its development issuer).
    pub async fn wait_for_admission(&self, client: &async_nats::Client) -> Result<()> {
        let started = Instant::now();
        let probe = prost::Message::encode_to_vec(&rct_bus::proto::DevTokenRequest::default());
        while client
            .request(rct_bus::Subject::DevToken.to_string(), probe.clone().into())
            .await
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::usage("admission did not start within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Settings for in-process agents of this stack.
    pub fn agent_config(&self) -> rct_agents::Config {
        rct_agents::Config {
            nats: rct_streams::Connection::to([self.url.clone()]),
            instance: "dev".into(),
            create_consumer: true,
            ..rct_agents::Config::default()
        }
    }

    /// Runs an agent in-process until the stack stops.
    pub fn spawn(&mut self, tower: rct_agents::Tower, client: &async_nats::Client) {
        let run = tower.run(client.clone(), self.agents_stop.clone());
        self.agents.push(tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::error!(error = %e, "an agent stopped");
            }
        }));
    }

    /// Connects once nats-server serves, checking that the server answering is this stack's
    /// own child (named `name`), not another one already on `port`.
    async fn wait_for_nats(&mut self, name: &str, port: u16) -> Result<async_nats::Client> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default();
                let last: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(Error::usage(format!(
                    "nats-server exited ({status}); is the port taken? Its log ends with:\n{}",
                    last.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
            if let Ok(client) = async_nats::connect(&self.url).await {
                let answering = client.server_info().server_name;
                if answering != name {
                    let _ = self.server.kill();
                    return Err(Error::usage(format!(
                        "port {port} is already taken by another server ({answering:?}), so \
                         this stack's nats-server cannot listen there; stop that one, or choose \
                         another port with --port"
                    )));
                }
                if async_nats::jetstream::new(client.clone())
                    .query_account()
                    .await
                    .is_ok()
                {
                    return Ok(client);
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::usage("nats-server did not get ready within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `count` of this stack's agents are present.
    pub async fn wait_for_agents(
        &self,
        js: &async_nats::jetstream::Context,
        count: usize,
    ) -> Result<()> {
        wait_for_agents(js, count, ".dev-", Duration::from_secs(30)).await
    }

    /// Stops in order: the agents (letting running commands finish), then admission, then
    /// nats-server.
    pub async fn stop(mut self) {
        let mut agents = std::mem::take(&mut self.agents);
        agents.extend(self.scripted.iter_mut().filter_map(|s| s.task.take()));
        for (stop, tasks) in [
            (self.agents_stop.clone(), agents),
            (
                self.admission_stop.clone(),
                std::mem::take(&mut self.admission),
            ),
        ] {
            stop.cancel();
            // All of them at once, for at most 15 s; what is still running then is stopped.
            let all = futures::future::join_all(tasks.into_iter().map(|mut task| async move {
                if tokio::time::timeout(Duration::from_secs(15), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }));
            all.await;
        }
        let _ = nix_term(&mut self.server);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.agents_stop.cancel();
        self.admission_stop.cancel();
        for task in self.agents.iter().chain(&self.admission) {
            task.abort();
        }
        for task in self.scripted.iter().filter_map(|s| s.task.as_ref()) {
            task.abort();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Whether `setpriv` can set a parent-death signal (util-linux 2.33 or later).
fn pdeathsig_works(setpriv: &Path) -> bool {
    Command::new(setpriv)
        .args(["--pdeathsig", "TERM", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn nix_term(child: &mut Child) -> std::io::Result<()> {
    // A clean stop lets JetStream flush; Drop's kill is the fallback.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    for _ in 0..50 {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill()?;
    child.wait().map(|_| ())
}

fn write_scripts(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| Error::usage(format!("cannot write the demo scripts: {e}"));
    std::fs::create_dir_all(dir).map_err(fail)?;
    std::fs::write(dir.join("workloads.yaml"), WORKLOADS).map_err(fail)?;
    for (name, text) in SCRIPTS {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    }
    Ok(())
}

/// Waits until `count` agents whose presence key contains `matching` are present, at most
/// `within`.
pub async fn wait_for_agents(
    js: &async_nats::jetstream::Context,
    count: usize,
    matching: &str,
    within: Duration,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let live = match rct_streams::journal::presences(js).await {
            Ok(live) => live
                .iter()
                .filter(|(key, _)| key.contains(matching))
                .count(),
            Err(_) => 0,
        };
        if live >= count {
            return Ok(());
        }
        if started.elapsed() > within {
            return Err(Error::usage(format!(
                "only {live} of {count} agents started within {}",
                humantime::format_duration(within)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
