//! rct admission: the one place that decides who may do what in production.
//!
//! Admission verifies who is asking (operator certificates bound to session keys, service
//! identities), checks the operation catalog (allowed groups, typed parameters,
//! justification), records every decision as an event, and republishes approved commands,
//! signed with its own key, onto the owning tower's subjects. It fails closed: if it cannot
//! write the decision, it does not acknowledge the submission.
//!
//! This crate holds the contract's entry points only for now; the service arrives with the
//! admission issue and builds on `rct-bus` (messages, envelopes) and `rct-streams` (topology,
//! publishing with single-slot decisions).
