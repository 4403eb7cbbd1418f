//! The rollout coordinator: sends each admitted rollout's children, wave by wave, within its
//! limits, and ends the rollout on record. One replica coordinates at a time (a lease in
//! `rct_locks`); whichever holds the lease folds every rollout's state from the stream alone
//! (the rollout's decision, each child's decision, claim and outcome, its health check's,
//! the rollout's halt and resume requests) and asks [`rollout::next`] what to do, one
//! target at a time. A child's id, its decision's slot and its command's `Nats-Msg-Id`
//! derive from (rollout, target), so a replica that takes over after a crash sends no child
//! twice: a child decided already is found in its slot (and its command, which may not have
//! been sent, sent again: the same message), and only a decision naming this rollout as its
//! parent counts as its child.

use std::collections::BTreeMap;
use std::time::Duration;

use rct_bus::Target;
use rct_bus::rollout::{self, Child, Next, Spec};
use rct_streams::journal;
use rct_streams::locks::ROLLOUT_LEASE as LEASE;
use rct_streams::timestamp::{from_datetime, to_datetime};

use super::*;
use crate::decide::Admit;

/// How often the coordinator looks at its rollouts.
const TICK: Duration = Duration::from_millis(200);

/// How many rollout decisions one look reads, at most (the rest on the next looks): a
/// replica taking over a long history keeps renewing its lease meanwhile.
const FIND_BATCH: usize = 64;

/// How long past a child's deadline, unclaimed, the coordinator ends it expired (the
/// clocks' skew): the claim slot decides between it and a late agent.
const EXPIRY_GRACE: time::Duration = time::Duration::seconds(5);

/// The lease ran out in the middle of a look: another replica may coordinate now.
#[derive(Debug)]
struct LeaseLost;

/// Why a look at a rollout stopped.
#[derive(Debug)]
enum Stop {
    Lease(LeaseLost),
    Stream(rct_streams::Error),
}

impl From<rct_streams::Error> for Stop {
    fn from(e: rct_streams::Error) -> Self {
        Stop::Stream(e)
    }
}

/// Where a target's child (or its health check) stands, as read from the stream. The
/// sequences are those of the event that ended it.
#[derive(Clone, Debug, Default, PartialEq)]
enum Step {
    /// Not decided.
    #[default]
    Undecided,
    /// Refused (`locked`, `frozen`, …, or its id taken by another command): the sentence.
    Refused(String, u64),
    /// Admitted, not ended; it must start by its deadline.
    Admitted(Option<OffsetDateTime>),
    /// Succeeded: when, and its outputs.
    Succeeded(OffsetDateTime, BTreeMap<String, String>, u64),
    /// Ended otherwise: how, in a few words.
    Ended(String, u64),
}

impl Step {
    fn is_open(&self) -> bool {
        matches!(self, Step::Admitted(_))
    }

    /// The sequence of the event that ended it (0 while open).
    fn sequence(&self) -> u64 {
        match self {
            Step::Refused(_, s) | Step::Succeeded(_, _, s) | Step::Ended(_, s) => *s,
            Step::Undecided | Step::Admitted(_) => 0,
        }
    }
}

/// One target of a rollout.
#[derive(Clone, Debug, Default)]
struct Member {
    child: Step,
    health: Step,
}

impl Member {
    fn step(&self, health: bool) -> &Step {
        match health {
            false => &self.child,
            true => &self.health,
        }
    }
}

/// One rollout being coordinated.
#[derive(Debug)]
struct Rollout {
    id: CommandId,
    tower: Tower,
    decision: proto::Event,
    /// The rollout's submission, as stored: each child carries it.
    payload: bytes::Bytes,
    sequence: u64,
    started: OffsetDateTime,
    /// It must start by then, or it expires.
    deadline: Option<OffsetDateTime>,
    spec: Spec,
    members: Vec<Member>,
    /// The next RCT_EVT sequence to read the rollout's halt and resume requests from.
    steering_from: u64,
    /// Halted by a person: the sentence for its outcome.
    halted: Option<String>,
    /// The sequence of the last resume: it accepts the inconclusive checks before it.
    resumed: u64,
    claimed: bool,
    /// What the last progress said, and the last pause: each said once.
    said: String,
    paused: Option<String>,
    /// The freeze of its tower as last read, and when.
    freeze: Option<(Instant, Option<rct_bus::freeze::Active>)>,
}

