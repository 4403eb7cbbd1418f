//! The deployment files are checked against the code they deploy: every flag a systemd unit
//! or a Kubernetes container passes exists, every embedded configuration loads with the
//! component's own loader (unknown keys refused), every path a configuration names is
//! mounted, probes and ports agree with the telemetry listener, the scripts' placeholders are
//! the catalog's parameters, the hardening is there, and the alert rules name real metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use serde::Deserialize;
use serde_yaml_ng::Value;

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// The long flags of an rct binary, from its own argument definitions.
fn flags(binary: &str) -> BTreeSet<String> {
    let command = match binary {
        "rct-admission" => rct_admission::cli::Args::command(),
        "rct-agent" => rct_agents::cli::ScriptAgent::command(),
        other => panic!("{other} is not an rct binary"),
    };
    command
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

/// Checks an rct command line; the value of `--config`, if any.
fn check_command_line(what: &str, words: &[String]) -> Option<String> {
    let binary = Path::new(&words[0])
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let known = flags(&binary);
    let mut config = None;
    for (i, word) in words.iter().enumerate().skip(1) {
        if word.starts_with("--") {
            assert!(known.contains(word), "{what}: {binary} has no flag {word}");
            if word == "--config" {
                config = words.get(i + 1).cloned();
            }
        }
    }
    config
}

/// The settings a component reads from `RCT_*` variables are real settings: loading an
/// empty configuration with them must not fail on an unknown key.
fn check_env(what: &str, binary_config: &str, env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, binary_config).unwrap();
    let result = match binary_config_kind(binary_config) {
        Kind::Admission => rct_admission::Config::load(Some(&file), env.to_vec()).map(|_| ()),
        Kind::Agent => rct_agents::Config::load(Some(&file), env.to_vec()).map(|_| ()),
    };
    if let Err(e) = result {
        assert!(!e.contains("unknown field"), "{what}: {e}");
    }
}

enum Kind {
    Admission,
    Agent,
}

fn binary_config_kind(text: &str) -> Kind {
    if text.contains("trusted_keys") {
        Kind::Agent
    } else {
        Kind::Admission
    }
}

// ---------------------------------------------------------------------------------------------
// systemd

fn unit(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not key=value: {line}", path.display()));
        entries
            .entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    entries
}

/// `systemd-analyze security`'s overall exposure (0 safest, 10 worst), when it is installed.
fn exposure(path: &Path) -> Option<f64> {
    let output = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(path)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    line.split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_systemd_units_match_the_binaries_and_are_hardened() {
    let dir = ops().join("systemd");
    let seed = regex::Regex::new(r"\bS[UAO][A-Z2-7]{50,}").unwrap();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let unit = unit(&path);
        let exec = &unit["ExecStart"];
        assert_eq!(exec.len(), 1, "{name}");
        let words: Vec<String> = exec[0].split_whitespace().map(String::from).collect();
        check_command_line(&name, &words);
        let env: Vec<(String, String)> = unit
            .get("Environment")
            .into_iter()
            .flatten()
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let minimal = if words[0].ends_with("rct-agent") {
            "trusted_keys: [/k.pem]\n"
        } else {
            "dev_issuer: true\n"
        };
        check_env(&name, minimal, &env);

        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            ("Restart", "always"),
        ] {
            assert_eq!(
                unit.get(key).map(|v| v[0].as_str()),
                Some(value),
                "{name}: {key}"
            );
        }
        let own_user = unit.get("DynamicUser").is_some_and(|v| v[0] == "yes")
            || unit.get("User").is_some_and(|v| v[0] != "root");
        assert!(own_user, "{name}: runs as root");
        // Secrets come as credentials, never from the unit file.
        assert!(
            !seed.is_match(&std::fs::read_to_string(&path).unwrap()),
            "{name} holds a seed"
        );
        if let Some(level) = exposure(&path) {
            let limit = if name.starts_with("rct-agent") {
                3.5
            } else {
                2.0
            };
            assert!(level <= limit, "{name}: exposure {level} > {limit}");
        }
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "rct-admission.service",
            "rct-agent@.service",
            "rct-notifier.service"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(ops().join("kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            for key in ["apiVersion", "kind"] {
                assert!(value[key].is_string(), "{name}: a document without {key}");
            }
            assert!(
                value["metadata"]["name"].is_string(),
                "{name}: unnamed {:?}",
                value["kind"]
            );
            docs.push((name.clone(), value));
        }
    }
    docs
}

