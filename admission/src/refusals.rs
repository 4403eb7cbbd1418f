//! How many refused logins go on record one by one: anyone who can reach `rct.auth.login` can
//! send refusals, and each would be a permanent event. Per minute, each source (one client
//! connection, told by its reply inbox) has [`PER_SOURCE`] on record and all sources together
//! [`IN_ALL`]; the rest are counted, and the count goes on record as one event when the minute
//! is over. Pure: the caller says what time it is.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long one budget lasts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Refusals on record one by one per source and window.
pub const PER_SOURCE: u32 = 10;
/// Refusals on record one by one per window, all sources together.
pub const IN_ALL: u32 = 120;
/// Sources told apart among the refusals not recorded one by one (more are said "at least").
pub const SOURCES_COUNTED: usize = 1000;

/// Refusals not on record one by one during a window that is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unrecorded {
    /// How many.
    pub refusals: u32,
    /// From how many sources.
    pub sources: usize,
    /// How long the window lasted.
    pub over: Duration,
}

impl Unrecorded {
    /// The sentence on record.
    pub fn message(&self) -> String {
        format!(
            "{} refused login(s) from {}{} source(s) in the last {}s were not recorded one by \
             one (each source has {PER_SOURCE} a minute on record, all sources {IN_ALL}): a \
             flood of bad logins, or a client retrying a bad token",
            self.refusals,
            if self.sources >= SOURCES_COUNTED {
                "at least "
            } else {
                ""
            },
            self.sources,
            self.over.as_secs()
        )
    }
}

/// The budget of the current window.
#[derive(Debug)]
pub struct Budget {
    started: Instant,
    per_source: HashMap<String, u32>,
    recorded: u32,
    unrecorded: u32,
    unrecorded_sources: HashSet<String>,
}

impl Budget {
    /// A budget whose first window starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            per_source: HashMap::new(),
            recorded: 0,
            unrecorded: 0,
            unrecorded_sources: HashSet::new(),
        }
    }

    /// Whether a refusal from `source` goes on record one by one (else it is counted).
    /// Memory stays bounded whatever sources a flood names: a source is remembered only
    /// while the budget in all is not spent ([`IN_ALL`] of them at most), and at most
    /// [`SOURCES_COUNTED`] sources are counted among the unrecorded.
    pub fn admit(&mut self, source: &str) -> bool {
        let admitted = self.recorded < IN_ALL && {
            let mine = self.per_source.entry(source.to_owned()).or_default();
            *mine < PER_SOURCE && {
                *mine += 1;
                true
            }
        };
        if admitted {
            self.recorded += 1;
        } else {
            self.unrecorded = self.unrecorded.saturating_add(1);
            if self.unrecorded_sources.len() < SOURCES_COUNTED {
                self.unrecorded_sources.insert(source.to_owned());
            }
        }
        admitted
    }

    /// Once the window is over at `now`: what it did not record one by one (if anything),
    /// and a fresh window from `now`. Before that: `None`, and nothing changes.
    pub fn roll(&mut self, now: Instant) -> Option<Unrecorded> {
        if now.saturating_duration_since(self.started) < WINDOW {
            return None;
        }
        self.flush(now)
    }

    /// What the window did not record one by one so far (if anything), and a fresh window
    /// from `now`: at a stop, so that no count is lost.
    pub fn flush(&mut self, now: Instant) -> Option<Unrecorded> {
        let over = now.saturating_duration_since(self.started);
        let unrecorded = (self.unrecorded > 0).then_some(Unrecorded {
            refusals: self.unrecorded,
            sources: self.unrecorded_sources.len(),
            over,
        });
        *self = Self::new(now);
        unrecorded
    }
}

/// The source of a request answered on `reply`: its reply subject without the last token
/// (one client connection's inbox).
pub fn source(reply: &str) -> &str {
    reply.rsplit_once('.').map_or(reply, |(inbox, _)| inbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_and_all_together_have_a_budget_and_the_rest_is_counted() {
        let t0 = Instant::now();
        let mut budget = Budget::new(t0);
        let on_record = (0..50).filter(|_| budget.admit("a")).count();
        assert_eq!(on_record, PER_SOURCE as usize);
        // Another source still has its own.
        assert!(budget.admit("b"));
        // All together: many sources, each within its own budget.
        let mut all = PER_SOURCE + 1;
        for s in 0..1000 {
            if budget.admit(&format!("s{s}")) {
                all += 1;
            }
        }
        assert_eq!(all, IN_ALL);
        assert_eq!(budget.roll(t0 + WINDOW / 2), None, "not over yet");
        let unrecorded = budget.roll(t0 + WINDOW).unwrap();
        assert_eq!(unrecorded.refusals, 50 + 1 + 1000 - IN_ALL);
        // a, and every s that found the whole budget spent, up to the count kept.
        assert_eq!(
            unrecorded.sources,
            SOURCES_COUNTED.min(1 + (1000 - (IN_ALL - PER_SOURCE - 1) as usize))
        );
        assert!(budget.per_source.len() <= IN_ALL as usize);
        assert!(
            unrecorded
                .message()
                .contains("were not recorded one by one")
        );
        // A fresh window, with nothing to say about it yet.
        assert!(budget.admit("a"));
        assert_eq!(budget.roll(t0 + WINDOW * 2), None);
        // At a stop, what a window has counted so far is said at once.
        for _ in 0..=PER_SOURCE {
            budget.admit("a");
        }
        assert_eq!(budget.roll(t0 + WINDOW * 2), None);
        assert_eq!(budget.flush(t0 + WINDOW * 2).unwrap().refusals, 1);
        assert_eq!(budget.flush(t0 + WINDOW * 2), None);
    }

    #[test]
    fn a_source_is_a_connections_inbox() {
        assert_eq!(source("_INBOX_rct.AbC123.7"), "_INBOX_rct.AbC123");
        assert_eq!(source("plain"), "plain");
    }
}
