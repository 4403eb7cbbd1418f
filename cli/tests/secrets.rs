//! A secret operation end to end through the shipped binaries (`rct-admission`, `rct-agent`,
//! `rct`) on a real nats-server: the value goes in on stdin and reaches the script, and is found
//! nowhere else, in clear or in base64: not in any file of the JetStream store, the admission
//! and agent logs, `rct show`, `rct history --output json`, or what the notifier posted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rct_streams::testkit::Server;

const RCT: &str = env!("CARGO_BIN_EXE_rct");
const SECRET: &str = "Zx-e2e s3cr3t/correct+horse";

/// The folder of the workspace's binaries, built as `cargo test --workspace --all-features`
/// builds them (so nothing is rebuilt when the whole workspace is under test).
fn binaries() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args([
                    "build",
                    "--workspace",
                    "--bins",
                    "--all-features",
                    "--locked",
                ])
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
            let dir = Path::new(RCT).parent().unwrap().to_owned();
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().unwrap();
            assert!(status.success(), "cannot build the binaries");
            dir
        })
        .clone()
}

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// A child process that is killed when the test ends, its stderr in `log`.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(command: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env(
                "RCT_LOG",
                "info,rct_admission=debug,rct_agents=debug,rct_streams=debug",
            )
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver: every body posted to it.
fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(request.as_reader(), &mut body);
            kept.lock().unwrap().push(body);
            let _ = request.respond(tiny_http::Response::empty(200));
        }
    });
    (url, bodies)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `rct` with its own home, `stdin` as its standard input.
fn rct(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(RCT)
        .args(args)
        .env("RCT_HOME", home)
        .env_remove("RCT_CONTEXT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(output: Output) -> Output {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// The command id in what `rct` printed ("submitted … as <id>").
fn command_id(printed: &str) -> String {
    printed
        .split_whitespace()
        .find(|w| w.len() == 26 && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| panic!("no command id in {printed}"))
        .to_owned()
}

/// `rct workloads set-secret` for shop/db's key `password`, then `extra`.
fn set_secret<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "workloads",
        "set-secret",
        "--namespace",
        "shop",
        "--name",
        "db",
        "--key",
        "password",
    ];
    args.extend(extra);
    args
}

