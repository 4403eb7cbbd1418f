//! Freeze windows: times when the operations of some towers are refused (code `frozen`). The
//! catalog names them (fixed dates, or a cron schedule with a duration in a time zone);
//! `rct freeze start` adds one on record. Only break-glass runs through a freeze.

use std::str::FromStr;
use std::time::Duration;

use jiff::{Timestamp, tz::TimeZone};
use serde::{Deserialize, Serialize};

/// The tower freezes are recorded under: `_freeze/<tower>` starts or ends one of `<tower>`.
pub const TOWER: &str = "_freeze";

/// Longest freeze `rct freeze start` may ask for. Admission reads freezes started within it.
pub const LONGEST_FREEZE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A window in the catalog: from `start` to `end`, or from each time `cron` fires (in
/// `timezone`, UTC by default) for `duration`. `towers` empty: every tower.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    /// What people call it; refusals name it.
    pub name: String,
    /// A fixed window's first instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Timestamp>,
    /// A fixed window's end (RFC 3339), not included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Timestamp>,
    /// When a recurring window opens: a cron pattern (`0 16 * * FRI`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// How long a recurring window stays open.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub duration: Option<Duration>,
    /// The time zone `cron` is read in (an IANA name: `America/New_York`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The towers it freezes; none named: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub towers: Vec<String>,
}

/// A freeze in force: its name and when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Active {
    /// The window's name.
    pub name: String,
    /// When it ends.
    pub until: Timestamp,
}

impl Active {
    /// The refusal's sentence for `operation`.
    pub fn refusal(&self, operation: &str) -> String {
        format!(
            "{operation} is frozen by {} until {}; wait until then, or break the glass if it \
             cannot wait (--break-glass REASON, where the operation allows it)",
            self.name,
            seconds(self.until)
        )
    }
}

/// `t` to the second, rounded up: a freeze said to end then has ended.
pub fn seconds(t: Timestamp) -> Timestamp {
    t.round(
        jiff::TimestampRound::new()
            .smallest(jiff::Unit::Second)
            .mode(jiff::RoundMode::Ceil),
    )
    .unwrap_or(t)
}

enum Schedule {
    Fixed(Timestamp, Timestamp),
    Recurring(Box<croner::Cron>, jiff::SignedDuration, TimeZone),
}

impl Freeze {
    /// Whether it freezes `tower`.
    pub fn covers(&self, tower: &str) -> bool {
        self.towers.is_empty() || self.towers.iter().any(|t| t == tower)
    }

    fn schedule(&self) -> Result<Schedule, String> {
        match (
            self.start,
            self.end,
            self.cron.as_deref(),
            self.duration,
            self.timezone.as_deref(),
        ) {
            (Some(start), Some(end), None, None, None) if start < end => {
                Ok(Schedule::Fixed(start, end))
            }
            (Some(start), Some(end), None, None, None) => Err(format!(
                "freeze {}: end {end} is not after start {start}",
                self.name
            )),
            (None, None, Some(cron), Some(duration), timezone) => {
                let cron = croner::Cron::from_str(cron)
                    .map_err(|e| format!("freeze {}: cron {cron:?}: {e}", self.name))?;
                let zone = match timezone {
                    None => TimeZone::UTC,
                    Some(name) => TimeZone::get(name).map_err(|e| {
                        format!("freeze {}: unknown time zone {name:?}: {e}", self.name)
                    })?,
                };
                if duration.is_zero() || duration > LONGEST_FREEZE {
                    return Err(format!(
                        "freeze {}: duration must be longer than zero and at most {}",
                        self.name,
                        humantime::format_duration(LONGEST_FREEZE)
                    ));
                }
                let duration = jiff::SignedDuration::try_from(duration)
                    .map_err(|e| format!("freeze {}: duration: {e}", self.name))?;
                Ok(Schedule::Recurring(Box::new(cron), duration, zone))
            }
            _ => Err(format!(
                "freeze {} needs either `start` and `end`, or `cron` and `duration` (with an \
                 optional `timezone`)",
                self.name
            )),
        }
    }

    /// What is wrong with it, if anything.
    pub fn problem(&self) -> Option<String> {
        if self.name.trim().is_empty() {
            return Some("a freeze needs a `name`".into());
        }
        self.schedule().err()
    }

    /// Whether it is in force at `now`, and until when (a recurring window that opens again
    /// before it closes runs on).
    pub fn active_at(&self, now: Timestamp) -> Option<Active> {
        let until = match self.schedule().ok()? {
            Schedule::Fixed(start, end) => (start <= now && now < end).then_some(end)?,
            Schedule::Recurring(cron, duration, zone) => {
                let here = now.to_zoned(zone);
                let opened = cron.find_previous_occurrence(&here, true).ok()?;
                let mut until = opened.timestamp().checked_add(duration).ok()?;
                if now >= until {
                    return None;
                }
                let mut last = opened;
                for _ in 0..1000 {
                    let Ok(next) = cron.find_next_occurrence(&last, false) else {
                        break;
                    };
                    if next.timestamp() >= until {
                        break;
                    }
                    until = until.max(next.timestamp().checked_add(duration).ok()?);
                    last = next;
                }
                until
            }
        };
        Some(Active {
            name: self.name.clone(),
            until,
        })
    }
}

/// The freezes among `windows` in force for `tower` at `now`, longest first.
pub fn active<'a>(
    windows: impl IntoIterator<Item = &'a Freeze>,
    tower: &str,
    now: Timestamp,
) -> Vec<Active> {
    let mut active: Vec<Active> = windows
        .into_iter()
        .filter(|w| w.covers(tower))
        .filter_map(|w| w.active_at(now))
        .collect();
    active.sort_by_key(|a| std::cmp::Reverse(a.until));
    active
}