impl Rollout {
    fn child(&self, index: usize) -> Child {
        let member = &self.members[index];
        let at = |t: &OffsetDateTime| Duration::try_from(*t - self.started).unwrap_or_default();
        let accepted = self.resumed > member.health.sequence();
        match &member.child {
            Step::Undecided => Child::Waiting,
            Step::Admitted(_) => Child::Running,
            Step::Refused(..) | Step::Ended(..) => Child::Failed,
            Step::Succeeded(when, ..) if !self.spec.health => Child::Succeeded { at: at(when) },
            Step::Succeeded(when, ..) => match &member.health {
                Step::Undecided => Child::Succeeded { at: at(when) },
                Step::Admitted(_) => Child::Checking,
                Step::Succeeded(_, outputs, _) => {
                    match outputs.get("healthy").map(String::as_str) {
                        Some("true") => Child::Healthy,
                        Some("false") => Child::Unhealthy,
                        _ if accepted => Child::Accepted,
                        _ => Child::Inconclusive,
                    }
                }
                Step::Refused(..) | Step::Ended(..) if accepted => Child::Accepted,
                Step::Refused(..) | Step::Ended(..) => Child::Inconclusive,
            },
        }
    }

    fn children(&self) -> Vec<Child> {
        (0..self.members.len()).map(|i| self.child(i)).collect()
    }

    fn index(&self, target: &str) -> Option<usize> {
        self.spec.targets.iter().position(|t| t == target)
    }

    /// The id of the child (or health check) on the target at `index`.
    fn id_of(&self, index: usize, health: bool) -> (Target, CommandId) {
        let target = Target::of_event(&self.spec.targets[index]);
        let id = match health {
            false => rollout::child_id(self.id, &target),
            true => rollout::health_id(self.id, &target),
        };
        (target, id)
    }

    /// One line on where it stands: counts of each state, errors and degradation.
    fn summary(&self) -> String {
        let children = self.children();
        let count = |f: &dyn Fn(&Child) -> bool| children.iter().filter(|c| f(c)).count();
        let failed = count(&|c| *c == Child::Failed);
        let degraded = count(&|c| matches!(c, Child::Failed | Child::Unhealthy));
        let mut parts = Vec::new();
        for (word, n) in [
            (
                "succeeded",
                count(&|c| {
                    matches!(
                        c,
                        Child::Succeeded { .. } | Child::Healthy | Child::Accepted
                    )
                }),
            ),
            ("running", count(&|c| *c == Child::Running)),
            ("checking", count(&|c| *c == Child::Checking)),
            ("failed", failed),
            ("unhealthy", count(&|c| *c == Child::Unhealthy)),
            ("inconclusive", count(&|c| *c == Child::Inconclusive)),
            ("waiting", count(&|c| *c == Child::Waiting)),
        ] {
            if n > 0 {
                parts.push(format!("{n} {word}"));
            }
        }
        format!(
            "{} targets: {}; errors {failed} (at most {}), degraded {degraded} (at most {})",
            children.len(),
            parts.join(", "),
            self.spec.max_errors,
            self.spec.max_degraded,
        )
    }

    /// The wave the rollout is in: the first with a target not through.
    fn wave(&self) -> usize {
        let children = self.children();
        let through = |c: &Child| {
            matches!(
                c,
                Child::Healthy | Child::Accepted | Child::Failed | Child::Unhealthy
            ) || (!self.spec.health && matches!(c, Child::Succeeded { .. }))
        };
        let first = children.iter().position(|c| !through(c));
        first.map_or(self.spec.waves.len(), |i| self.spec.wave_of(i))
    }
}

/// Coordinates rollouts while this replica holds the lease, until `shutdown`.
pub(super) async fn coordinate(admission: Admission, shutdown: CancellationToken) {
    let inner = &admission.inner;
    let me = format!("{}/{}", inner.config.instance, CommandId::generate());
    let lease = inner.config.rollout_lease;
    let mut state = Coordinator::default();
    // When the lease was last renewed: held until then + the lease, by our clock; acted on
    // only until two thirds of it, so that no write of ours lands after another replica
    // took over.
    let mut renewed: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(TICK) => {}
        }
        if renewed.is_none_or(|at| at.elapsed() >= lease / 3) {
            let asked = Instant::now();
            let held = match rct_streams::locks::bucket(&inner.js).await {
                Ok(store) => rct_streams::locks::lease(&store, LEASE, &me, lease).await,
                Err(e) => Err(e),
            };
            match held {
                Ok(true) => {
                    if renewed.is_none() {
                        tracing::info!("coordinating rollouts");
                    }
                    renewed = Some(asked);
                }
                Ok(false) => {
                    if renewed.take().is_some() {
                        tracing::warn!("another replica coordinates rollouts now");
                    }
                    state = Coordinator::default();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the rollout lease");
                    continue;
                }
            }
        }
        let Some(at) = renewed else { continue };
        state.valid_until = at + lease * 2 / 3;
        Box::pin(state.tick(inner)).await;
        if Instant::now() >= state.valid_until {
            // Whatever it was doing is read again from the stream by whoever holds the
            // lease next, this replica included.
            renewed = None;
            state = Coordinator::default();
        }
    }
    if renewed.is_some()
        && let Ok(store) = rct_streams::locks::bucket(&inner.js).await
    {
        let _ = rct_streams::locks::give_up(&store, LEASE, &me).await;
    }
}

