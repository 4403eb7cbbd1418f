//! End to end: the built `rct` binary against `rct dev` (a real nats-server, admission with
//! the dev issuer, the demo towers), as an operator would use them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RCT: &str = env!("CARGO_BIN_EXE_rct");

/// `rct dev` in the background, with its own state and home; killed on drop.
struct Dev {
    child: Child,
    port: u16,
    home: tempfile::TempDir,
    _state: tempfile::TempDir,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_server() -> PathBuf {
    rct_streams::testkit::nats_server_bin()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Dev {
    fn start() -> Self {
        let home = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(state.path().join("dev.log")).unwrap();
        let port = free_port();
        let child = Command::new(RCT)
            .args(["dev", "--port", &port.to_string(), "--dir"])
            .arg(state.path().join("stack"))
            .env("RCT_HOME", home.path())
            .env("NATS_SERVER_BIN", nats_server())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let dev = Self {
            child,
            port,
            home,
            _state: state,
        };
        // Ready once it says so (the context is written before).
        let started = Instant::now();
        loop {
            let log =
                std::fs::read_to_string(dev._state.path().join("dev.log")).unwrap_or_default();
            if log.contains("rct dev is running") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "rct dev did not start:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        dev
    }

    fn rct(&self, args: &[&str]) -> Output {
        Command::new(RCT)
            .args(args)
            .env("RCT_HOME", self.home.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    /// `rct <args>` on a terminal (a pty, by util-linux script(1)): its exit code and what
    /// the terminal received.
    fn on_terminal(&self, args: &[&str]) -> (i32, String) {
        let line = shell_words::join(std::iter::once(RCT).chain(args.iter().copied()));
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("RCT_HOME", self.home.path())
            .env("SHELL", "/bin/sh")
            .stdin(Stdio::null())
            .output()
            .expect("util-linux script(1), to run rct on a pty");
        (code(&out), text(&out.stdout))
    }

    /// Publishes `event` on the dev server's event stream as its writer `n`, signed with the
    /// dev admission's key: what the stream holds is rendered safely even when its writer is
    /// who it should be.
    fn write_event(&self, tower: &str, event: &rct_bus::proto::Event, n: &str) {
        let url = format!("nats://127.0.0.1:{}", self.port);
        let key = std::fs::read_to_string(self._state.path().join("stack/admission.key")).unwrap();
        let signer =
            rct_bus::provenance::Signer::admission(rct_bus::KeyPair::from_pem(&key).unwrap());
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
            rct_streams::Publisher::new(js)
                .signing(std::sync::Arc::new(signer))
                .event(&tower.parse().unwrap(), event, n)
                .await
                .unwrap();
        });
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// `output` ended with `exit`, and `stream` (its stdout or stderr) says `needle`.
fn said(output: &Output, exit: i32, stream: &[u8], needle: &str) {
    assert_eq!(
        code(output),
        exit,
        "stdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(
        text(stream).contains(needle),
        "{needle:?} not in:\n{}",
        text(stream)
    );
}

fn ok(output: Output) -> Output {
    assert_eq!(
        code(&output),
        0,
        "stdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

#[test]
fn an_operator_session_end_to_end() {
    let dev = Dev::start();

    // Not logged in: a one-line hint.
    let out = dev.rct(&["whoami"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("run rct login"),
        "{}",
        text(&out.stderr)
    );

    // A credential helper's token goes to admission, which says what is wrong with it.
    let out = dev.rct(&["login", "--token-command", "echo not-a-jwt"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr)
            .contains("login refused (unauthenticated): the id_token is not a valid JWT"),
        "{}",
        text(&out.stderr)
    );
    let token_file = dev.home().join("token");
    std::fs::write(&token_file, "still.not.valid").unwrap();
    let out = dev.rct(&["login", "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("login refused"),
        "{}",
        text(&out.stderr)
    );

    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    let whoami = ok(dev.rct(&["whoami"]));
    assert!(text(&whoami.stdout).contains("alice@example.com"));
    let session_key = dev.home().join("contexts/dev/session.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&session_key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Discovery.
    let ops = text(&ok(dev.rct(&["ops"])).stdout);
    assert!(
        ops.contains("traffic/drain-cluster") && ops.contains("prod-1,prod-2,prod-3,prod-4"),
        "{ops}"
    );
    let describe = text(&ok(dev.rct(&["ops", "describe", "traffic/drain-cluster"])).stdout);
    assert!(
        describe.contains("--keep-percent")
            && describe.contains("an integer from 0 to 100")
            && describe.contains("locks:          {cluster}, against traffic/*")
            && describe.contains(
                "undone by:      traffic/set-weights cluster={cluster} \
                 weight={outputs.previous_weight}"
            )
            && describe.contains("rolls out:      to up to 10 targets in one request"),
        "{describe}"
    );
    let help = text(&ok(dev.rct(&["traffic", "drain-cluster", "--help"])).stdout);
    assert!(
        help.contains("--cluster") && help.contains("--justification"),
        "{help}"
    );

    // A drain succeeds, with its events.
    let out = ok(dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-1",
        "--justification",
        "SRE-101",
    ]));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("succeeded") && stdout.contains("prod-1 drained to weight 0"),
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("admitted") && stderr.contains("started by"),
        "{stderr}"
    );
    let id = stdout.split_whitespace().next().unwrap().to_owned();

    // JSON lines parse.
    let out = ok(dev.rct(&[
        "traffic",
        "set-weights",
        "--cluster",
        "prod-2",
        "--weight",
        "50",
        "-j",
        "SRE-102",
        "--output",
        "json",
    ]));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["kind"], "decision");
    assert_eq!(events.last().unwrap()["event"]["type"], "succeeded");

    // Refused by admission: exit 3 with admission's sentence.
    ok(dev.rct(&["login", "--dev", "--user", "bob", "--groups", "app_oncall"]));
    let out = dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-3",
        "--justification",
        "SRE-103",
    ]);
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(
        "bob@example.com is not in any of the groups allowed to run traffic/drain-cluster: sre_team, traffic_team"
    ));
    // Detached, the refusal is still said, and exits 3.
    let out = dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-3",
        "-j",
        "SRE-104",
        "--detach",
    ]);
    said(&out, 3, &out.stderr, "rejected (forbidden)");
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));

    // Refused before submitting: exit 2 with the catalog's rule.
    let out = dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-1",
        "--keep-percent",
        "150",
        "-j",
        "SRE-104",
    ]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("keep_percent must be an integer from 0 to 100, got 150"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("not submitted"));

    // A failing operation: exit 1.
    let out = dev.rct(&[
        "workloads",
        "scale",
        "--namespace",
        "shop",
        "--deployment",
        "cart",
        "--replicas",
        "45",
        "-j",
        "SRE-105",
    ]);
    said(&out, 1, &out.stdout, "quota exceeded");

    // Detach, then watch shows the whole history.
    let out = ok(dev.rct(&[
        "workloads",
        "restart",
        "--namespace",
        "shop",
        "--deployment",
        "cart",
        "-j",
        "deploy stuck",
        "--detach",
    ]));
    let detached = text(&out.stdout).trim().to_owned();
    let watched = ok(dev.rct(&["watch", &detached]));
    assert!(
        text(&watched.stderr).contains("admitted"),
        "{}",
        text(&watched.stderr)
    );
    assert!(text(&watched.stdout).contains("shop/cart: 3 pods restarted"));

    // Cancel stops a running operation.
    let out = ok(dev.rct(&[
        "traffic",
        "undrain-cluster",
        "--cluster",
        "prod-4",
        "--ramp",
        "60s",
        "-j",
        "SRE-106",
        "--detach",
    ]));
    let running = text(&out.stdout).trim().to_owned();
    let started = Instant::now();
    loop {
        let status = text(&dev.rct(&["status", &running]).stdout);
        if status.contains("running") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never running: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stopping it needs the justification running it needs.
    let unjustified = dev.rct(&["cancel", &running]);
    said(
        &unjustified,
        2,
        &unjustified.stderr,
        "needs a justification",
    );
    let out = dev.rct(&["cancel", &running, "-j", "SRE-107"]);
    assert_eq!(
        code(&out),
        0,
        "a cancel that cancelled did what was asked: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains(&format!("{running} is cancelled")),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("cancelled"),
        "{}",
        text(&out.stdout)
    );
    // Once more: too late, it has ended; exit 1, as the table says.
    let again = dev.rct(&["cancel", &running, "-j", "SRE-108"]);
    said(
        &again,
        1,
        &again.stderr,
        "was not cancelled: it has already ended cancelled",
    );

    // The timeline and history, from the streams alone.
    let show = text(&ok(dev.rct(&["show", &id])).stdout);
    assert!(
        show.contains("alice@example.com") && show.contains("SRE-101") && show.contains("outcome"),
        "{show}"
    );
    let history = text(&ok(dev.rct(&["history", "--since", "10m"])).stdout);
    for needle in ["SRE-101", "forbidden", "cancelled", "failed"] {
        assert!(history.contains(needle), "{needle} missing:\n{history}");
    }
    let only_rejected =
        text(&ok(dev.rct(&["history", "--since", "10m", "--outcome", "rejected"])).stdout);
    let lines: Vec<&str> = only_rejected.lines().collect();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("traffic/drain-cluster"))
            .count(),
        2,
        "{only_rejected}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("_auth/login")).count(),
        2,
        "refused logins are on record:\n{only_rejected}"
    );
    assert_eq!(lines.len(), 4, "{only_rejected}");
    let none = text(&ok(dev.rct(&["history", "--since", "10m", "--until", "9m"])).stdout);
    assert!(none.trim().is_empty(), "{none}");
    let agents = text(&ok(dev.rct(&["agents"])).stdout);
    assert!(
        agents.contains("prod-4") && agents.contains("workloads"),
        "{agents}"
    );
    let completion = text(&ok(dev.rct(&["completion", "bash"])).stdout);
    assert!(completion.contains("drain-cluster"));
}