fn str_list(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| s.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// The files of ConfigMaps and Secrets defined in the manifests, by object name.
fn files(docs: &[(String, Value)]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (_, doc) in docs {
        let kind = doc["kind"].as_str().unwrap();
        let data = match kind {
            "ConfigMap" => &doc["data"],
            "Secret" => &doc["stringData"],
            _ => continue,
        };
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let entries = data
            .as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().unwrap().to_owned(),
                            v.as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.insert(name, entries);
    }
    out
}

/// Where a container mounts what: mount path → (ConfigMap or Secret name).
fn mounts(pod: &Value, claims: &Value, container: &Value) -> BTreeMap<String, String> {
    let mut volumes: BTreeMap<String, String> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| {
            let source = v["configMap"]["name"]
                .as_str()
                .or_else(|| v["secret"]["secretName"].as_str())
                .unwrap_or("")
                .to_owned();
            (v["name"].as_str().unwrap().to_owned(), source)
        })
        .collect();
    // A StatefulSet's volume claims.
    for claim in claims.as_sequence().into_iter().flatten() {
        let name = claim["metadata"]["name"].as_str().unwrap().to_owned();
        volumes.insert(name, String::new());
    }
    container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|m| {
            let volume = m["name"].as_str().unwrap();
            (
                m["mountPath"].as_str().unwrap().to_owned(),
                volumes
                    .get(volume)
                    .unwrap_or_else(|| panic!("volume {volume} is not defined"))
                    .clone(),
            )
        })
        .collect()
}

/// The file at `path` inside a container: the mount that holds it, and its text when the
/// ConfigMap or Secret behind it is in the manifests.
fn mounted<'a>(
    what: &str,
    path: &str,
    mounts: &BTreeMap<String, String>,
    files: &'a BTreeMap<String, BTreeMap<String, String>>,
) -> Option<&'a String> {
    let (dir, source) = mounts
        .iter()
        .find(|(dir, _)| Path::new(path).parent() == Some(Path::new(dir.as_str())))
        .unwrap_or_else(|| panic!("{what}: nothing is mounted where {path} is"));
    let name = Path::new(path).file_name().unwrap().to_string_lossy();
    let object = files.get(source)?;
    Some(
        object
            .get(name.as_ref())
            .unwrap_or_else(|| panic!("{what}: {source} mounted at {dir} has no {name}")),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_kubernetes_manifests_match_the_binaries_and_their_configuration() {
    let docs = documents();
    let files = files(&docs);
    let tmp = tempfile::tempdir().unwrap();
    let mut rct_containers = 0;
    let mut scripts_checked = 0;
    let catalog = files["rct-admission"]["catalog.yaml"].clone();
    let catalog =
        rct_admission::catalog::parse(&write(tmp.path(), "catalog.yaml", &catalog), &catalog)
            .expect("the catalog in admission.yaml loads");

    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap();
        if !["Deployment", "StatefulSet"].contains(&kind) {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap();
        let what = format!("{file}: {kind} {name}");
        let pod = &doc["spec"]["template"]["spec"];
        for container in pod["containers"].as_sequence().unwrap() {
            let security = &container["securityContext"];
            assert_eq!(
                security["allowPrivilegeEscalation"],
                Value::Bool(false),
                "{what}"
            );
            assert_eq!(
                security["readOnlyRootFilesystem"],
                Value::Bool(true),
                "{what}"
            );
            assert_eq!(
                str_list(&security["capabilities"]["drop"]),
                ["ALL"],
                "{what}"
            );
            let mounts = mounts(pod, &doc["spec"]["volumeClaimTemplates"], container);
            let command = str_list(&container["command"]);
            let args = str_list(&container["args"]);

            // nats-server: the config it reads is one of ops/nats.
            if command.is_empty() {
                let conf = args[args.iter().position(|a| a == "-c").unwrap() + 1].clone();
                let shipped = Path::new(&conf).file_name().unwrap();
                assert!(
                    ops().join("nats").join(shipped).is_file(),
                    "{what}: {conf} is not in ops/nats"
                );
                continue;
            }

            rct_containers += 1;
            let words: Vec<String> = command.iter().chain(&args).cloned().collect();
            let config_path =
                check_command_line(&what, &words).unwrap_or_else(|| panic!("{what}: no --config"));
            let config_text = mounted(&what, &config_path, &mounts, &files)
                .unwrap_or_else(|| panic!("{what}: {config_path} is not in the manifests"));
            let env: Vec<(String, String)> = container["env"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|e| e["value"].is_string() || e["valueFrom"].is_mapping())
                .map(|e| {
                    let value = e["value"].as_str().unwrap_or("from-the-pod");
                    (e["name"].as_str().unwrap().to_owned(), value.to_owned())
                })
                .collect();
            let config_file = write(tmp.path(), "component.yaml", config_text);
            let (paths, listen): (Vec<String>, String) = if command[0] == "rct-agent" {
                let config = rct_agents::Config::load(Some(&config_file), env.clone())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let scripts = args[args.iter().position(|a| a == "--scripts").unwrap() + 1].clone();
                let text = mounted(&what, &scripts, &mounts, &files).unwrap();
                let scripts =
                    rct_agents::script::Scripts::load(&write(tmp.path(), "scripts.yaml", text))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                check_placeholders(&what, text, &scripts.tower, &catalog);
                scripts_checked += 1;
                let mut paths: Vec<String> = config
                    .trusted_keys
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                paths.extend(config.nats.nkey_file.map(|p| p.display().to_string()));
                (paths, config.telemetry.listen.unwrap().to_string())
            } else {
                let config = rct_admission::Config::load(Some(&config_file), env.clone())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut paths = vec![config.catalog.display().to_string()];
                if config.role != rct_admission::Role::Notify {
                    paths.push(config.signing_key.display().to_string());
                    assert_eq!(doc["spec"]["replicas"].as_u64(), Some(2), "{what}");
                }
                paths.extend(config.nats.nkey_file.map(|p| p.display().to_string()));
                (paths, config.telemetry.listen.unwrap().to_string())
            };
            // Every file the configuration names is mounted (and, when the manifests define
            // its ConfigMap or Secret, is in it).
            for path in paths {
                mounted(&what, &path, &mounts, &files);
            }
            // The probes hit the telemetry listener.
            let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
            let ports = container["ports"].as_sequence().unwrap();
            let telemetry = ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == Some(port))
                .unwrap_or_else(|| panic!("{what}: port {port} is not declared"));
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"].as_str(), Some(path), "{what}: {probe}");
                assert_eq!(get["port"], telemetry["name"], "{what}: {probe} port");
            }
        }
    }
    assert_eq!(rct_containers, 3, "admission, notifier, one agent");
    assert_eq!(scripts_checked, 1);

    // The agent talks to its leaf node only.
    let policy = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| d["metadata"]["name"] == "rct-agent-egress-only")
        .expect("the agent's network policy");
    assert_eq!(
        str_list(&policy["spec"]["policyTypes"]),
        ["Ingress", "Egress"]
    );
    let egress = policy["spec"]["egress"].as_sequence().unwrap();
    let ports: BTreeSet<u64> = egress
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap().iter())
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([53, 4222]),
        "egress beyond the leaf and DNS"
    );
}