/// What the lease holder knows: the rollouts it coordinates, and where it read up to.
#[derive(Debug)]
struct Coordinator {
    rollouts: BTreeMap<CommandId, Rollout>,
    /// The next RCT_EVT sequence to look for rollout decisions from.
    found_from: u64,
    /// No write after this: the lease may be another replica's by then.
    valid_until: Instant,
}

impl Default for Coordinator {
    fn default() -> Self {
        Self {
            rollouts: BTreeMap::new(),
            found_from: 1,
            valid_until: Instant::now(),
        }
    }
}

impl Coordinator {
    async fn tick(&mut self, inner: &Inner) {
        if let Err(e) = self.find(inner).await {
            tracing::warn!(error = %e, "cannot look for rollouts; trying again");
        }
        let mut ended = Vec::new();
        for (id, rollout) in &mut self.rollouts {
            match Box::pin(inner.step(rollout, self.valid_until)).await {
                Ok(true) => ended.push(*id),
                Ok(false) => {}
                Err(Stop::Lease(LeaseLost)) => return,
                // One rollout's trouble does not hold up the others.
                Err(Stop::Stream(e)) => {
                    tracing::warn!(rollout = %id, error = %e, "a rollout step failed; it is tried again");
                }
            }
        }
        for id in ended {
            self.rollouts.remove(&id);
        }
    }

    /// Finds rollouts decided since the last look (all of them, a batch at a time, the
    /// first times), and folds each that has not ended. A rollout that cannot be folded now
    /// is found again on the next look.
    async fn find(&mut self, inner: &Inner) -> Result<(), rct_streams::Error> {
        let subject = subject::rollout_decisions();
        for _ in 0..FIND_BATCH {
            let found =
                journal::first_from(&inner.js, EVENT_STREAM, &subject, self.found_from, |m| {
                    inner.own_event(m).is_some()
                })
                .await?;
            let Some(stored) = found else {
                return Ok(());
            };
            if let Some(decision) = inner.own_event(&stored)
                && let Some(rollout) = inner.fold(decision).await?
            {
                tracing::info!(rollout = %rollout.id, targets = rollout.spec.targets.len(), "coordinating a rollout");
                self.rollouts.insert(rollout.id, rollout);
            }
            self.found_from = stored.sequence + 1;
        }
        Ok(())
    }
}