#[test]
fn the_demo_runs_and_cleans_up() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(RCT)
        .arg("demo")
        .env("RCT_HOME", home.path())
        .env("NATS_SERVER_BIN", nats_server())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        code(&out),
        0,
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("rejected (forbidden)"), "{stderr}");
    assert!(text(&out.stdout).contains("prod-1 drained to weight 0"));
    // The drain undone: the weight it had before.
    assert!(
        stderr.contains("with traffic/set-weights cluster=prod-1 weight=100")
            && text(&out.stdout).contains("prod-1 at weight 100"),
        "{stderr}"
    );
    // The three-wave drain across prod-1..4, each wave checked healthy before the next.
    assert!(
        text(&out.stdout).contains("4 of 4 targets succeeded, in 3 waves"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(stderr.matches(": healthy").count(), 4, "{stderr}");
    // The two-approver failover: the plan shown to each approver, then the run.
    assert_eq!(
        stderr.matches("promote cart-b replica → primary").count(),
        3,
        "the plan, then each approver's view of it:
{stderr}"
    );
    assert!(stderr.contains("with 2 approvals"), "{stderr}");
    assert!(
        text(&out.stdout).contains("cart-b is primary") || stderr.contains("cart-b is primary"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(home.path()).unwrap().next().is_none(),
        "the demo leaves the operator's home alone"
    );
    // Not a terminal: no escape codes, in its own lines or in the services' logs.
    let all = text(&out.stdout) + &stderr;
    assert!(!all.contains('\x1b'), "escape codes in:\n{all}");
}

/// A submission admission cannot record under its own id (here: its certificate does not
/// verify, so the id it claims is nobody's) is refused under an id of admission's; the
/// operator hears the reason at once, watching or detached, not "admission may be down".
#[test]
fn a_refusal_recorded_under_another_id_reaches_the_operator_at_once() {
    let dev = Dev::start();
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    std::fs::write(
        dev.home().join("contexts/dev/certificate"),
        "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl",
    )
    .unwrap();
    for extra in [&[][..], &["--detach"][..]] {
        let asked = Instant::now();
        let mut args = vec![
            "traffic",
            "drain-cluster",
            "--cluster",
            "prod-1",
            "-j",
            "SRE-1",
        ];
        args.extend(extra);
        let out = dev.rct(&args);
        let said = text(&out.stderr);
        assert_eq!(code(&out), 3, "{extra:?}: {said}");
        assert!(
            said.contains("rejected (unauthenticated)")
                && said.contains("admission recorded it as"),
            "{extra:?}: {said}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "{:?}",
            asked.elapsed()
        );
    }
}

/// A command id nothing is on record for, from long ago: said at once, not waited on.
#[test]
fn watching_a_command_that_does_not_exist_says_so_at_once() {
    let dev = Dev::start();
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    for verb in ["watch", "status", "show"] {
        let asked = Instant::now();
        let out = dev.rct(&[verb, "01H00000000000000000000000"]);
        assert_eq!(code(&out), 2, "{verb}: {}", text(&out.stderr));
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "{verb} took {:?}",
            asked.elapsed()
        );
        let said = text(&out.stderr);
        assert!(said.contains("no such command"), "{verb}: {said}");
    }
}

/// `rct dev` on a port another server holds fails, and touches nothing of that server.
#[tokio::test]
async fn rct_dev_on_a_taken_port_fails_and_leaves_the_other_server_alone() {
    let other = rct_streams::testkit::Server::start().await;
    let home = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (port, home, dir) = (other.port(), home.path().to_owned(), state.path().join("s"));
        move || {
            let mut child = Command::new(RCT)
                .args(["dev", "--port", &port.to_string(), "--dir"])
                .arg(dir)
                .env("RCT_HOME", home)
                .env("NATS_SERVER_BIN", nats_server())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // It must give up on its own; one that thinks it runs is stopped and fails here.
            let started = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if started.elapsed() > Duration::from_secs(60) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGINT,
                    );
                    let out = child.wait_with_output().unwrap();
                    panic!("rct dev did not fail:\n{}", text(&out.stderr));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            child.wait_with_output().unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("port {} is already taken", other.port())),
        "{}",
        text(&out.stderr)
    );
    let js = other.jetstream().await;
    assert!(
        js.get_stream("RCT_SUBMIT").await.is_err(),
        "the other server was provisioned"
    );
}