/// The freeze a tower's recorded freeze decisions (`_freeze/<tower>`, admitted, in stream
/// order) leave in force at `now`: the last one started, unless ended since or run out.
pub fn recorded<'a>(
    decisions: impl IntoIterator<Item = &'a crate::proto::Event>,
    now: Timestamp,
) -> Option<Active> {
    use crate::proto::event::Kind;
    let mut current = None;
    for decision in decisions {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            continue;
        };
        let Some(request) = &admitted.request else {
            continue;
        };
        let Some(freeze) = &request.freeze else {
            continue;
        };
        if freeze.end {
            current = None;
            continue;
        }
        let by = request.operator.as_ref().map_or("someone", |o| {
            if o.email.is_empty() {
                &o.subject
            } else {
                &o.email
            }
        });
        current = freeze
            .until
            .as_ref()
            .and_then(timestamp)
            .map(|until| Active {
                name: format!(
                    "the freeze {by} started ({}, {})",
                    request.justification, decision.command_id
                ),
                until,
            });
    }
    current.filter(|a| now < a.until)
}

/// Converts a protobuf timestamp.
pub fn timestamp(t: &prost_types::Timestamp) -> Option<Timestamp> {
    Timestamp::new(t.seconds, t.nanos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn yaml(s: &str) -> Freeze {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn a_fixed_window_covers_its_start_but_not_its_end() {
        let holiday = yaml(
            "{ name: holiday, start: '2026-12-20T00:00:00Z', end: '2027-01-04T00:00:00Z', \
             towers: [db, traffic] }",
        );
        assert!(holiday.problem().is_none());
        assert!(holiday.covers("db") && !holiday.covers("workloads"));
        assert_eq!(holiday.active_at(at("2026-12-19T23:59:59Z")), None);
        let on = holiday.active_at(at("2026-12-20T00:00:00Z")).unwrap();
        assert_eq!(on.until, at("2027-01-04T00:00:00Z"));
        assert!(holiday.active_at(at("2027-01-03T23:59:59Z")).is_some());
        assert_eq!(holiday.active_at(at("2027-01-04T00:00:00Z")), None);
    }

    #[test]
    fn a_weekly_window_is_read_in_its_time_zone() {
        // Friday 16:00 in New York for 64 h: to Monday 08:00 there.
        let release = yaml(
            "{ name: weekly-release, cron: '0 16 * * FRI', duration: 64h, \
             timezone: America/New_York }",
        );
        assert!(release.problem().is_none(), "{:?}", release.problem());
        // 2026-12-04 is a Friday; New York is UTC-5 in December.
        assert_eq!(release.active_at(at("2026-12-04T20:59:59Z")), None);
        let on = release.active_at(at("2026-12-04T21:00:00Z")).unwrap();
        assert_eq!(on.until, at("2026-12-07T13:00:00Z"));
        assert!(release.active_at(at("2026-12-07T12:59:59Z")).is_some());
        assert_eq!(release.active_at(at("2026-12-07T13:00:00Z")), None);
        // In July, New York is UTC-4: the same wall-clock hour is an hour earlier in UTC.
        assert!(release.active_at(at("2027-07-02T20:00:00Z")).is_some());
        assert!(release.covers("anything"));
    }

    #[test]
    fn a_window_that_opens_again_before_it_closes_runs_on() {
        let daily = yaml("{ name: long, cron: '0 0 * * *', duration: 36h }");
        let on = daily.active_at(at("2026-12-04T01:00:00Z")).unwrap();
        assert!(on.until > at("2027-01-01T00:00:00Z"), "{on:?}");
    }

    #[test]
    fn a_malformed_window_says_what_is_wrong() {
        for (text, says) in [
            ("{ name: a, start: '2026-12-20T00:00:00Z' }", "needs either"),
            (
                "{ name: a, start: '2026-12-20T00:00:00Z', end: '2026-12-19T00:00:00Z' }",
                "not after",
            ),
            ("{ name: a, cron: 'every friday', duration: 1h }", "cron"),
            (
                "{ name: a, cron: '0 16 * * FRI', duration: 1h, timezone: Mars/Olympus }",
                "time zone",
            ),
            (
                "{ name: a, cron: '0 16 * * FRI', duration: 0s }",
                "duration",
            ),
            ("{ name: '', cron: '0 16 * * FRI', duration: 1h }", "name"),
        ] {
            let problem = yaml(text).problem().unwrap_or_default();
            assert!(problem.contains(says), "{text}: {problem:?}");
            assert_eq!(yaml(text).active_at(at("2026-12-20T00:00:01Z")), None);
        }
    }

    #[test]
    fn the_longest_freeze_in_force_comes_first() {
        let windows = [
            yaml("{ name: short, start: '2026-12-01T00:00:00Z', end: '2026-12-02T00:00:00Z' }"),
            yaml("{ name: long, start: '2026-12-01T00:00:00Z', end: '2026-12-09T00:00:00Z' }"),
            yaml(
                "{ name: other, start: '2026-12-01T00:00:00Z', end: '2026-12-09T00:00:00Z', \
                 towers: [db] }",
            ),
        ];
        let names: Vec<String> = active(&windows, "traffic", at("2026-12-01T12:00:00Z"))
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert_eq!(names, ["long", "short"]);
    }
}