impl Inner {
    /// The state of a rollout from its decision and the stream, or `None` when it has
    /// ended (or is no admitted rollout). A child decided but not started has its command
    /// sent again: the replica that decided it may have stopped before sending it.
    async fn fold(&self, decision: proto::Event) -> Result<Option<Rollout>, rct_streams::Error> {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            return Ok(None);
        };
        let Some(request) = admitted.request.as_ref() else {
            return Ok(None);
        };
        let Some(plan) = request.rollout.as_ref() else {
            return Ok(None);
        };
        let (Some((name, id)), Some(started)) = (
            named(&decision.operation, &decision.command_id),
            decision.at.as_ref().and_then(to_datetime),
        ) else {
            return Ok(None);
        };
        if self
            .own_event_on(&subject::events_of_kind(id, EventKind::Outcome))
            .await?
            .is_some()
        {
            return Ok(None);
        }
        let sequence = request.submission_sequence;
        let deadline = admitted.deadline.as_ref().and_then(to_datetime);
        let payload = self.submission(sequence).await?;
        let spec = Spec::of(plan);
        let claim = self
            .own_event_on(&subject::events_of_kind(id, EventKind::Claim))
            .await?;
        let unrun = claim
            .as_ref()
            .is_some_and(|c| matches!(&c.kind, Some(Kind::Started(s)) if s.without_running));
        let claimed = claim.is_some();
        let mut rollout = Rollout {
            id,
            tower: name.tower().clone(),
            members: vec![Member::default(); spec.targets.len()],
            spec,
            decision,
            payload,
            sequence,
            started,
            deadline,
            steering_from: 1,
            halted: None,
            resumed: 0,
            claimed,
            said: String::new(),
            paused: None,
            freeze: None,
        };
        if unrun {
            // Ended without running, its outcome not written yet: written now.
            let deadline = rollout.deadline.unwrap_or(started);
            self.expire(&mut rollout, deadline).await?;
            return Ok(None);
        }
        for index in 0..rollout.members.len() {
            for health in [false, true] {
                if health && !matches!(rollout.members[index].child, Step::Succeeded(..)) {
                    continue;
                }
                let step = self
                    .read_step(&rollout, index, health, Step::Undecided)
                    .await?;
                if step.is_open() {
                    self.resend(&rollout, index, health).await?;
                }
                self.set(&mut rollout, index, health, step);
            }
        }
        Ok(Some(rollout))
    }

    /// The rollout's submission as stored in RCT_SUBMIT.
    async fn submission(&self, sequence: u64) -> Result<bytes::Bytes, rct_streams::Error> {
        let read = |e: async_nats::Error| rct_streams::Error::Read {
            what: format!("{SUBMIT_STREAM} message {sequence}"),
            cause: e,
        };
        Ok(self
            .js
            .get_stream_no_info(SUBMIT_STREAM)
            .await
            .map_err(|e| read(e.into()))?
            .get_raw_message(sequence)
            .await
            .map_err(|e| read(e.into()))?
            .payload)
    }

    /// The event admission wrote in slot `subject`, with its sequence.
    async fn own_slot(
        &self,
        subject: &str,
    ) -> Result<Option<(proto::Event, u64)>, rct_streams::Error> {
        let stored = journal::first(&self.js, EVENT_STREAM, subject, |stored| {
            self.own_event(stored).is_some()
        })
        .await?;
        Ok(stored.and_then(|s| self.own_event(&s).map(|e| (e, s.sequence))))
    }

    /// Where the child (or health check) of `rollout` on the target at `index` stands,
    /// reading on from what was known (`known`): its decision, which must be this
    /// rollout's (a command of someone else's under its id is not its child), then its
    /// outcome, on its own target's slot.
    async fn read_step(
        &self,
        rollout: &Rollout,
        index: usize,
        health: bool,
        known: Step,
    ) -> Result<Step, rct_streams::Error> {
        let (target, id) = rollout.id_of(index, health);
        let known = match known {
            Step::Undecided => {
                let decided = self
                    .own_slot(&subject::events_of_kind(id, EventKind::Decision))
                    .await?;
                let Some((decision, sequence)) = decided else {
                    return Ok(Step::Undecided);
                };
                if let Some(why) = not_its(rollout, &decision, &target, health) {
                    return Ok(Step::Refused(why, sequence));
                }
                match decision.kind {
                    Some(Kind::Rejected(r)) => return Ok(Step::Refused(r.message, sequence)),
                    Some(Kind::Admitted(a)) => {
                        Step::Admitted(a.deadline.as_ref().and_then(to_datetime))
                    }
                    _ => return Ok(Step::Undecided),
                }
            }
            known => known,
        };
        if !known.is_open() {
            return Ok(known);
        }
        let subject = Subject::event(&rollout.tower, &target, id, EventKind::Outcome).to_string();
        let outcome = journal::first(&self.js, EVENT_STREAM, &subject, |stored| {
            self.outcome_of(stored).is_some()
        })
        .await?;
        let Some((event, sequence)) =
            outcome.and_then(|s| self.outcome_of(&s).map(|e| (e, s.sequence)))
        else {
            return Ok(known);
        };
        let when = event
            .at
            .as_ref()
            .and_then(to_datetime)
            .unwrap_or_else(OffsetDateTime::now_utc);
        Ok(match event.kind {
            Some(Kind::Succeeded(s)) => {
                Step::Succeeded(when, s.outputs.into_iter().collect(), sequence)
            }
            Some(other) => Step::Ended(describe_outcome(&other), sequence),
            None => known,
        })
    }

    /// The outcome event stored, if its tower's agent or admission wrote it.
    fn outcome_of(
        &self,
        stored: &async_nats::jetstream::message::StreamMessage,
    ) -> Option<proto::Event> {
        let message = (
            stored.subject.as_str(),
            stored.payload.as_ref(),
            Some(&stored.headers),
        );
        rct_streams::Record::from_message(stored.sequence, stored.time, message, Some(&self.trust))
            .ok()
            .filter(|r| {
                matches!(
                    r.provenance,
                    Provenance::Verified(Author::Agent(_) | Author::Admission)
                )
            })
            .map(|r| r.event)
    }

    /// Reads what changed, then does what [`rollout::next`] says, one target at a time.
    /// True once the rollout has ended on record.
    async fn step(&self, rollout: &mut Rollout, valid_until: Instant) -> Result<bool, Stop> {
        let lease = || match Instant::now() < valid_until {
            true => Ok(()),
            false => Err(Stop::Lease(LeaseLost)),
        };
        self.read_steering(rollout).await?;
        let now = OffsetDateTime::now_utc();
        let mut changes = Vec::new();
        for index in 0..rollout.members.len() {
            let before = rollout.child(index);
            for health in [false, true] {
                let known = rollout.members[index].step(health).clone();
                let Step::Admitted(deadline) = known else {
                    continue;
                };
                let mut step = self.read_step(rollout, index, health, known).await?;
                if step.is_open() && deadline.is_some_and(|d| now > d + EXPIRY_GRACE) {
                    lease()?;
                    self.expire_child(rollout, index, health, deadline).await?;
                    step = self.read_step(rollout, index, health, step).await?;
                }
                self.set(rollout, index, health, step);
            }
            let after = rollout.child(index);
            if after != before {
                changes.push(format!(
                    "{}: {}",
                    rollout.spec.targets[index],
                    said(rollout, index, after)
                ));
            }
        }
        lease()?;
        for line in changes {
            self.say(rollout, line).await?;
        }
        if !rollout.claimed {
            // Started by its deadline, or never: whoever watches it was told it would not
            // run after that.
            if let Some(deadline) = rollout.deadline.filter(|d| now > *d) {
                self.expire(rollout, deadline).await?;
                return Ok(true);
            }
            if !self.claim(rollout).await? {
                return Ok(true);
            }
        }
        // Ended by another replica meanwhile (this one lost its lease): nothing more.
        if self
            .own_event_on(&subject::events_of_kind(rollout.id, EventKind::Outcome))
            .await?
            .is_some()
        {
            return Ok(true);
        }
        // One target at a time, planned again after each: a refusal counts before the next.
        for _ in 0..=rollout.members.len() * 2 {
            let children = rollout.children();
            let running = children
                .iter()
                .any(|c| matches!(c, Child::Running | Child::Checking));
            if let Some(why) = rollout.halted.clone() {
                if running {
                    break;
                }
                self.end(rollout, Kind::Cancelled(proto::Cancelled { reason: why }))
                    .await?;
                return Ok(true);
            }
            let into = Duration::try_from(now - rollout.started).unwrap_or_default();
            let (target, health) = match rollout::next(&rollout.spec, &children, into) {
                Next::Dispatch(targets) => (targets.into_iter().next(), false),
                Next::Check(targets) => (targets.into_iter().next(), true),
                Next::Wait(_) => break,
                Next::Pause(why) => {
                    if rollout.paused.as_deref() != Some(why.as_str()) {
                        let line = format!(
                            "paused: {why} (rct rollout resume {} -j …, or rct rollout halt {} -j …)",
                            rollout.id, rollout.id
                        );
                        self.say(rollout, line).await?;
                        rollout.paused = Some(why);
                    }
                    break;
                }
                Next::Halt(why) => {
                    if running {
                        break;
                    }
                    let failed = Kind::Failed(proto::Failed {
                        code: "halted".into(),
                        message: format!("halted: {why}"),
                        ..Default::default()
                    });
                    self.end(rollout, failed).await?;
                    return Ok(true);
                }
                Next::Done => {
                    let outcome = done(rollout);
                    self.end(rollout, outcome).await?;
                    return Ok(true);
                }
            };
            let Some(index) = target.and_then(|t| rollout.index(&t)) else {
                break;
            };
            lease()?;
            self.dispatch(rollout, index, health).await?;
        }
        self.progress(rollout).await?;
        Ok(false)
    }

    /// Reads the rollout's halt and resume requests recorded since the last look.
    async fn read_steering(&self, rollout: &mut Rollout) -> Result<(), rct_streams::Error> {
        let subject = subject::events_of_kind(rollout.id, EventKind::Cancel);
        loop {
            let found = journal::first_from(
                &self.js,
                EVENT_STREAM,
                &subject,
                rollout.steering_from,
                |m| self.own_event(m).is_some(),
            )
            .await?;
            let Some(stored) = found else {
                return Ok(());
            };
            rollout.steering_from = stored.sequence + 1;
            let Some(Kind::CancelRequested(request)) = self.own_event(&stored).and_then(|e| e.kind)
            else {
                continue;
            };
            let by = request
                .by
                .as_ref()
                .map_or_else(|| "someone".to_owned(), |o| o.email.clone());
            if request.resume {
                rollout.resumed = stored.sequence;
                rollout.paused = None;
            } else if rollout.halted.is_none() {
                let why = format!("halted by {by}: {:?}", request.justification);
                self.say(rollout, format!("{why}; no new target starts"))
                    .await?;
                rollout.halted = Some(why);
            }
        }
    }

    /// Sends the child (or, with `health`, the health check) of `rollout` on the target at
    /// `index`: decided once, through the locks and freezes like any command, in its own
    /// slot, and recorded there when refused. A child decided already (by this replica or
    /// one before it) is sent again as decided.
    async fn dispatch(
        &self,
        rollout: &mut Rollout,
        index: usize,
        health: bool,
    ) -> Result<(), rct_streams::Error> {
        let (target, id) = rollout.id_of(index, health);
        // Undecided as far as this coordinator read (at its fold, or since): decided now,
        // and whatever holds the slot read if the slot is taken.
        let step = match rollout.members[index].step(health).clone() {
            Step::Undecided => {
                let (decision, command) = self.decide_child(rollout, &target, id, health).await?;
                match self
                    .publisher
                    .event(&rollout.tower, &decision, rollout.sequence)
                    .await?
                {
                    // Written now: what it says, and its command sent at once.
                    Slot::Written(ack) if !ack.duplicate => match (&decision.kind, command) {
                        (Some(Kind::Admitted(a)), Some((subject, command))) => {
                            self.link_undo(&self.publisher, &decision).await?;
                            let msg_id = rollout::msg_id(rollout.id, &target, health);
                            self.publisher
                                .send(Outgoing::new(subject, msg_id, command))
                                .await?;
                            Step::Admitted(a.deadline.as_ref().and_then(to_datetime))
                        }
                        (Some(Kind::Rejected(r)), _) => {
                            Step::Refused(r.message.clone(), ack.sequence)
                        }
                        _ => Step::Undecided,
                    },
                    // Written before, or by another: whatever is in the slot, as any reader
                    // sees it, and its command sent (again) if it is an admitted child.
                    Slot::Written(_) | Slot::Taken { .. } => {
                        let step = self
                            .read_step(rollout, index, health, Step::Undecided)
                            .await?;
                        if step.is_open() {
                            self.resend(rollout, index, health).await?;
                        }
                        step
                    }
                }
            }
            known => known,
        };
        match &step {
            Step::Refused(why, _) => {
                let what = if health {
                    "health check refused"
                } else {
                    "refused"
                };
                self.say(rollout, format!("{target}: {what}: {why}"))
                    .await?;
            }
            Step::Admitted(_) => {
                let line = match health {
                    false => format!("{target}: started as {id}"),
                    true => format!("{target}: health check started as {id}"),
                };
                self.say(rollout, line).await?;
            }
            _ => {}
        }
        self.set(rollout, index, health, step);
        Ok(())
    }

    /// The decision for a child: admitted through the freezes, locks and the catalog as it
    /// is now, or refused saying why.
    async fn decide_child(
        &self,
        rollout: &mut Rollout,
        target: &Target,
        id: CommandId,
        health: bool,
    ) -> Result<(proto::Event, Option<(Subject, bytes::Bytes)>), rct_streams::Error> {
        let policy = self.policy();
        let now = OffsetDateTime::now_utc();
        let built = policy
            .child(&rollout.decision, target.as_str(), health, now)
            .and_then(|decision| {
                let (subject, command) =
                    policy.recorded_command(&decision, &rollout.payload, Vec::new(), None)?;
                Ok((decision, subject, command))
            });
        let (decision, subject, command) = match built {
            Ok(built) => built,
            Err(why) => {
                // Recorded in its own slot, as any refusal.
                let refusal = proto::Event {
                    command_id: id.to_string(),
                    at: Some(from_datetime(now)),
                    source: policy.source.clone(),
                    operation: rollout.decision.operation.clone(),
                    target: target.to_string(),
                    kind: Some(Kind::Rejected(proto::Rejected {
                        code: RejectionCode::InvalidParams as i32,
                        message: format!("the rollout cannot send it: {why}"),
                        request: decided_request(&rollout.decision).map(|r| proto::Request {
                            rollout: None,
                            parent: rollout.id.to_string(),
                            health,
                            ..r.clone()
                        }),
                    })),
                };
                return Ok((refusal, None));
            }
        };
        // A freeze of its tower refuses it (read once a look, not once a child).
        let frozen = match &rollout.freeze {
            Some((at, frozen)) if at.elapsed() < TICK => frozen.clone(),
            _ => {
                let frozen = self.frozen(&rollout.tower, now).await?;
                rollout.freeze = Some((Instant::now(), frozen.clone()));
                frozen
            }
        };
        if let Some(freeze) = frozen {
            let refusal = rejection(
                &decision,
                RejectionCode::Frozen,
                freeze.refusal(&decision.operation),
            );
            return Ok((refusal, None));
        }
        let verdict = Verdict::Admit(Admit {
            tower: rollout.tower.clone(),
            command_id: id,
            decision,
            subject,
            command,
        });
        Ok(match Box::pin(self.check_gates(verdict)).await? {
            Verdict::Admit(admit) => (admit.decision, Some((admit.subject, admit.command))),
            other => (other.parts().2.clone(), None),
        })
    }

    /// Sends the command of the child (or health check) on the target at `index` as its
    /// recorded decision admitted it, unless an agent claimed it already: the same message
    /// every time (its `Nats-Msg-Id` dedups it; a copy past the dedup window finds its
    /// claim taken).
    async fn resend(
        &self,
        rollout: &Rollout,
        index: usize,
        health: bool,
    ) -> Result<(), rct_streams::Error> {
        let Some((target, decision)) = self.unstarted(rollout, index, health).await? else {
            return Ok(());
        };
        // An undo's child: its original's timeline says so (once).
        self.link_undo(&self.publisher, &decision).await?;
        match self
            .policy()
            .recorded_command(&decision, &rollout.payload, Vec::new(), None)
        {
            Ok((subject, command)) => {
                let msg_id = rollout::msg_id(rollout.id, &target, health);
                self.publisher
                    .send(Outgoing::new(subject, msg_id, command))
                    .await?;
            }
            Err(why) => {
                self.end_unpublished(&self.publisher, &decision, &why)
                    .await?
            }
        }
        Ok(())
    }

    /// The target and recorded decision of the child (or health check) on the target at
    /// `index`, unless it is not decided, or claimed (by its agent, or ended unrun).
    async fn unstarted(
        &self,
        rollout: &Rollout,
        index: usize,
        health: bool,
    ) -> Result<Option<(Target, proto::Event)>, rct_streams::Error> {
        let (target, id) = rollout.id_of(index, health);
        let claim = Subject::event(&rollout.tower, &target, id, EventKind::Claim).to_string();
        if journal::first(&self.js, EVENT_STREAM, &claim, |_| true)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        Ok(self
            .own_slot(&subject::events_of_kind(id, EventKind::Decision))
            .await?
            .map(|(decision, _)| (target, decision)))
    }

    /// Ends a child (or health check) nobody started by its deadline, through its claim
    /// slot: an agent that comes late finds it taken and runs nothing.
    async fn expire_child(
        &self,
        rollout: &Rollout,
        index: usize,
        health: bool,
        deadline: Option<OffsetDateTime>,
    ) -> Result<(), rct_streams::Error> {
        // Started: its agent ends it.
        let Some((target, decision)) = self.unstarted(rollout, index, health).await? else {
            return Ok(());
        };
        let event = |kind| proto::Event {
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: self.policy().source.clone(),
            kind: Some(kind),
            ..decision.clone()
        };
        let claim = event(Kind::Started(proto::Started {
            agent: self.policy().source.clone(),
            host: String::new(),
            target: target.to_string(),
            without_running: true,
        }));
        let expired = event(Kind::Expired(proto::Expired {
            deadline: deadline.map(from_datetime),
        }));
        journal::end_unrun(
            &self.publisher,
            &rollout.tower,
            &claim,
            &expired,
            "admission",
        )
        .await?;
        Ok(())
    }

    /// Ends the rollout expired: not started by its deadline, it starts nothing.
    async fn expire(
        &self,
        rollout: &mut Rollout,
        deadline: OffsetDateTime,
    ) -> Result<(), rct_streams::Error> {
        let claim = self.parent_event(
            rollout,
            Kind::Started(proto::Started {
                agent: self.policy().source.clone(),
                host: String::new(),
                target: rollout::PARENT_TARGET.into(),
                without_running: true,
            }),
        );
        let expired = self.parent_event(
            rollout,
            Kind::Expired(proto::Expired {
                deadline: Some(from_datetime(deadline)),
            }),
        );
        if let journal::Ended::ClaimedElsewhere = journal::end_unrun(
            &self.publisher,
            &rollout.tower,
            &claim,
            &expired,
            "admission",
        )
        .await?
        {
            // Claimed already: by a coordinator (it runs), or by an expiry whose outcome
            // did not get written (then this one is written now).
            if self.claimed_unrun(rollout.id).await? {
                self.publisher
                    .event(&rollout.tower, &expired, "admission")
                    .await?;
            }
        }
        tracing::warn!(rollout = %rollout.id, "a rollout not started by its deadline expired");
        Ok(())
    }

    /// Whether command `id`'s claim on record says it was ended without running.
    async fn claimed_unrun(&self, id: CommandId) -> Result<bool, rct_streams::Error> {
        Ok(self
            .own_slot(&subject::events_of_kind(id, EventKind::Claim))
            .await?
            .is_some_and(|(c, _)| matches!(c.kind, Some(Kind::Started(s)) if s.without_running)))
    }

    fn set(&self, rollout: &mut Rollout, index: usize, health: bool, step: Step) {
        let member = &mut rollout.members[index];
        match health {
            false => member.child = step,
            true => member.health = step,
        }
    }

    /// The rollout's claim: the coordinator runs it. False when a claim on record says it
    /// was ended without running (an expiry that stopped half-way, finished now).
    async fn claim(&self, rollout: &mut Rollout) -> Result<bool, rct_streams::Error> {
        let claim = self.parent_event(
            rollout,
            Kind::Started(proto::Started {
                agent: format!("{}/coordinator", self.policy().source),
                host: String::new(),
                target: rollout::PARENT_TARGET.into(),
                without_running: false,
            }),
        );
        let written = self
            .publisher
            .event(&rollout.tower, &claim, "coordinator")
            .await?;
        if matches!(written, Slot::Taken { .. }) && self.claimed_unrun(rollout.id).await? {
            let deadline = rollout.deadline.unwrap_or_else(OffsetDateTime::now_utc);
            self.expire(rollout, deadline).await?;
            return Ok(false);
        }
        rollout.claimed = true;
        Ok(true)
    }

    /// Ends the rollout on record with `outcome`.
    async fn end(&self, rollout: &mut Rollout, outcome: Kind) -> Result<(), rct_streams::Error> {
        self.progress(rollout).await?;
        let event = self.parent_event(rollout, outcome);
        tracing::info!(rollout = %rollout.id, outcome = %describe_outcome(event.kind.as_ref().expect("set")), "rollout ended");
        self.publisher
            .event(&rollout.tower, &event, "coordinator")
            .await?;
        Ok(())
    }

    /// A log line on the rollout's timeline.
    async fn say(&self, rollout: &Rollout, line: String) -> Result<(), rct_streams::Error> {
        let event = self.parent_event(
            rollout,
            Kind::Log(proto::Log {
                stream: proto::LogStream::Admission as i32,
                line,
                undone_by: String::new(),
            }),
        );
        self.publisher
            .event(&rollout.tower, &event, CommandId::generate())
            .await?;
        Ok(())
    }

    /// Where the rollout stands, as progress, when that changed.
    async fn progress(&self, rollout: &mut Rollout) -> Result<(), rct_streams::Error> {
        let summary = rollout.summary();
        let wave = rollout.wave();
        let step = format!("wave {wave} of {}", rollout.spec.waves.len());
        let said = format!("{step}: {summary}");
        if said == rollout.said {
            return Ok(());
        }
        let children = rollout.children();
        // A target counts once its child ended; 100 only once every check answered too.
        let through = children
            .iter()
            .filter(|c| !matches!(c, Child::Waiting | Child::Running))
            .count();
        let checking = children.contains(&Child::Checking);
        let percent = u32::try_from(through * 100 / children.len().max(1))
            .unwrap_or(100)
            .min(if checking { 99 } else { 100 });
        let event = self.parent_event(
            rollout,
            Kind::Progress(proto::Progress {
                percent,
                step,
                message: summary,
            }),
        );
        self.publisher
            .event(&rollout.tower, &event, CommandId::generate())
            .await?;
        rollout.said = said;
        Ok(())
    }

    fn parent_event(&self, rollout: &Rollout, kind: Kind) -> proto::Event {
        proto::Event {
            command_id: rollout.id.to_string(),
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: self.policy().source.clone(),
            operation: rollout.decision.operation.clone(),
            target: rollout::PARENT_TARGET.into(),
            kind: Some(kind),
        }
    }
}