/// Every file under `dir` that holds `needle`.
fn files_with(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_from_stdin_reaches_the_script_and_nothing_else_holds_it() {
    let bin = tokio::task::spawn_blocking(binaries).await.unwrap();
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let (hook, bodies) = receiver();

    // The workloads agents' key, made as an operator would; its public half goes in the
    // catalog in place of the example key's.
    let keygen = Command::new(bin.join("rct-agent"))
        .args(["keygen", "--out"])
        .arg(work.join("agent.agekey"))
        .output()
        .unwrap();
    let recipient = text(&ok(keygen).stdout).trim().to_owned();
    assert!(recipient.starts_with("age1"), "{recipient}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(work.join("agent.agekey"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = Command::new(bin.join("rct-agent"))
        .args(["keygen", "--out"])
        .arg(work.join("agent.agekey"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "keygen overwrote a key");

    // Admission: the example catalog with that key, set-secret notifying a channel.
    let value_line = "      value: { type: string, secret: true, max_len: 4096 }\n";
    let example_recipient = rct_bus::sealed::EXAMPLE_RECIPIENT;
    let example = std::fs::read_to_string(ops().join("catalog.example.yaml")).unwrap();
    assert!(example.contains(value_line) && example.contains(example_recipient));
    let catalog = example
        .replace(
            value_line,
            &format!("{value_line}    notify: [rct-events]\n"),
        )
        .replace(example_recipient, &recipient);
    std::fs::write(work.join("catalog.yaml"), catalog).unwrap();
    let key = rct_bus::KeyPair::generate();
    std::fs::write(work.join("admission.key"), key.to_pem()).unwrap();
    std::fs::write(work.join("admission.pub"), key.public().to_pem()).unwrap();
    std::fs::write(
        work.join("admission.yaml"),
        format!(
            "nats: {{ servers: [{url}] }}\ninstance: e2e\ncatalog: {catalog:?}\n\
             signing_key: {key:?}\ndev_issuer: true\nprovision: true\n\
             notify: {{ channels: {{ rct-events: {hook:?} }} }}\n",
            url = server.url(),
            catalog = work.join("catalog.yaml"),
            key = work.join("admission.key"),
        ),
    )
    .unwrap();
    let admission = Process::start(
        Command::new(bin.join("rct-admission"))
            .args(["--config".as_ref(), work.join("admission.yaml").as_os_str()]),
        work.join("admission.log"),
    );

    // The workloads agent: set-secret runs a script that records what it received.
    let received = work.join("received.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agents/tests/scripts/secrets.py");
    std::fs::write(
        work.join("scripts.yaml"),
        format!(
            "tower: workloads\noperations:\n  set-secret:\n    command: {script:?}\n    \
             args: [\"--\", \"ok\", {received:?}]\n    env: {{ SECRET_VALUE: \"{{value}}\" }}\n    \
             secret_files: {{ SECRET_FILE: value }}\n"
        ),
    )
    .unwrap();
    let js = server.jetstream().await;
    // The agent checks its scripts against the served catalog: wait for admission to serve it.
    let started = Instant::now();
    while rct_streams::topology::served_catalog(&js)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "admission never served its catalog:\n{}",
            admission.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agent = Process::start(
        Command::new(bin.join("rct-agent"))
            .args(["--scripts".as_ref(), work.join("scripts.yaml").as_os_str()])
            .args([
                "--server",
                &server.url(),
                "--instance",
                "e2e",
                "--create-consumer",
            ])
            .args([
                "--trusted-key".as_ref(),
                work.join("admission.pub").as_os_str(),
            ])
            .args([
                "--secret-key".as_ref(),
                work.join("agent.agekey").as_os_str(),
            ]),
        work.join("agent.log"),
    );
    rct_cli::stack::wait_for_agents(&js, 1, "workloads.", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{}\n{}", e.message, agent.log()));

    // The operator: log in, fire with the value on stdin.
    let home = work.join("home");
    ok(rct(
        &home,
        &["context", "set", "e2e", "--server", &server.url()],
        "",
    ));
    ok(rct(
        &home,
        &["login", "--dev", "--user", "alice", "--groups", "sre_team"],
        "",
    ));
    let help = text(&ok(rct(&home, &["workloads", "set-secret", "--help"], "")).stdout);
    assert!(help.contains("[secret: sealed to the tower"), "{help}");
    let fired = ok(rct(
        &home,
        &set_secret(&["--value", "-", "-j", "SEC-42"]),
        &format!("{SECRET}\n"),
    ));
    let stderr = text(&fired.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
    let id = command_id(&stderr);

    // The script got the value, through the environment and its file.
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&received).unwrap()).unwrap();
    assert_eq!(got["env"], SECRET);
    assert_eq!(got["file"], SECRET);

    // The instrument looks where the value would be: the script's own record holds it (and
    // nothing else of ours does).
    assert_eq!(files_with(work, SECRET.as_bytes()), vec![received.clone()]);

    // Left out on a terminal, it is asked for, and what is typed is not echoed.
    let prompted = "typed-at-the-prompt-77";
    let command = format!("{RCT} {}", set_secret(&["-j", "SEC-45"]).join(" "));
    let mut terminal = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("RCT_HOME", &home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1), from util-linux, gives rct a terminal");
    let mut keyboard = terminal.stdin.take().unwrap();
    let typist = std::thread::spawn(move || {
        // Typed once the prompt is up; kept open until rct is done.
        std::thread::sleep(Duration::from_secs(2));
        keyboard
            .write_all(format!("{prompted}\n").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_secs(20));
    });
    let screen = terminal.wait_with_output().unwrap();
    let shown = text(&screen.stdout) + &text(&screen.stderr);
    assert!(screen.status.success(), "{shown}");
    assert!(shown.contains("value (secret, not echoed): "), "{shown}");
    assert!(!shown.contains(prompted), "echoed: {shown}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&received).unwrap()).unwrap();
    assert_eq!(got["env"], prompted);
    let prompted_id = command_id(&shown);
    drop(typist);

    // A value typed on the command line still works, with one warning.
    let typed = rct(
        &home,
        &[
            "run",
            "workloads/set-secret",
            "-p",
            "namespace=shop",
            "-p",
            "name=db",
            "-p",
            "key=password",
            "-p",
            "value=typed-on-the-line",
            "-j",
            "SEC-43",
        ],
        "",
    );
    let warned = text(&ok(typed).stderr);
    let typed_id = command_id(&warned);
    assert_eq!(warned.matches("warning:").count(), 1, "{warned}");
    assert!(
        warned.contains("stays in shell history and shows in ps"),
        "{warned}"
    );
    // Without a terminal and without a value: an error that says how to give it.
    let missing = rct(&home, &set_secret(&["-j", "SEC-44"]), "");
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr)
            .contains("missing parameter value (secret): give - to read it from stdin, or @FILE"),
        "{}",
        text(&missing.stderr)
    );

    // Everything of the three commands, as a person or a program reads it.
    let ids = [&id, &prompted_id, &typed_id];
    let mut shown = String::new();
    for id in ids {
        let show = ok(rct(&home, &["show", id], ""));
        let this = text(&show.stdout) + &text(&show.stderr);
        assert!(this.contains("done with ***"), "{id}: {this}");
        shown += &this;
    }
    let history = ok(rct(&home, &["history", "--output", "json"], ""));
    let history = text(&history.stdout);
    // The notifier posts each command's start and end.
    let started = Instant::now();
    let posted = loop {
        let posted = bodies.lock().unwrap().join("\n");
        if ids
            .iter()
            .all(|id| posted.matches(id.as_str()).count() >= 2)
        {
            break posted;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the notifier posted {posted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for id in ids {
        assert!(history.contains(id.as_str()), "{history}");
    }

    use base64::Engine as _;
    let needles: Vec<String> = [SECRET, prompted, "typed-on-the-line"]
        .into_iter()
        .flat_map(|value| {
            [
                value.to_owned(),
                base64::engine::general_purpose::STANDARD.encode(value),
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(value),
            ]
        })
        .collect();
    let outputs = [
        ("admission log", admission.log()),
        ("agent log", agent.log()),
        ("rct show", shown),
        ("rct history --output json", history),
        ("webhook bodies", posted),
        ("rct's own output", text(&fired.stdout) + &stderr + &warned),
    ];
    // Written to files, the logs carry no escape codes.
    for (what, output) in &outputs[..2] {
        assert!(
            !output.contains('\x1b'),
            "escape codes in the {what}:\n{output}"
        );
    }
    for needle in &needles {
        for (what, output) in &outputs {
            assert!(
                !output.contains(needle.as_str()),
                "{what} holds {needle:?}:\n{output}"
            );
        }
        let found = files_with(&server.store_dir(), needle.as_bytes());
        assert_eq!(
            found,
            Vec::<PathBuf>::new(),
            "the JetStream store holds {needle:?}"
        );
    }
    // The store holds what the script printed around the values.
    assert!(!files_with(&server.store_dir(), b"done with ***").is_empty());

    // An agent whose scripts would put the secret into argv does not start.
    std::fs::write(
        work.join("leaky.yaml"),
        format!(
            "tower: workloads\noperations:\n  set-secret:\n    command: {script:?}\n    \
             args: [\"--value={{value}}\"]\n"
        ),
    )
    .unwrap();
    let leaky = Command::new(bin.join("rct-agent"))
        .args(["--scripts".as_ref(), work.join("leaky.yaml").as_os_str()])
        .args(["--server", &server.url(), "--instance", "leaky"])
        .args([
            "--trusted-key".as_ref(),
            work.join("admission.pub").as_os_str(),
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(leaky.status.code(), Some(2));
    assert!(
        text(&leaky.stderr)
            .contains("operation set-secret: --value={value} puts a secret parameter into argv"),
        "{}",
        text(&leaky.stderr)
    );
}
