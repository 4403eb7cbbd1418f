//! What an agent does with one delivered, verified command: a small state machine over what
//! it knows (is it running here, what the claim journal says, is the deadline past, may this
//! agent start work now), with every transition named. The tower executes the step.
//!
//! The rules it keeps, whatever crashes, pauses, redeliveries or elections happen:
//! - the claim slot decides a command's fate, once: whoever takes it either runs the command
//!   or, with a claim marked `without_running`, ends it unrun (expired, invalid, unknown
//!   catalog). A command is never ended without running by any other path, so a run and an
//!   end without running never both happen;
//! - a command runs only under its claim, and only if no outcome was recorded before it;
//! - an agent starts nothing (claims nothing to run) while its own presence is not fresh or
//!   it is shutting down: others must be able to tell it is alive while it runs;
//! - a claim held by this instance with no outcome, on a command not running here, was never
//!   run (a handler that starts keeps its command marked running until its outcome is
//!   written): it is resumed, not called unknown;
//! - a claim held by an agent that is gone, with no outcome, ends `Unknown`: never run twice.
//!   So an agent that stops ends the claims it holds and never started (`not_run`) first.

use rct_streams::journal::Look;

/// What is known of a delivered command when deciding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts<'a> {
    /// This agent runs another copy of the command right now.
    pub(crate) running_here: bool,
    /// Its deadline (start before) has passed.
    pub(crate) past_deadline: bool,
    /// This agent may start work: its presence is fresh and it is not shutting down.
    pub(crate) may_start: bool,
    /// The journal, when it was read (a first delivery within the deadline claims at once:
    /// the claim is single-slot, and a taken slot brings the command back as a redelivery).
    pub(crate) journal: Option<&'a Look>,
    /// This agent instance (claims name their holder).
    pub(crate) me: &'a str,
    /// Whether the claim's holder, when it is another instance, is still present.
    pub(crate) holder_alive: bool,
}

/// The next step for a delivered command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Another copy runs here now: leave this copy for later, touch nothing.
    Busy,
    /// This agent may not start work now: come back soon, touch nothing.
    Wait,
    /// Its outcome is recorded: acknowledge.
    Ended,
    /// It was claimed to be ended without running, but its outcome is missing (the writer
    /// stopped in between): record one, never run it.
    Finish,
    /// A live agent holds its claim: come back later.
    HeldElsewhere,
    /// Its claim's holder is gone with no outcome: record `Unknown`, never run it.
    Orphaned {
        /// The instance that claimed it (empty when the slot holds no readable claim).
        holder: String,
    },
    /// Past its deadline and never started: record `Expired` (claimed unrun when unclaimed,
    /// as the claim's holder otherwise).
    Expire {
        /// This instance holds the claim.
        held: bool,
    },
    /// This instance holds the claim from an earlier delivery that never ran it: validate and
    /// run, without claiming again.
    Resume,
    /// Unclaimed, within its deadline: validate, claim, then look at the outcome slot.
    Claim,
}

/// The step for a delivered command.
pub(crate) fn next(facts: Facts<'_>) -> Step {
    if facts.running_here {
        return Step::Busy;
    }
    let unclaimed = || {
        if facts.past_deadline {
            Step::Expire { held: false }
        } else if facts.may_start {
            Step::Claim
        } else {
            Step::Wait
        }
    };
    let Some(journal) = facts.journal else {
        // Not read: only a first delivery within the deadline gets here.
        return unclaimed();
    };
    if journal.outcome.is_some() {
        return Step::Ended;
    }
    if journal.started().is_some_and(|s| s.without_running) {
        return Step::Finish;
    }
    match journal.holder() {
        Some(holder) if holder == facts.me => {
            if facts.past_deadline {
                Step::Expire { held: true }
            } else if facts.may_start {
                Step::Resume
            } else {
                Step::Wait
            }
        }
        Some(_) if facts.holder_alive => Step::HeldElsewhere,
        Some(holder) => Step::Orphaned {
            holder: holder.to_owned(),
        },
        // A claim slot holding something that is not a Started event: nobody can claim it.
        None if journal.claim.is_some() => Step::Orphaned {
            holder: String::new(),
        },
        None => unclaimed(),
    }
}

/// What to do once the claim is ours, from the outcome slot read after it.
pub(crate) fn after_claim(outcome_recorded: bool) -> AfterClaim {
    if outcome_recorded {
        // An outcome was recorded before our claim landed: never run it.
        AfterClaim::Ended
    } else {
        AfterClaim::Run
    }
}

/// The step after a successful claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterClaim {
    /// An outcome was recorded before the claim: acknowledge, do not run.
    Ended,
    /// Run it.
    Run,
}