/// Why `decision`, in the slot of `rollout`'s child (or health check) on `target`, is not
/// that child: another submission took its id (anyone can derive it).
fn not_its(
    rollout: &Rollout,
    decision: &proto::Event,
    target: &Target,
    health: bool,
) -> Option<String> {
    let request = decided_request(decision);
    let parent_ok =
        request.is_some_and(|r| r.parent == rollout.id.to_string() && r.health == health);
    let plan = decided_request(&rollout.decision).and_then(|r| r.rollout.as_ref());
    let operation = match health {
        false => Some(rollout.decision.operation.as_str()),
        true => plan.map(|p| p.health.as_str()),
    };
    let ours = parent_ok
        && operation == Some(decision.operation.as_str())
        && decision.target == target.as_str();
    (!ours).then(|| {
        format!(
            "its id is held by another command ({} on {}, not of this rollout): it did not run \
             as part of it",
            decision.operation, decision.target
        )
    })
}

/// What a target's new state is called on the rollout's timeline.
fn said(rollout: &Rollout, index: usize, child: Child) -> String {
    let member = &rollout.members[index];
    match child {
        Child::Waiting => "waiting".into(),
        Child::Running => "running".into(),
        Child::Succeeded { .. } => "succeeded".into(),
        Child::Failed => match &member.child {
            Step::Refused(why, _) => format!("refused: {why}"),
            Step::Ended(how, _) => format!("failed: {how}"),
            _ => "failed".into(),
        },
        Child::Checking => "checking health".into(),
        Child::Healthy => "healthy".into(),
        Child::Unhealthy => "unhealthy".into(),
        Child::Inconclusive => match &member.health {
            Step::Ended(how, _) => format!("health unknown: the check {how}"),
            Step::Refused(why, _) => format!("health unknown: the check was refused: {why}"),
            _ => "health unknown: the check said neither healthy=true nor healthy=false".into(),
        },
        Child::Accepted => "health unknown, accepted on resume".into(),
    }
}

/// The outcome of a rollout whose every wave is through.
fn done(rollout: &Rollout) -> Kind {
    let children = rollout.children();
    let failed: Vec<&str> = children
        .iter()
        .zip(&rollout.spec.targets)
        .filter(|(c, _)| matches!(c, Child::Failed | Child::Unhealthy))
        .map(|(_, t)| t.as_str())
        .collect();
    let outputs = children
        .iter()
        .enumerate()
        .map(|(i, c)| (rollout.spec.targets[i].clone(), said(rollout, i, *c)))
        .collect();
    let total = children.len();
    if failed.is_empty() {
        Kind::Succeeded(proto::Succeeded {
            summary: format!(
                "{total} of {total} targets succeeded, in {} waves",
                rollout.spec.waves.len()
            ),
            outputs,
        })
    } else {
        Kind::Failed(proto::Failed {
            code: "children_failed".into(),
            message: format!(
                "{} of {total} targets failed ({}), within the rollout's limit of {}",
                failed.len(),
                failed.join(", "),
                rollout.spec.max_errors
            ),
            ..Default::default()
        })
    }
}