/// `rct dev`'s nats-server: gone after SIGTERM, SIGHUP or a Ctrl-C at the terminal (which
/// reaches rct only, so it stops in order, agents first), and after rct is killed.
#[test]
fn rct_dev_never_leaves_its_nats_server_behind() {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    use std::os::unix::process::CommandExt as _;
    let alive = |pid: Pid| kill(pid, None).is_ok();
    let gone_within = |pid: Pid, within: Duration| {
        let started = Instant::now();
        while alive(pid) {
            if started.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    };
    for how in ["SIGTERM", "SIGHUP", "Ctrl-C", "SIGKILL"] {
        let home = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let log = state.path().join("dev.log");
        let mut child = Command::new(RCT)
            .args(["dev", "--port", &free_port().to_string(), "--dir"])
            .arg(state.path().join("stack"))
            .env("RCT_HOME", home.path())
            .env("NATS_SERVER_BIN", nats_server())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            // Its own group, as a shell job is: a Ctrl-C goes to the whole group.
            .process_group(0)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("rct dev is running")
        {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{how}: never started"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let nats: i32 = std::fs::read_to_string(state.path().join("stack/nats.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let (rct, nats) = (Pid::from_raw(child.id() as i32), Pid::from_raw(nats));
        // A group of its own: a Ctrl-C at the terminal does not reach it.
        let group = |pid: Pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            after_name.split(' ').nth(2).unwrap().to_owned()
        };
        assert_ne!(
            group(rct),
            group(nats),
            "{how}: nats-server shares rct's process group"
        );
        if how == "SIGKILL" && !std::path::Path::new("/usr/bin/setpriv").exists() {
            eprintln!("no setpriv here: nothing stops nats-server when rct is killed; skipped");
            let _ = kill(rct, Signal::SIGTERM);
            let _ = child.wait();
            continue;
        }
        match how {
            "SIGTERM" => kill(rct, Signal::SIGTERM).unwrap(),
            "SIGHUP" => kill(rct, Signal::SIGHUP).unwrap(),
            "Ctrl-C" => killpg(rct, Signal::SIGINT).unwrap(),
            _ => kill(rct, Signal::SIGKILL).unwrap(),
        }
        let status = child.wait().unwrap();
        assert!(
            gone_within(nats, Duration::from_secs(20)),
            "{how}: nats-server is left"
        );
        if how != "SIGKILL" {
            let said = std::fs::read_to_string(&log).unwrap();
            assert_eq!(status.code(), Some(0), "{how}: {said}");
            assert!(
                said.contains("stopping the agents, then admission, then nats-server")
                    && said.contains("stopped"),
                "{how}: {said}"
            );
        }
    }
}

/// `rct … | head -1`: the reader closing early is not an error.
#[test]
fn a_closed_pipe_ends_rct_quietly() {
    use std::io::{BufRead, BufReader};
    let home = tempfile::tempdir().unwrap();
    let mut contexts = String::from("contexts:\n");
    for i in 0..20_000 {
        contexts.push_str(&format!("  c{i}:\n    servers: [nats://127.0.0.1:4222]\n"));
    }
    std::fs::write(home.path().join("contexts.yaml"), contexts).unwrap();
    let mut child = Command::new(RCT)
        .args(["context", "list"])
        .env("RCT_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("c0"), "{first}");
    // The reader is gone (its end of the pipe dropped): rct ends with 0 and says nothing.
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The instant now, as RFC 3339 with nanoseconds (what `--since`/`--until` accept).
fn instant_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    // Seconds and nanoseconds since the epoch, written as a UTC date and time.
    let days = now.as_secs() / 86_400;
    let seconds = now.as_secs() % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        now.subsec_nanos()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn fired(out: Output) -> String {
    let out = ok(out);
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("the command id")
        .to_owned()
}

/// `rct history` as an incident-review tool: bounded ranges that print what is in them,
/// absolute times, commands decided before the range kept whole, rows that say what each
/// command was, and the filters an incident needs.
#[test]
fn history_answers_an_incident_reviews_questions() {
    let dev = Dev::start();
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    let drained = fired(dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-1",
        "-j",
        "SRE-201",
    ]));
    std::thread::sleep(Duration::from_millis(300));
    let after_drain = instant_now();
    std::thread::sleep(Duration::from_millis(300));
    let long_why = "SRE-202: a justification long enough to push any column after it well past \
                    where the others start";
    let weighted = fired(dev.rct(&[
        "workloads",
        "restart",
        "--namespace",
        "shop",
        "--deployment",
        "cart",
        "-j",
        long_why,
        "--dry-run",
    ]));
    ok(dev.rct(&["login", "--dev", "--user", "bob", "--groups", "app_oncall"]));
    let refused = dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-3",
        "--keep-percent",
        "7",
        "-j",
        "SRE-203",
    ]);
    assert_eq!(code(&refused), 3, "{}", text(&refused.stderr));
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    let ramping = fired(dev.rct(&[
        "traffic",
        "undrain-cluster",
        "--cluster",
        "prod-4",
        "--ramp",
        "60s",
        "-j",
        "SRE-204",
        "--detach",
    ]));
    let started = Instant::now();
    while !text(&dev.rct(&["status", &ramping]).stdout).contains("running") {
        assert!(started.elapsed() < Duration::from_secs(30), "never running");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let while_ramping = instant_now();
    std::thread::sleep(Duration::from_millis(300));
    ok(dev.rct(&["cancel", &ramping, "-j", "SRE-205"]));

    let rows = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["history"];
        all.extend_from_slice(args);
        text(&ok(dev.rct(&all)).stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let has = |rows: &[String], id: &str| rows.iter().any(|r| r.contains(id));

    // Everything: each command once, no `?` anywhere, what each one was.
    let all = rows(&["--since", "10m"]);
    let joined = all.join("\n");
    assert!(!joined.contains('?'), "{joined}");
    for id in [&drained, &weighted, &ramping] {
        assert_eq!(
            all.iter().filter(|r| r.contains(id.as_str())).count(),
            if id == &ramping { 2 } else { 1 },
            "{id} (the ramp twice: its row and its cancel's):\n{joined}"
        );
    }
    let row = |id: &str| {
        all.iter()
            .find(|r| r.contains(id) && !r.contains("cancels"))
            .unwrap()
            .clone()
    };
    assert!(row(&weighted).contains("(dry run)"), "{joined}");
    let cancel = all.iter().find(|r| r.contains("cancels")).expect(&joined);
    assert!(
        cancel.contains(" cancel ") && cancel.contains(&format!("cancels {ramping}")),
        "a cancel request is a cancel, not an admitted command: {cancel}"
    );
    assert!(!cancel.contains("admitted"), "{cancel}");
    let refusal = all.iter().find(|r| r.contains("SRE-203")).expect(&joined);
    assert!(
        refusal.contains("forbidden") && refusal.contains("keep_percent=7"),
        "a refused request shows what it asked for: {refusal}"
    );
    // Columns start at the same place whatever the justification's length.
    let column = |r: &str| r.find("alice@example.com").unwrap();
    assert_eq!(column(&row(&drained)), column(&row(&weighted)), "{joined}");

    // A bound in time: what was before it, and nothing after (--until printed nothing when
    // events existed after the bound).
    let before = rows(&["--since", "10m", "--until", &after_drain]);
    assert!(has(&before, &drained), "{before:?}");
    assert!(!has(&before, &weighted), "{before:?}");

    // A command decided before --since is shown whole: who asked, why, how it ended; also
    // when the range is filtered by operator.
    let straddling = rows(&["--since", &while_ramping, "--operator", "alice@example.com"]);
    let ramp = straddling
        .iter()
        .find(|r| r.contains(&ramping) && !r.contains("cancels"))
        .unwrap_or_else(|| panic!("decided before --since, ended after: {straddling:?}"));
    assert!(
        ramp.contains("SRE-204") && ramp.contains("cancelled"),
        "{ramp}"
    );
    assert!(!has(&straddling, &drained), "{straddling:?}");
    // Its claim too: who ran it, and for how long.
    let json =
        text(&ok(dev.rct(&["history", "--since", &while_ramping, "--output", "json"])).stdout);
    let ramp: serde_json::Value = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["command_id"] == ramping.as_str())
        .unwrap();
    assert!(
        ramp["agent"].is_string() && ramp["duration_seconds"].is_number(),
        "{ramp}"
    );
    let open = dev.rct(&["history", "--follow", "--outcome", "running"]);
    said(
        &open,
        2,
        &open.stderr,
        "--follow prints commands as they end",
    );

    // Filters: by ticket (a whole word), the last N.
    let ticket = rows(&["--since", "10m", "--ticket", "sre-201"]);
    assert_eq!(ticket.len(), 1, "{ticket:?}");
    assert!(has(&ticket, &drained));
    let last = rows(&["--since", "10m", "--limit", "2"]);
    assert_eq!(last.len(), 2, "{last:?}");
    assert_eq!(
        last,
        [row(&ramping), cancel.clone()],
        "the two most recently decided, in the order decided"
    );

    // JSON: parameters as an object, one object per line.
    let json = text(&ok(dev.rct(&["history", "--since", "10m", "--output", "json"])).stdout);
    let weights: serde_json::Value = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["command_id"] == weighted.as_str())
        .unwrap();
    assert_eq!(weights["params"]["deployment"], "cart", "{weights}");
    assert_eq!(weights["dry_run"], true, "{weights}");

    // Empty and inverted ranges say so.
    let empty = dev.rct(&["history", "--since", "2001-01-01", "--until", "2001-01-02"]);
    said(&empty, 0, &empty.stderr, "no commands between");
    assert!(text(&empty.stdout).is_empty());
    let inverted = dev.rct(&["history", "--since", &after_drain, "--until", "2001-01-02"]);
    said(&inverted, 2, &inverted.stderr, "the range is empty");
    let nonsense = dev.rct(&["history", "--since", "last tuesday"]);
    said(&nonsense, 2, &nonsense.stderr, "is not a time");
}

