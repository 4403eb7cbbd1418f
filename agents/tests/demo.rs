//! The demo towers against a real nats-server: the traffic tower on its simulated load
//! balancer, and the workloads scripts of ops/examples with the example catalog.

mod support;

use std::path::Path;

use rct_agents::demo::{LoadBalancer, traffic_tower};
use rct_agents::script::Scripts;
use rct_bus::proto::{self, event::Kind};
use support::{Harness, outcome, target};

fn int(i: i64) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::Integer(i)),
    }
}

fn string(s: &str) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::String(s.into())),
    }
}

#[tokio::test]
async fn the_traffic_tower_drains_gradually_and_reports_the_weight_table() {
    let h = Harness::start().await;
    let lb = LoadBalancer::open(&h.js).await.unwrap();
    let clusters: Vec<String> = ["prod-1", "prod-2"].map(String::from).to_vec();
    let agent = h.run(traffic_tower(lb.clone(), "prod-1", clusters).config(h.config("edge")));

    // A dry run changes nothing.
    let mut dry = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1")), ("keep_percent", int(0))],
    );
    dry.dry_run = true;
    h.publish(&dry).await;
    let records = h.finished(&dry.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Succeeded(_)),
        "{records:#?}"
    );
    assert_eq!(lb.weight("prod-1").await.unwrap(), 100);

    let drain = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1")), ("keep_percent", int(10))],
    );
    h.publish(&drain).await;
    let records = h.finished(&drain.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "prod-1 drained to weight 10");
    assert_eq!(succeeded.outputs["prod-1"], "10");
    assert_eq!(succeeded.outputs["prod-2"], "100");
    let steps: Vec<u32> = records
        .iter()
        .filter_map(|r| match &r.event.kind {
            Some(Kind::Progress(p)) => Some(p.percent),
            _ => None,
        })
        .collect();
    assert_eq!(steps.last(), Some(&100));
    assert!(steps.len() >= 2, "gradual: {steps:?}");
    assert_eq!(lb.weight("prod-1").await.unwrap(), 10);

    let weights = h.command(
        "traffic/set-weights",
        "prod-1",
        &[("cluster", target("prod-1")), ("weight", int(60))],
    );
    h.publish(&weights).await;
    assert!(matches!(
        outcome(&h.finished(&weights.command_id).await),
        Kind::Succeeded(_)
    ));
    assert_eq!(lb.weight("prod-1").await.unwrap(), 60);
    agent.stop().await;
}

#[tokio::test]
async fn the_example_workloads_scripts_run_with_the_example_catalog() {
    let h = Harness::start().await;
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/examples/workloads.yaml");
    let config = rct_agents::Config {
        secret_keys: vec![support::example_key_file()],
        ..h.config("w")
    };
    let agent = h.run(Scripts::load(&file).unwrap().tower().config(config));

    let restart = h.command(
        "workloads/restart",
        "_",
        &[
            ("namespace", string("shop")),
            ("deployment", string("cart")),
            (
                "strategy",
                proto::Value {
                    kind: Some(proto::value::Kind::Enumeration("rolling".into())),
                },
            ),
        ],
    );
    h.publish(&restart).await;
    let records = h.finished(&restart.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "shop/cart: 3 pods restarted");

    let secret = "correct horse battery staple";
    let mut set = h.command(
        "workloads/set-secret",
        "_",
        &[
            ("namespace", string("shop")),
            ("name", string("db")),
            ("key", string("password")),
        ],
    );
    let value = support::sealed_for(&set, "value", secret, &[support::example_recipient()]);
    set.params.insert("value".into(), value);
    h.publish(&set).await;
    let records = h.finished(&set.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(
        succeeded.summary,
        "shop/db: key password set (28 characters)"
    );
    agent.stop().await;
}

/// The script-tower template runs as shipped, with its own catalog entry.
#[tokio::test]
async fn the_script_tower_template_runs() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/templates/script-tower");
    let catalog =
        serde_yaml_ng::from_str(&std::fs::read_to_string(folder.join("catalog.yaml")).unwrap())
            .unwrap();
    let h = Harness::start_with_catalog(catalog).await;
    let agent = h.run(
        Scripts::load(&folder.join("scripts.yaml"))
            .unwrap()
            .tower()
            .config(h.config("t")),
    );
    let greet = h.command("hello/greet", "_", &[("name", string("Ada"))]);
    h.publish(&greet).await;
    let records = h.finished(&greet.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "hello, Ada");
    agent.stop().await;
}
