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

/// A protobuf duration as a std duration: negative parts count as zero, and nothing panics
/// whatever the fields hold.
pub fn to_std_duration(d: &prost_types::Duration) -> std::time::Duration {
    let seconds = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u64::try_from(d.nanos).unwrap_or(0);
    std::time::Duration::from_secs(seconds).saturating_add(std::time::Duration::from_nanos(nanos))
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

    #[test]
    fn absurd_durations_convert_without_panicking() {
        use prost_types::Duration as D;
        let huge = D {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert!(to_std_duration(&huge) >= std::time::Duration::from_secs(i64::MAX as u64));
        let negative = D {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(to_std_duration(&negative), std::time::Duration::ZERO);
        let plain = D {
            seconds: 2,
            nanos: 500,
        };
        assert_eq!(to_std_duration(&plain), std::time::Duration::new(2, 500));
    }
}