/// The dynamic commands and discovery say rct's own words: the operation's description as
/// the help header, rct's checks for every value (negative numbers, enum and target values,
/// repeats), the nearest name for a typo, filters by tower, completion of operation names,
/// and `--server` reaching a catalog the home has never seen.
#[test]
fn the_interface_speaks_rcts_words_and_suggests_the_way() {
    let dev = Dev::start();
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    let help = ok(dev.rct(&["traffic", "drain-cluster", "--help"]));
    assert_eq!(
        text(&help.stdout).lines().next(),
        Some("Move all traffic away from one cluster"),
        "{}",
        text(&help.stdout)
    );
    let refused = |args: &[&str], needle: &str| {
        let out = dev.rct(args);
        said(&out, 2, &out.stderr, needle);
    };
    let drain = |extra: &[&str], needle: &str| {
        let mut args = vec!["traffic", "drain-cluster", "-j", "SRE-301"];
        args.extend_from_slice(extra);
        refused(&args, needle);
    };
    drain(
        &["--cluster", "prod-1", "--keep-percent", "-5"],
        "keep_percent must be an integer from 0 to 100, got -5",
    );
    drain(
        &["--cluster", "prod-9"],
        "cluster must be one of prod-1, prod-2, prod-3, prod-4, got \"prod-9\"",
    );
    drain(
        &["--cluster", "prod-1", "--cluster", "prod-2"],
        "cluster is given 2 times (prod-1, prod-2): give it once",
    );
    refused(
        &[
            "run",
            "traffic/drain-cluster",
            "-p",
            "cluster=prod-1",
            "-p",
            "cluster=prod-2",
            "-j",
            "SRE-301",
        ],
        "cluster is given 2 times",
    );
    refused(
        &["run", "traffic/drian-cluster", "-j", "SRE-301"],
        "did you mean traffic/drain-cluster?",
    );
    refused(
        &["ops", "describe", "workload/restart"],
        "did you mean workloads/restart?",
    );
    refused(
        &["ops", "trafic"],
        "there is no tower trafic (did you mean traffic?)",
    );

    // Filters by tower, positional or flag.
    for args in [&["ops", "traffic"][..], &["ops", "--tower", "traffic"][..]] {
        let listed = text(&ok(dev.rct(args)).stdout);
        assert!(listed.contains("traffic/drain-cluster"), "{listed}");
        assert!(!listed.contains("workloads/"), "{listed}");
    }

    // Completion knows the operations for `rct run` and `rct ops describe`.
    let bash = text(&ok(dev.rct(&["completion", "bash"])).stdout);
    assert!(bash.contains("traffic/drain-cluster"), "no operation names");

    // A home that has never seen this system: --server reaches its catalog.
    let fresh = tempfile::tempdir().unwrap();
    let server = std::fs::read_to_string(dev.home().join("contexts.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .unwrap();
    let out = Command::new(RCT)
        .args(["--server", &server, "traffic", "drain-cluster", "--help"])
        .env("RCT_HOME", fresh.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    said(
        &out,
        0,
        &out.stdout,
        "Move all traffic away from one cluster",
    );

    // A context that does not exist is said to be one, not an unknown command.
    let out = dev.rct(&["--context", "nosuch", "traffic", "drain-cluster", "--help"]);
    said(&out, 2, &out.stderr, "there is no context nosuch");

    // Errors are JSON under --output json, and say a repeated cause once.
    let out = dev.rct(&["status", "not-an-id", "--output", "json"]);
    assert_eq!(code(&out), 2);
    let error: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(error["exit"], 2);
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("is not a command id"),
        "{error}"
    );
}

/// Contexts and sessions: every verb that changes state says what it did.
#[test]
fn contexts_and_logout_say_what_they_did() {
    let home = tempfile::tempdir().unwrap();
    let rct = |args: &[&str]| {
        Command::new(RCT)
            .args(args)
            .env("RCT_HOME", home.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = rct(&["context", "set", "prod", "--server", "nats://127.0.0.1:1"]);
    said(&out, 0, &out.stderr, "created context prod (current)");
    let out = rct(&["context", "set", "prod", "--server", "nats://127.0.0.1:2"]);
    said(&out, 0, &out.stderr, "updated context prod");
    let out = rct(&["context", "current"]);
    said(&out, 0, &out.stdout, "prod");
    let out = rct(&["context", "rename", "prod", "production"]);
    said(&out, 0, &out.stderr, "renamed context prod to production");
    let out = rct(&["context", "current"]);
    said(&out, 0, &out.stdout, "production");
    let out = rct(&["context", "use", "prod"]);
    said(&out, 2, &out.stderr, "did you mean production?");
    let out = rct(&["context", "set", "../x", "--server", "nats://a:1"]);
    said(&out, 2, &out.stderr, "cannot name a context");
    let out = rct(&["logout"]);
    said(
        &out,
        0,
        &out.stderr,
        "not logged in to production: nothing to do",
    );
    // A stored session is deleted by logout, and the context with its folder.
    let dir = home.path().join("contexts/production");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["session.key", "certificate", "identity.json"] {
        std::fs::write(dir.join(file), "x").unwrap();
    }
    let out = rct(&["logout"]);
    said(&out, 0, &out.stderr, "logged out of production");
    assert!(!dir.join("session.key").exists());
    let out = rct(&["context", "delete", "production"]);
    said(&out, 0, &out.stderr, "no context is current now");
    assert!(!dir.exists());
    let out = rct(&["context", "current"]);
    said(&out, 2, &out.stderr, "no context is current");
}

/// The fenced block of `docs/TOWERS.md` whose info string is `sh <name>`.
fn towers_block(name: &str) -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/TOWERS.md")).unwrap();
    let start = doc
        .find(&format!("```sh {name}\n"))
        .unwrap_or_else(|| panic!("no ```sh {name} block in docs/TOWERS.md"));
    let body = &doc[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("\n```").unwrap()].to_owned()
}

/// docs/TOWERS.md's first-tower walk, run as it is written: the template copied, `rct dev`
/// with its catalog and scripts, a first run, a dry run, a second operation added to both
/// files while rct dev runs (reloaded by both), its run, and the history.
#[test]
fn the_towers_walk_runs_as_written() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let copy = |from: &Path, to: &Path| {
        let status = Command::new("cp")
            .arg("-r")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    std::fs::create_dir_all(dir.join("ops")).unwrap();
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/templates"),
        &dir.join("ops/templates"),
    );
    let bin = Path::new(RCT).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home = dir.join("home");
    let shell = |script: &str| {
        let mut command = Command::new("sh");
        command
            .args(["-e", "-c", script])
            .current_dir(dir)
            .env("PATH", &path)
            .env("RCT_HOME", &home)
            .env("NATS_SERVER_BIN", nats_server())
            .stdin(Stdio::null());
        command
    };

    // The first block: everything before `rct dev`, then rct dev in the background.
    let dev_block = towers_block("dev");
    let (before, dev_line) = dev_block.rsplit_once('\n').unwrap();
    assert!(dev_line.starts_with("rct dev "), "{dev_line}");
    ok(shell(before).output().unwrap());
    let log = dir.join("dev.log");
    let port = free_port();
    let child = shell(&format!("exec {dev_line} --port {port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let dev = Dev {
        child,
        port,
        home: tempfile::tempdir().unwrap(),
        _state: tempfile::tempdir().unwrap(),
    };
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    while !read_log().contains("rct dev is running") {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "rct dev did not start:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The second block, as one shell script.
    let walk = shell(&towers_block("walk")).output().unwrap();
    let walked = format!("{}{}", text(&walk.stdout), text(&walk.stderr));
    assert!(
        walk.status.success(),
        "the walk failed:\n{walked}\nrct dev said:\n{}",
        read_log()
    );
    for needle in [
        "hello/greet",
        "hello, Ada",
        "would say hi to Ada",
        "wave, Ada",
        "alice@example.com",
    ] {
        assert!(walked.contains(needle), "{needle:?} not in:\n{walked}");
    }
    let stdout = text(&walk.stdout);
    let history: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("hello/") && l.contains("succeeded"))
        .collect();
    assert_eq!(history.len(), 3, "the three runs in the history:\n{walked}");
    assert_eq!(
        history.iter().filter(|l| l.contains("(dry run)")).count(),
        1,
        "{walked}"
    );
    let said = read_log();
    for needle in [
        "rct dev: catalog reloaded",
        "reloaded: tower hello, operations greet, wave",
    ] {
        assert!(
            said.contains(needle),
            "{needle:?} not in rct dev's output:\n{said}"
        );
    }
    drop(dev);
}

/// Nothing on record can pass for something else on a terminal. A justification that could
/// (a carriage return and an escape sequence that clear the line and write a fake one) is
/// refused before it is sent. Text that reached the stream anyway, written by whoever may
/// write a tower's events (a log line of a command, a refusal's justification and reason),
/// shows written out in `rct show`, `rct history` and `rct status` on a terminal, never acted
/// on.
#[test]
fn nothing_on_record_can_pass_for_something_else_on_a_terminal() {
    use rct_bus::proto::{self, event::Kind};
    let dev = Dev::start();
    ok(dev.rct(&["login", "--dev", "--user", "alice", "--groups", "sre_team"]));
    let fake = "\u{1b}[2K\rceo@example.com drained prod-1";
    let shown_fake = "\\u{1b}[2K\\rceo@example.com drained prod-1";

    let out = dev.rct(&[
        "workloads",
        "restart",
        "--namespace",
        "shop",
        "--deployment",
        "web",
        "-j",
        &format!("SRE-1 {fake}"),
    ]);
    let said = text(&out.stderr);
    assert_eq!(code(&out), 2, "{said}");
    assert!(
        said.contains("one line of printable text") && !said.contains('\u{1b}'),
        "{said:?}"
    );

    let drained = fired(dev.rct(&[
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-1",
        "-j",
        "SRE-1",
    ]));
    let now = rct_streams::timestamp::from_datetime(time::OffsetDateTime::now_utc());
    let event = |id: &str, kind: Kind| proto::Event {
        command_id: id.into(),
        at: Some(now),
        source: format!("agent/traffic/prod-1/{fake}"),
        operation: "traffic/drain-cluster".into(),
        target: "prod-1".into(),
        kind: Some(kind),
    };
    dev.write_event(
        "traffic",
        &event(
            &drained,
            Kind::Log(proto::Log {
                stream: proto::LogStream::Stdout as i32,
                line: format!("done\n{fake}"),
                undone_by: String::new(),
            }),
        ),
        "forged",
    );
    let refused = rct_bus::CommandId::generate().to_string();
    dev.write_event(
        "traffic",
        &event(
            &refused,
            Kind::Rejected(proto::Rejected {
                code: proto::RejectionCode::Forbidden as i32,
                message: format!("no{fake}"),
                request: Some(proto::Request {
                    operator: Some(proto::Operator {
                        subject: "mallory".into(),
                        email: format!("mallory{fake}"),
                        groups: Vec::new(),
                    }),
                    justification: format!("SRE-2{fake}"),
                    ..proto::Request::default()
                }),
            }),
        ),
        "forged",
    );

    for (args, exit) in [
        (vec!["show", drained.as_str()], 0),
        (vec!["show", refused.as_str()], 3),
        (vec!["status", refused.as_str()], 3),
        (vec!["history", "--since", "1h"], 0),
    ] {
        let (code, shown) = dev.on_terminal(&args);
        assert_eq!(code, exit, "{args:?}:\n{shown}");
        assert!(
            !shown.contains('\u{1b}'),
            "{args:?} passed an escape on:\n{shown:?}"
        );
        assert!(shown.contains(shown_fake), "{args:?}:\n{shown}");
    }
}

/// A home of its own for `user` on the dev stack (the context copied), logged in with
/// `groups`: each approver signs as themselves.
fn person(dev: &Dev, user: &str, groups: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::copy(
        dev.home().join("contexts.yaml"),
        home.path().join("contexts.yaml"),
    )
    .unwrap();
    let out = Command::new(RCT)
        .args(["login", "--dev", "--user", user, "--groups", groups])
        .env("RCT_HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(out);
    home
}

fn rct_as(home: &tempfile::TempDir, args: &[&str]) -> Output {
    Command::new(RCT)
        .args(args)
        .env("RCT_HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A freeze started from rct refuses the tower's runs, naming who froze it, until it ends.
#[test]
fn a_tower_frozen_from_rct_refuses_its_operations_until_the_freeze_ends() {
    let dev = Dev::start();
    let sre = person(&dev, "erin", "sre_team");
    let lead = person(&dev, "bob", "sre_leads");
    let drain = [
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-1",
        "-j",
        "SRE-101",
    ];

    let out = rct_as(
        &sre,
        &[
            "freeze", "start", "--tower", "traffic", "--for", "1h", "-j", "INC-1",
        ],
    );
    said(&out, 3, &out.stderr, "forbidden");
    let out = ok(rct_as(
        &lead,
        &[
            "freeze", "start", "--tower", "traffic", "--for", "1h", "-j", "INC-1",
        ],
    ));
    assert!(
        text(&out.stderr).contains("traffic is frozen for 1h"),
        "{}",
        text(&out.stderr)
    );

    let out = rct_as(&sre, &drain);
    said(&out, 3, &out.stderr, "frozen");
    assert!(text(&out.stderr).contains("bob@"), "{}", text(&out.stderr));
    let out = ok(rct_as(&sre, &["freeze", "list"]));
    assert!(
        text(&out.stdout).contains("traffic"),
        "{}",
        text(&out.stdout)
    );
    let out = ok(rct_as(&sre, &["history"]));
    assert!(
        text(&out.stdout).contains("freeze"),
        "{}",
        text(&out.stdout)
    );

    ok(rct_as(
        &lead,
        &["freeze", "end", "--tower", "traffic", "-j", "INC-1"],
    ));
    let out = ok(rct_as(&sre, &["freeze", "list"]));
    assert!(
        !text(&out.stdout).contains("traffic"),
        "{}",
        text(&out.stdout)
    );
    ok(rct_as(&sre, &drain));
}

/// Two approvers sign off from their own rct; the requester's watch shows each approval and
/// the run; a refused approval says why with exit 3.
#[test]
fn a_request_runs_once_two_others_approve_it_from_their_own_rct() {
    let dev = Dev::start();
    let alice = person(&dev, "alice", "sre_team,sre_leads");
    let bob = person(&dev, "bob", "sre_leads");
    let carol = person(&dev, "carol", "app_leads");
    let watch = Command::new(RCT)
        .args([
            "workloads",
            "delete",
            "--namespace",
            "shop",
            "--deployment",
            "cart",
            "-j",
            "INC-7",
        ])
        .env("RCT_HOME", alice.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its id, once the request waits.
    let started = Instant::now();
    let id = loop {
        if let Some(id) = pending_id(&dev) {
            break id;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no request waits"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The requester cannot approve their own request.
    let out = rct_as(&alice, &["approve", &id, "--yes"]);
    said(&out, 3, &out.stderr, "self_approval");
    let out = ok(rct_as(&bob, &["approve", &id, "--yes"]));
    assert!(
        text(&out.stderr).contains("digest"),
        "{}",
        text(&out.stderr)
    );
    let out = rct_as(&bob, &["approve", &id, "--yes"]);
    said(&out, 3, &out.stderr, "already_approved");
    ok(rct_as(&carol, &["approve", &id, "--yes"]));

    let out = watch.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(
        code(&out),
        0,
        "stdout:\n{}\nstderr:\n{stderr}",
        text(&out.stdout)
    );
    assert!(stderr.contains("waits for 2 approvals"), "{stderr}");
    assert!(stderr.contains("1 of 2: bob@"), "{stderr}");
    assert!(stderr.contains("2 of 2: carol@"), "{stderr}");
    assert!(
        text(&out.stdout).contains("succeeded"),
        "{}",
        text(&out.stdout)
    );
    let shown = text(&ok(dev.rct(&["show", &id])).stdout);
    assert!(shown.contains("approved by bob@"), "{shown}");
    assert!(shown.contains("with 2 approvals"), "{shown}");
    // History lists it, though it began waiting, not decided.
    let listed = text(&ok(dev.rct(&["history"])).stdout);
    let row = listed
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("{id} is not in the history:\n{listed}"));
    assert!(row.contains("succeeded"), "{row}");
}

/// The id of the request waiting for approvals on the dev stack, if there is one.
fn pending_id(dev: &Dev) -> Option<String> {
    let url = format!("nats://127.0.0.1:{}", dev.port);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.ok()?);
        let stream = js.get_stream("RCT_EVT").await.ok()?;
        let message = stream
            .get_last_raw_message_by_subject("rct.evt.workloads._.*.pending")
            .await
            .ok()?;
        let subject: rct_bus::Subject = message.subject.parse().ok()?;
        match subject {
            rct_bus::Subject::Event { command_id, .. } => Some(command_id.to_string()),
            _ => None,
        }
    })
}

/// An operation that plans: `rct plan` shows what it would change; a request waits for the
/// plan its agent makes, approvers see that plan before they sign, and the approved failover
/// runs. A second request, approved for the plan made before the first one ran, no longer
/// matches what its handler would change: it fails stale_plan with both plans, unrun.
#[test]
fn approvals_bind_the_plan_and_a_stale_plan_never_runs() {
    let dev = Dev::start();
    let alice = person(&dev, "alice", "sre_team");
    let bob = person(&dev, "bob", "sre_leads");
    let carol = person(&dev, "carol", "app_leads");
    let failover = [
        "workloads",
        "failover",
        "--namespace",
        "shop",
        "--deployment",
        "cart",
        "-j",
        "INC-8",
    ];

    let out = ok(rct_as(&alice, &[&["plan"][..], &failover].concat()));
    let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        shown.contains("promote cart-b replica → primary"),
        "{shown}"
    );
    assert!(shown.contains("planned 3 changes"), "{shown}");
    // An operation that does not plan cannot be planned.
    let out = rct_as(
        &alice,
        &[
            "plan",
            "traffic",
            "drain-cluster",
            "--cluster",
            "prod-1",
            "-j",
            "SRE-1",
        ],
    );
    said(&out, 2, &out.stderr, "plan: true");

    let detached = [&failover[..], &["--detach"]].concat();
    let first = text(&ok(rct_as(&alice, &detached)).stdout)
        .trim()
        .to_owned();
    let second = text(&ok(rct_as(&alice, &detached)).stdout)
        .trim()
        .to_owned();
    // Each approver signs once the plan is there, and sees it first.
    let approve = |who: &tempfile::TempDir, id: &str| {
        let started = Instant::now();
        loop {
            let out = rct_as(who, &["approve", id, "--yes"]);
            if code(&out) == 0 {
                return out;
            }
            assert!(
                text(&out.stderr).contains("not made yet")
                    && started.elapsed() < Duration::from_secs(30),
                "{}",
                text(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let out = approve(&bob, &first);
    assert!(
        text(&out.stderr).contains("promote cart-b replica → primary"),
        "{}",
        text(&out.stderr)
    );
    approve(&bob, &second);
    let out = approve(&carol, &first);
    assert!(
        text(&out.stderr).contains("so far: bob@example.com"),
        "{}",
        text(&out.stderr)
    );
    let out = ok(rct_as(&alice, &["watch", &first]));
    assert!(
        text(&out.stdout).contains("cart-b is primary"),
        "{}",
        text(&out.stdout)
    );

    // Approved for promoting cart-b, which is primary now: it would promote cart-a.
    approve(&carol, &second);
    let out = rct_as(&alice, &["watch", &second]);
    assert_ne!(code(&out), 0, "{}", text(&out.stdout));
    // rct show exits as the command ended: failed.
    let shown = text(&dev.rct(&["show", &second]).stdout);
    assert!(shown.contains("stale_plan"), "{shown}");
    assert!(
        shown.contains("approved: fail shop/cart over from cart-a to cart-b"),
        "{shown}"
    );
    assert!(
        shown.contains("now: fail shop/cart over from cart-b to cart-a"),
        "{shown}"
    );
    assert!(!shown.contains("cart-a is primary"), "it ran: {shown}");
    let listed = text(&ok(rct_as(&alice, &["history"])).stdout);
    assert!(listed.contains("plan only"), "{listed}");
    let row = listed
        .lines()
        .find(|l| l.contains(&second))
        .unwrap_or_else(|| panic!("{second} is not in the history:\n{listed}"));
    assert!(row.contains("stale_plan"), "{row}");
}

/// A break-glass run is listed as open until someone else reviews it, then as reviewed.
#[test]
fn a_break_glass_run_is_listed_unreviewed_until_someone_else_reviews_it() {
    let dev = Dev::start();
    let alice = person(&dev, "alice", "sre_team,sre_oncall");
    let bob = person(&dev, "bob", "sre_leads");
    let glass = [
        "workloads",
        "delete",
        "--namespace",
        "shop",
        "--deployment",
        "cart",
        "-j",
        "INC-9",
        "--break-glass",
        "INC-9 checkout is down",
    ];
    ok(rct_as(&alice, &glass));
    let ordinary = [
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-1",
        "-j",
        "SRE-1",
    ];
    ok(rct_as(&alice, &ordinary));
    // A refused attempt to break the glass ran nothing: never listed as open for review.
    let erin = person(&dev, "erin", "sre_team");
    let refused = rct_as(
        &erin,
        &[
            &glass[..4],
            &[
                "--deployment",
                "basket",
                "-j",
                "INC-9",
                "--break-glass",
                "INC-9 checkout is down",
            ],
        ]
        .concat(),
    );
    said(&refused, 3, &refused.stderr, "forbidden");
    let listed = |args: &[&str]| text(&ok(rct_as(&bob, args)).stdout);

    let open = listed(&["history", "--break-glass", "--unreviewed"]);
    assert!(open.contains("workloads/delete"), "{open}");
    assert!(open.contains("BREAK-GLASS"), "{open}");
    assert!(
        !open.contains("drain-cluster"),
        "only break-glass runs: {open}"
    );
    assert!(
        !open.contains("erin@"),
        "a refused attempt is open for review: {open}"
    );
    let id = open
        .split_whitespace()
        .find(|w| w.len() == 26 && w.parse::<rct_bus::CommandId>().is_ok())
        .unwrap_or_else(|| panic!("no command id in {open}"))
        .to_owned();

    // Not by the one who broke it.
    let out = rct_as(&alice, &["review", &id, "-j", "INC-9"]);
    said(&out, 3, &out.stderr, "self_approval");
    ok(rct_as(&bob, &["review", &id, "-j", "INC-9"]));
    // The review reaches the run's timeline right after its own decision.
    let started = Instant::now();
    loop {
        let open = listed(&["history", "--break-glass", "--unreviewed"]);
        if !open.contains("workloads/delete") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{open}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = listed(&["history", "--break-glass"]);
    assert!(all.contains("reviewed by bob@"), "{all}");
}

/// Two traffic changes to one cluster never run at once: the second is refused `locked`,
/// naming the first, its operator and justification; `rct locks` lists the lock while the
/// first runs, and nothing once it ended, when the second goes through.
#[test]
fn a_second_change_to_a_cluster_is_refused_locked_while_the_first_runs() {
    let dev = Dev::start();
    let erin = person(&dev, "erin", "sre_team");
    let tom = person(&dev, "tom", "traffic_team");
    // About 5 s: five steps of a second.
    let first = fired(rct_as(
        &erin,
        &[
            "traffic",
            "undrain-cluster",
            "--cluster",
            "prod-2",
            "--ramp",
            "5m",
            "-j",
            "SRE-7",
            "--detach",
        ],
    ));
    let weights = [
        "traffic",
        "set-weights",
        "--cluster",
        "prod-2",
        "--weight",
        "40",
        "-j",
        "SRE-8",
    ];
    let out = rct_as(&tom, &weights);
    said(&out, 3, &out.stderr, "locked");
    for part in [first.as_str(), "erin@", "SRE-7", "traffic/undrain-cluster"] {
        assert!(
            text(&out.stderr).contains(part),
            "{part}: {}",
            text(&out.stderr)
        );
    }
    let out = ok(rct_as(&tom, &["locks"]));
    let listed = text(&out.stdout);
    assert!(
        listed.contains("prod-2") && listed.contains(&first) && listed.contains("SRE-7"),
        "{listed}"
    );

    ok(rct_as(&erin, &["watch", &first]));
    let out = ok(rct_as(&tom, &["locks", "--output", "json"]));
    assert!(text(&out.stdout).trim().is_empty(), "{}", text(&out.stdout));
    let out = ok(rct_as(&tom, &weights));
    assert!(
        text(&out.stdout).contains("succeeded"),
        "{}",
        text(&out.stdout)
    );
}

/// Undo through the CLI on the demo traffic tower: a drain, its undo, and the drain again end
/// where the first drain did; the undo sets back the weight the drain started from, with the
/// parameters it showed first; both timelines show the link, and a second undo is refused.
#[test]
fn a_drain_undone_and_done_again_ends_where_it_did() {
    let dev = Dev::start();
    let erin = person(&dev, "erin", "sre_team");
    // The weights table a success prints, and its command id.
    let ran = |out: Output| -> (String, Vec<String>) {
        let out = ok(out);
        let stdout = text(&out.stdout);
        let id = stdout
            .lines()
            .find(|l| l.contains(" succeeded"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no success in:\n{stdout}"))
            .to_owned();
        let table = stdout
            .lines()
            .filter(|l| l.starts_with("  prod-"))
            .map(str::to_owned)
            .collect();
        (id, table)
    };
    let weights = [
        "traffic",
        "set-weights",
        "--cluster",
        "prod-3",
        "--weight",
        "60",
        "-j",
        "SRE-1",
    ];
    let (_, before) = ran(rct_as(&erin, &weights));
    assert!(before.contains(&"  prod-3: 60".to_owned()), "{before:?}");
    let drain = [
        "traffic",
        "drain-cluster",
        "--cluster",
        "prod-3",
        "-j",
        "SRE-2",
    ];
    let (drained, forward) = ran(rct_as(&erin, &drain));
    assert!(forward.contains(&"  prod-3: 0".to_owned()), "{forward:?}");

    let undo = rct_as(&erin, &["undo", &drained, "-j", "SRE-3"]);
    let shown = text(&undo.stderr);
    assert!(
        shown.contains("with traffic/set-weights cluster=prod-3 weight=60"),
        "{shown}"
    );
    let (undid, back) = ran(undo);
    assert_eq!(back, before, "the undo sets back what the drain changed");
    let (_, again) = ran(rct_as(&erin, &drain));
    assert_eq!(again, forward);

    let original = text(&ok(rct_as(&erin, &["show", &drained])).stdout);
    assert!(
        original.contains(&format!("undone by command {undid}")),
        "{original}"
    );
    let undo_shown = text(&ok(rct_as(&erin, &["show", &undid])).stdout);
    assert!(
        undo_shown.contains(&format!("undo of {drained}")),
        "{undo_shown}"
    );
    let history = text(&ok(rct_as(&erin, &["history", "--since", "10m"])).stdout);
    assert!(
        history
            .lines()
            .any(|l| l.contains(&undid) && l.contains(&format!("(undo of {drained})"))),
        "{history}"
    );
    let twice = rct_as(&erin, &["undo", &drained, "-j", "SRE-4"]);
    said(&twice, 3, &twice.stderr, "not_undoable");
    assert!(
        text(&twice.stderr).contains(&format!("undone already, by command {undid}")),
        "{}",
        text(&twice.stderr)
    );
    // An operation without an inverse: refused before anything is submitted.
    let (restarted, _) = ran(rct_as(
        &erin,
        &[
            "workloads",
            "restart",
            "--namespace",
            "shop",
            "--deployment",
            "cart",
            "-j",
            "SRE-5",
        ],
    ));
    let out = rct_as(&erin, &["undo", &restarted, "-j", "SRE-6"]);
    said(&out, 2, &out.stderr, "has no inverse");
}

/// The same through the script runner: a scale of the demo workloads tower records the count
/// it had before (`::output previous_replicas`), its undo sets it back, and scaling again ends
/// where the first scale did.
#[test]
fn a_scripted_scale_undone_and_done_again_ends_where_it_did() {
    let dev = Dev::start();
    let erin = person(&dev, "erin", "sre_team");
    let scale = [
        "workloads",
        "scale",
        "--namespace",
        "shop",
        "--deployment",
        "undo-me",
        "--replicas",
        "7",
        "-j",
        "SRE-1",
    ];
    // The summary line of a success, and its command id.
    let ran = |out: Output| -> (String, String) {
        let out = ok(out);
        let stdout = text(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains(" succeeded"))
            .unwrap_or_else(|| panic!("no success in:\n{stdout}"));
        let id = line.split_whitespace().next().unwrap().to_owned();
        let summary = line.split_once(": ").map(|(_, s)| s.to_owned()).unwrap();
        (id, summary)
    };
    let (scaled, forward) = ran(rct_as(&erin, &scale));
    assert_eq!(forward, "shop/undo-me: 7 replicas (were 3)");
    let undo = rct_as(&erin, &["undo", &scaled, "-j", "SRE-2", "--yes"]);
    let shown = text(&undo.stderr);
    assert!(
        shown.contains("with workloads/scale deployment=undo-me namespace=shop replicas=3"),
        "{shown}"
    );
    let (_, back) = ran(undo);
    assert_eq!(back, "shop/undo-me: 3 replicas (were 7)");
    let (_, again) = ran(rct_as(&erin, &scale));
    assert_eq!(again, forward);
}

/// The demo load balancer's weights of prod-1..4.
fn lb_weights(dev: &Dev) -> Vec<u32> {
    let url = format!("nats://127.0.0.1:{}", dev.port);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let lb = rct_agents::demo::LoadBalancer::open(&js).await.unwrap();
        let mut weights = Vec::new();
        for cluster in ["prod-1", "prod-2", "prod-3", "prod-4"] {
            weights.push(lb.weight(cluster).await.unwrap());
        }
        weights
    })
}

/// Sets what the demo load balancer's health probe says of `cluster` (healthy, unhealthy,
/// unreachable).
fn probe_says(dev: &Dev, cluster: &str, health: &str) {
    let url = format!("nats://127.0.0.1:{}", dev.port);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let lb = rct_agents::demo::LoadBalancer::open(&js).await.unwrap();
        lb.set_health(cluster, health).await.unwrap();
    });
}

#[test]
fn a_drain_rolls_out_in_health_gated_waves_and_halts_on_an_unhealthy_cluster() {
    let dev = Dev::start();
    let erin = person(&dev, "erin", "sre_team");
    let rollout = |targets: &str, why: &str| {
        rct_as(
            &erin,
            &[
                "traffic",
                "drain-cluster",
                "--cluster",
                targets,
                "--keep-percent",
                "10",
                "--waves",
                "1,100%",
                "--max-concurrency",
                "2",
                "--health",
                "traffic/check-health",
                "-j",
                why,
            ],
        )
    };
    // prod-2 starts from another weight than the others: each undo must give back its own.
    ok(rct_as(
        &erin,
        &[
            "traffic",
            "set-weights",
            "--cluster",
            "prod-2",
            "--weight",
            "60",
            "-j",
            "SRE-10",
        ],
    ));
    let out = ok(rollout("prod-*", "SRE-11"));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    for said in [
        "as a rollout on prod-1, prod-2, prod-3, prod-4 (2 waves, 2 at once, at most 0 failed)",
        "prod-1: healthy",
        "wave 2 of 2",
    ] {
        assert!(
            stdout.contains(said) || stderr.contains(said),
            "{said:?} not in:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stdout.contains("4 of 4 targets succeeded, in 2 waves"),
        "{stdout}"
    );
    // prod-1 was checked before the second wave started (the live lines are on stderr).
    let lines: Vec<&str> = stderr.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{stderr}"))
    };
    assert!(at("prod-1: healthy") < at("prod-2: started as"), "{stderr}");

    // Undone as a rollout: every cluster back to the weight its drain recorded.
    assert_eq!(lb_weights(&dev), [10, 10, 10, 10]);
    let drained = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("submitted traffic/drain-cluster as ")
                .map(str::to_owned)
        })
        .expect("the rollout's id");
    let undo = rct_as(&erin, &["undo", &drained, "-j", "SRE-15", "--yes"]);
    let (undo_out, undo_err) = (text(&undo.stdout), text(&undo.stderr));
    assert!(
        undo_err.contains("4 of which succeeded; taken back in reverse order"),
        "{undo_err}"
    );
    // Each cluster with the weight its own drain recorded, the last drained first.
    let shown: Vec<usize> = ["prod-4", "prod-3", "prod-2", "prod-1"]
        .iter()
        .map(|c| {
            let weight = if *c == "prod-2" { 60 } else { 100 };
            let line = format!("  {c}: traffic/set-weights cluster={c} weight={weight}");
            undo_err
                .find(&line)
                .unwrap_or_else(|| panic!("{line:?} not in:\n{undo_err}"))
        })
        .collect();
    assert!(shown.windows(2).all(|w| w[0] < w[1]), "{undo_err}");
    let undo = ok(undo);
    assert!(
        undo_out.contains("4 of 4 targets succeeded"),
        "{undo_out}\n{}",
        text(&undo.stderr)
    );
    assert_eq!(lb_weights(&dev), [100, 60, 100, 100]);
    let twice = rct_as(&erin, &["undo", &drained, "-j", "SRE-16", "--yes"]);
    said(&twice, 1, &twice.stderr, "prod-4: refused: command");
    assert!(
        text(&twice.stderr).contains("undone already"),
        "{}",
        text(&twice.stderr)
    );
    assert_eq!(lb_weights(&dev), [100, 60, 100, 100]);

    // The first cluster is unhealthy after its drain: halted, the others untouched; the
    // exit code says it failed.
    probe_says(&dev, "prod-3", "unhealthy");
    let halted = rollout("prod-3,prod-1", "SRE-12");
    said(
        &halted,
        1,
        &halted.stdout,
        "halted: unhealthy after the wave: prod-3",
    );
    assert!(
        !text(&halted.stderr).contains("prod-1: started"),
        "{}",
        text(&halted.stderr)
    );
    // A child is an ordinary command: rct show names its rollout.
    let child = text(&halted.stderr)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("prod-3: started as ")
                .map(str::to_owned)
        })
        .expect("the child's id");
    let shown = text(&ok(rct_as(&erin, &["show", &child])).stdout);
    assert!(shown.contains("child of rollout"), "{shown}");
    // rct history marks the rollout and its children.
    let parent = text(&halted.stderr)
        .lines()
        .find_map(|l| {
            l.strip_prefix("submitted traffic/drain-cluster as ")
                .map(str::to_owned)
        })
        .expect("the rollout's id");
    let history = text(&ok(rct_as(&erin, &["history", "--since", "10m"])).stdout);
    let row = |id: &str| {
        history
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(id))
            .unwrap_or_else(|| panic!("{id} not in:\n{history}"))
            .to_owned()
    };
    assert!(
        row(&child).contains(&format!("child of rollout {parent}")),
        "{history}"
    );
    assert!(row(&parent).contains("rollout to 2 targets"), "{history}");

    // Rollout options without many targets, and many targets for an operation that does
    // not fan out, are refused before anything is sent.
    let single = rct_as(
        &erin,
        &[
            "traffic",
            "drain-cluster",
            "--cluster",
            "prod-1",
            "--waves",
            "1,100%",
            "-j",
            "SRE-13",
        ],
    );
    said(
        &single,
        2,
        &single.stderr,
        "the rollout options need many targets",
    );
    let check = rct_as(
        &erin,
        &[
            "traffic",
            "check-health",
            "--cluster",
            "prod-*",
            "-j",
            "SRE-14",
        ],
    );
    said(&check, 2, &check.stderr, "has no `fan_out`");
}
