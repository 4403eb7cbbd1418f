//! Conversions between protobuf timestamps and `time`'s date-times.

use prost_types::Timestamp;
use time::OffsetDateTime;

/// A protobuf timestamp as a UTC date-time; `None` if out of range.
pub fn to_datetime(ts: &Timestamp) -> Option<OffsetDateTime> {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// A date-time as a protobuf timestamp.
pub fn from_datetime(at: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: at.unix_timestamp(),
        nanos: at.nanosecond() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(to_datetime(&from_datetime(now)), Some(now));
        assert_eq!(
            to_datetime(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            }),
            None
        );
    }
}