/// Every `{placeholder}` of a scripts file is a parameter of its operation in the catalog, or
/// one of the runner's own.
fn check_placeholders(what: &str, scripts: &str, tower: &str, catalog: &rct_bus::catalog::Catalog) {
    #[derive(Deserialize)]
    struct File {
        operations: BTreeMap<String, Op>,
    }
    #[derive(Deserialize)]
    struct Op {
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    }
    let file: File = serde_yaml_ng::from_str(scripts).unwrap();
    let placeholder = regex::Regex::new(r"\{([a-z_]+)\}").unwrap();
    for (name, op) in file.operations {
        let operation = catalog
            .operations
            .get(&format!("{tower}/{name}"))
            .unwrap_or_else(|| panic!("{what}: {tower}/{name} is not in the catalog"));
        for text in op.args.iter().chain(op.env.values()) {
            for found in placeholder.captures_iter(text) {
                let param = &found[1];
                assert!(
                    operation.params.contains_key(param)
                        || ["justification", "command_id", "operator", "dry_run"].contains(&param),
                    "{what}: {tower}/{name} has no parameter {param}"
                );
            }
        }
    }
}

#[test]
fn the_hub_and_leaf_configs_the_manifests_load_are_the_shipped_ones() {
    // The manifests say to create these ConfigMaps from ops/nats; their containers read them
    // under the names the shipped files have.
    let docs = documents();
    let mut read = BTreeSet::new();
    for (_, doc) in &docs {
        for container in doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let args = str_list(&container["args"]);
            if let Some(i) = args.iter().position(|a| a == "-c") {
                read.insert(args[i + 1].clone());
            }
        }
    }
    assert_eq!(
        read,
        BTreeSet::from([
            "/etc/nats/hub.conf".to_owned(),
            "/etc/nats/leaf.conf".to_owned()
        ])
    );
}

#[test]
fn the_alert_rules_name_metrics_rct_exports() {
    // The names registered in the code, with the suffixes Prometheus adds.
    let registered = regex::Regex::new(r#""(rct_[a-z_]+)""#).unwrap();
    let mut exported = BTreeSet::new();
    for source in [
        "../admission/src/metrics.rs",
        "../agents/src/metrics.rs",
        "../streams/src/telemetry.rs",
    ] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(source)).unwrap();
        for name in registered.captures_iter(&text) {
            for suffix in ["", "_total", "_bucket", "_sum", "_count"] {
                exported.insert(format!("{}{suffix}", &name[1]));
            }
        }
    }
    let rules: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(ops().join("prometheus/alerts.yaml")).unwrap(),
    )
    .unwrap();
    let used = regex::Regex::new(r"\b(rct_[a-z_]+)").unwrap();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            for metric in used.captures_iter(expr) {
                assert!(
                    exported.contains(&metric[1]),
                    "{name}: {} is not a metric rct exports",
                    &metric[1]
                );
            }
            assert!(rule["annotations"]["summary"].is_string(), "{name}");
            alerts += 1;
        }
    }
    assert!(alerts >= 8, "{alerts}");
}
