//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use rct_bus::proto::{self, event::Kind};
use rct_bus::{CommandId, Tower};
use rct_streams::timestamp::from_datetime;
use time::OffsetDateTime;

pub fn tower(name: &str) -> Tower {
    name.parse().unwrap()
}

pub fn event(id: CommandId, target: &str, kind: Kind) -> proto::Event {
    proto::Event {
        command_id: id.to_string(),
        at: Some(from_datetime(OffsetDateTime::now_utc())),
        source: "test".into(),
        operation: "traffic/drain-cluster".into(),
        target: target.into(),
        kind: Some(kind),
    }
}

pub fn started() -> Kind {
    Kind::Started(proto::Started {
        agent: "agent-1".into(),
        host: "host-1".into(),
        target: "prod-1".into(),
        without_running: false,
    })
}

pub fn progress(percent: u32) -> Kind {
    Kind::Progress(proto::Progress {
        percent,
        step: "step".into(),
        message: String::new(),
    })
}

pub fn admitted() -> Kind {
    Kind::Admitted(proto::Admitted::default())
}

pub fn succeeded() -> Kind {
    Kind::Succeeded(proto::Succeeded::default())
}
