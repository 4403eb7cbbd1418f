//! The catalog reloads without a restart: checked first, put in force and served when sound,
//! kept when not, and every reload (or refusal to) recorded as an event.

mod support;

use std::time::Duration;

use futures::StreamExt;
use rct_bus::proto::{self, RejectionCode as C, event::Kind, value::Kind as V};
use rct_streams::replay::{self, Filter, Item};
use support::{Harness, rejection, run, value};

const HELLO: &str = "  traffic/hello:
    description: Say hello to a cluster
    allowed_groups: [sre_team]
    params:
      cluster: { type: target }
";

fn hello() -> proto::Submission {
    run(
        "traffic/hello",
        "prod-1",
        [("cluster", value(V::Target("prod-1".into())))],
        "SRE-1",
    )
}

/// The next `_catalog/reload` event of `kind`'s slot after `from`, within 10 s.
async fn reload_event(
    js: &async_nats::jetstream::Context,
    wanted: fn(&Kind) -> bool,
) -> proto::Event {
    let filter = Filter {
        tower: Some(rct_admission::CATALOG_TOWER.parse().unwrap()),
        ..Filter::default()
    };
    let mut events = replay::follow(js, &filter).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(item) = events.next().await {
            if let Ok(Item::Event(record)) = item
                && record.event.kind.as_ref().is_some_and(wanted)
            {
                return record.event;
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("no reload recorded")
}

async fn served_version(js: &async_nats::jetstream::Context) -> String {
    let bucket = js
        .get_key_value(rct_streams::topology::CATALOG_BUCKET)
        .await
        .unwrap();
    let served: rct_bus::catalog::Served = serde_json::from_slice(
        &bucket
            .get(rct_streams::topology::CATALOG_KEY)
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    served.version
}

#[tokio::test]
async fn a_changed_catalog_file_is_put_in_force_and_a_broken_one_is_refused_on_record() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("catalog.yaml");
    let example = std::fs::read_to_string(support::catalog_path()).unwrap();
    std::fs::write(&file, &example).unwrap();
    let watched = file.clone();
    let h = Harness::start_with(move |c| {
        c.catalog = watched.clone();
        c.watch_catalog = Some(Duration::from_millis(100));
    })
    .await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let before = served_version(&h.js).await;

    // Not in the catalog yet.
    let sequence = h.submit(&alice, &hello()).await;
    assert_eq!(
        rejection(&h.decision(sequence).await).unwrap().0,
        C::UnknownOperation
    );

    // Added to the file: in force, served, recorded with both versions.
    let with_hello = example.replacen("operations:\n", &format!("operations:\n{HELLO}"), 1);
    std::fs::write(&file, &with_hello).unwrap();
    let loaded = reload_event(&h.js, |k| matches!(k, Kind::Succeeded(_))).await;
    let Some(Kind::Succeeded(succeeded)) = &loaded.kind else {
        unreachable!()
    };
    let after = succeeded.outputs["version"].clone();
    assert_ne!(after, before);
    assert_eq!(succeeded.outputs["previous"], before);
    assert!(
        succeeded.summary.contains("added traffic/hello"),
        "{}",
        succeeded.summary
    );
    assert_eq!(served_version(&h.js).await, after);
    let sequence = h.submit(&alice, &hello()).await;
    let Some(Kind::Admitted(admitted)) = h.decision(sequence).await.kind else {
        panic!("the reloaded catalog's operation was not admitted");
    };
    assert_eq!(admitted.catalog_version, after);

    // A broken file: refused with its problems, on record; the catalog in force stays.
    std::fs::write(
        &file,
        with_hello.replacen(
            "    allowed_groups: [sre_team]\n    params:\n      cluster: { type: target }",
            "    allowed_groupz: [sre_team]\n    params:\n      cluster: { type: target }",
            1,
        ),
    )
    .unwrap();
    let refused = reload_event(&h.js, |k| matches!(k, Kind::Rejected(_))).await;
    let Some(Kind::Rejected(rejected)) = &refused.kind else {
        unreachable!()
    };
    assert!(
        rejected.message.contains("unknown field `allowed_groupz`")
            && rejected
                .message
                .contains(&format!("catalog {after} stays in force")),
        "{}",
        rejected.message
    );
    assert_eq!(refused.operation, "_catalog/reload");
    assert_eq!(served_version(&h.js).await, after);
    let sequence = h.submit(&alice, &hello()).await;
    assert!(
        matches!(h.decision(sequence).await.kind, Some(Kind::Admitted(_))),
        "the catalog in force still decides"
    );
}

/// The binary reloads on SIGHUP, and prints the public half of its generated key, which it
/// also wrote next to the key.
#[tokio::test]
async fn sighup_reloads_the_binarys_catalog_and_its_public_key_is_printed_and_written() {
    let server = rct_streams::testkit::Server::start().await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client);
    rct_streams::provision(&js, &rct_streams::Config::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("catalog.yaml");
    let example = std::fs::read_to_string(support::catalog_path()).unwrap();
    std::fs::write(&file, &example).unwrap();
    let key = dir.path().join("admission.key");
    let admission = |extra: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rct-admission"));
        command
            .args(["--server", &server.url(), "--catalog"])
            .arg(&file)
            .arg("--signing-key")
            .arg(&key)
            .args(extra)
            .env("RCT_DEV_ISSUER", "true")
            .env("RCT_GENERATE_KEY", "true")
            .stdin(std::process::Stdio::null());
        command
    };
    let printed = admission(&["--print-public-key"]).output().unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let written = std::fs::read_to_string(dir.path().join("admission.pub")).unwrap();
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), written);
    assert!(written.contains("PUBLIC KEY"), "{written}");
    // The public half of the signing key itself, not merely what was printed.
    let signing = rct_bus::KeyPair::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
    assert_eq!(written, signing.public().to_pem());

    let mut child = admission(&[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Ready once it serves the catalog.
    let started = std::time::Instant::now();
    while js
        .get_key_value(rct_streams::topology::CATALOG_BUCKET)
        .await
        .unwrap()
        .get(rct_streams::topology::CATALOG_KEY)
        .await
        .unwrap()
        .is_none()
    {
        assert!(started.elapsed() < Duration::from_secs(30), "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = served_version(&js).await;
    std::fs::write(
        &file,
        example.replacen("operations:\n", &format!("operations:\n{HELLO}"), 1),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let loaded = reload_event(&js, |k| matches!(k, Kind::Succeeded(_))).await;
    let Some(Kind::Succeeded(succeeded)) = &loaded.kind else {
        unreachable!()
    };
    assert_eq!(succeeded.outputs["previous"], before);
    assert_eq!(served_version(&js).await, succeeded.outputs["version"]);
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop it"
    );
    let _ = child.kill();
    let _ = child.wait();
}