#[cfg(test)]
mod tests {
    use rct_bus::proto::{self, event::Kind};

    use super::*;

    fn claim_by(by: &str, without_running: bool) -> Option<proto::Event> {
        Some(proto::Event {
            kind: Some(Kind::Started(proto::Started {
                agent: by.into(),
                without_running,
                ..Default::default()
            })),
            ..Default::default()
        })
    }

    fn claim(by: &str) -> Option<proto::Event> {
        claim_by(by, false)
    }

    fn outcome() -> Option<proto::Event> {
        Some(proto::Event {
            kind: Some(Kind::Expired(proto::Expired::default())),
            ..Default::default()
        })
    }

    fn facts(journal: Option<&Look>) -> Facts<'_> {
        Facts {
            running_here: false,
            past_deadline: false,
            may_start: true,
            journal,
            me: "me",
            holder_alive: false,
        }
    }

    #[test]
    fn a_copy_running_here_is_never_touched_even_past_its_deadline() {
        let look = Look::default();
        for journal in [None, Some(&look)] {
            let f = Facts {
                running_here: true,
                past_deadline: true,
                ..facts(journal)
            };
            assert_eq!(next(f), Step::Busy);
        }
    }

    #[test]
    fn a_first_delivery_claims_at_once_or_expires() {
        assert_eq!(next(facts(None)), Step::Claim);
        let late = Facts {
            past_deadline: true,
            ..facts(None)
        };
        assert_eq!(next(late), Step::Expire { held: false });
    }

    #[test]
    fn an_agent_that_may_not_start_claims_nothing_but_still_expires() {
        let look = Look::default();
        let ours = Look {
            claim: claim("me"),
            outcome: None,
            doubt: None,
        };
        for journal in [None, Some(&look), Some(&ours)] {
            let f = Facts {
                may_start: false,
                ..facts(journal)
            };
            assert_eq!(next(f), Step::Wait, "{journal:?}");
        }
        let late = Facts {
            may_start: false,
            past_deadline: true,
            ..facts(None)
        };
        assert_eq!(next(late), Step::Expire { held: false });
    }

    #[test]
    fn a_recorded_outcome_ends_it_whoever_holds_the_claim() {
        for holder in [None, claim("me"), claim("other"), claim_by("x", true)] {
            let look = Look {
                claim: holder,
                outcome: outcome(),
                doubt: None,
            };
            for past_deadline in [false, true] {
                let f = Facts {
                    past_deadline,
                    ..facts(Some(&look))
                };
                assert_eq!(next(f), Step::Ended);
            }
        }
    }

    #[test]
    fn a_claim_taken_to_end_it_unrun_is_finished_never_run() {
        for by in ["me", "other"] {
            let look = Look {
                claim: claim_by(by, true),
                outcome: None,
                doubt: None,
            };
            for holder_alive in [false, true] {
                let f = Facts {
                    holder_alive,
                    ..facts(Some(&look))
                };
                assert_eq!(next(f), Step::Finish);
            }
        }
    }

    #[test]
    fn our_own_claim_without_an_outcome_is_resumed_not_called_unknown() {
        let look = Look {
            claim: claim("me"),
            outcome: None,
            doubt: None,
        };
        assert_eq!(next(facts(Some(&look))), Step::Resume);
        let late = Facts {
            past_deadline: true,
            ..facts(Some(&look))
        };
        assert_eq!(next(late), Step::Expire { held: true });
    }

    #[test]
    fn another_holder_is_waited_for_while_alive_and_unknown_once_gone() {
        let look = Look {
            claim: claim("other"),
            outcome: None,
            doubt: None,
        };
        let alive = Facts {
            holder_alive: true,
            past_deadline: true,
            ..facts(Some(&look))
        };
        assert_eq!(next(alive), Step::HeldElsewhere);
        assert_eq!(
            next(facts(Some(&look))),
            Step::Orphaned {
                holder: "other".into()
            }
        );
        let unreadable = Look {
            claim: Some(proto::Event::default()),
            outcome: None,
            doubt: None,
        };
        assert_eq!(
            next(facts(Some(&unreadable))),
            Step::Orphaned {
                holder: String::new()
            }
        );
    }

    #[test]
    fn an_unclaimed_command_is_claimed_in_time_and_expired_after() {
        let look = Look::default();
        assert_eq!(next(facts(Some(&look))), Step::Claim);
        let late = Facts {
            past_deadline: true,
            ..facts(Some(&look))
        };
        assert_eq!(next(late), Step::Expire { held: false });
    }

    #[test]
    fn an_outcome_recorded_before_our_claim_stops_the_run() {
        assert_eq!(after_claim(true), AfterClaim::Ended);
        assert_eq!(after_claim(false), AfterClaim::Run);
    }
}
