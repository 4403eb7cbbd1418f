//! Provisioning converges a real server to the topology and is a no-op when nothing drifted.

use std::time::Duration;

use rct_streams::testkit::Server;
use rct_streams::topology::{self, ADMISSION_CONSUMER, EVENT_STREAM, SUBMIT_STREAM};
use rct_streams::{Change, Config, provision};

#[tokio::test]
async fn provisioning_twice_changes_nothing_the_second_time() {
    let server = Server::start().await;
    let js = server.jetstream().await;
    let config = Config::default();

    let first = provision(&js, &config).await.unwrap();
    let created: Vec<&str> = first.items.iter().map(|i| i.what.as_str()).collect();
    assert_eq!(
        created,
        [
            "stream RCT_SUBMIT",
            "stream RCT_CMD",
            "stream RCT_EVT",
            "bucket rct_agents",
            "bucket rct_catalog",
            "bucket rct_locks",
            "consumer RCT_SUBMIT/admission",
            "consumer RCT_EVT/notifier",
        ]
    );
    assert!(first.items.iter().all(|i| i.change == Change::Created));

    let second = provision(&js, &config).await.unwrap();
    assert!(!second.changed(), "second run changed things:\n{second}");
    assert_eq!(second.items.len(), first.items.len());
    assert!(second.warnings.is_empty());

    let events = js.get_stream(EVENT_STREAM).await.unwrap();
    let info = events.cached_info();
    assert!(info.config.deny_delete && info.config.deny_purge);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(600));
}

#[tokio::test]
async fn drifted_settings_are_converged_back() {
    let server = Server::start().await;
    let js = server.jetstream().await;
    let config = Config::default();
    provision(&js, &config).await.unwrap();

    // Someone changes things by hand.
    let mut drifted = js
        .get_stream(EVENT_STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    drifted.max_age = Duration::from_secs(3600);
    drifted.duplicate_window = Duration::from_secs(60);
    js.update_stream(&drifted).await.unwrap();
    let submit = js.get_stream(SUBMIT_STREAM).await.unwrap();
    let mut consumer = topology::admission_consumer(&config);
    consumer.max_deliver = 99;
    submit.create_consumer(consumer).await.unwrap();
    let mut bucket = topology::buckets(&config).remove(1);
    bucket.history = 2;
    js.create_or_update_key_value(bucket).await.unwrap();

    let report = provision(&js, &config).await.unwrap();
    let changes: Vec<(&str, &Change)> = report
        .items
        .iter()
        .filter(|i| i.change != Change::Unchanged)
        .map(|i| (i.what.as_str(), &i.change))
        .collect();
    assert_eq!(
        changes,
        [
            (
                "stream RCT_EVT",
                &Change::Updated(vec!["duplicate_window".into(), "max_age".into()])
            ),
            (
                "bucket rct_catalog",
                &Change::Updated(vec!["max_msgs_per_subject".into()])
            ),
            (
                "consumer RCT_SUBMIT/admission",
                &Change::Updated(vec!["max_deliver".into()])
            ),
        ],
        "{report}"
    );

    let info = js.get_stream(EVENT_STREAM).await.unwrap();
    assert_eq!(info.cached_info().config.max_age, Duration::ZERO);
    let consumer = submit.consumer_info(ADMISSION_CONSUMER).await.unwrap();
    assert_eq!(consumer.config.max_deliver, config.admission.max_deliver);
    assert!(!provision(&js, &config).await.unwrap().changed());
}

#[tokio::test]
async fn deny_delete_and_purge_are_one_way_and_say_so() {
    let server = Server::start().await;
    let js = server.jetstream().await;
    let open = Config {
        deny_delete: false,
        deny_purge: false,
        ..Config::default()
    };
    provision(&js, &open).await.unwrap();

    let report = provision(&js, &Config::default()).await.unwrap();
    assert!(report.items[..3].iter().all(|i| matches!(
        &i.change,
        Change::Updated(fields) if fields == &["deny_delete", "deny_purge"]
    )));

    let report = provision(&js, &open).await.unwrap();
    assert!(!report.changed(), "{report}");
    assert_eq!(report.warnings.len(), 6, "{report}");
    assert!(
        report.warnings[0].contains("deny_delete is on and can never be turned off"),
        "{report}"
    );
}

#[tokio::test]
async fn tower_consumers_are_created_and_converged() {
    let server = Server::start().await;
    let js = server.jetstream().await;
    let config = Config::default();
    provision(&js, &config).await.unwrap();
    let tower = "traffic".parse().unwrap();
    let target = "prod-1".parse().unwrap();
    let desired = topology::tower_consumer(&config, &tower, Some(&target));

    let item = topology::ensure_consumer(&js, topology::COMMAND_STREAM, desired.clone())
        .await
        .unwrap();
    assert_eq!(item.what, "consumer RCT_CMD/tower-traffic@prod-1");
    assert_eq!(item.change, Change::Created);
    let again = topology::ensure_consumer(&js, topology::COMMAND_STREAM, desired)
        .await
        .unwrap();
    assert_eq!(again.change, Change::Unchanged);
}

#[tokio::test]
async fn invalid_settings_are_refused_before_touching_the_server() {
    let server = Server::start().await;
    let js = server.jetstream().await;
    let config = Config {
        replicas: 2,
        ..Config::default()
    };
    let error = provision(&js, &config).await.unwrap_err();
    assert!(
        error.to_string().contains("replicas must be 1, 3 or 5"),
        "{error}"
    );
    assert!(js.get_stream(EVENT_STREAM).await.is_err());
}

/// Where signed events begin is marked once: after what is stored then. A mark deleted
/// later (by anyone who may write the bucket) is not made again after the events stored
/// since, which would turn unsigned ones among them into history: it is found again at the
/// first signed event.
#[tokio::test]
async fn the_signed_from_mark_once_lost_is_found_again_at_the_first_signed_event() {
    let server = Server::start().await;
    let js = server.jetstream().await;
    provision(&js, &Config::default()).await.unwrap();
    let publish = |signed: bool, n: u32| {
        let js = js.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            if signed {
                headers.insert(rct_bus::provenance::HEADER, "anything");
            }
            let subject = format!("rct.evt.traffic.prod-1.01J0000000000000000000000{n}.progress");
            js.publish_with_headers(subject, headers, "x".into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    // Two events from before signing.
    publish(false, 1).await;
    publish(false, 2).await;
    assert_eq!(topology::mark_signed_from(&js).await.unwrap(), 3);
    let first_signed = publish(true, 3).await;
    publish(false, 4).await;
    publish(true, 5).await;
    assert_eq!(
        topology::mark_signed_from(&js).await.unwrap(),
        3,
        "a mark stays"
    );

    js.get_key_value(topology::CATALOG_BUCKET)
        .await
        .unwrap()
        .delete(topology::SIGNED_FROM_KEY)
        .await
        .unwrap();
    assert_eq!(topology::signed_from(&js).await.unwrap(), None);
    assert_eq!(
        topology::mark_signed_from(&js).await.unwrap(),
        first_signed,
        "the unsigned event after the first signed one would read as history"
    );
}
