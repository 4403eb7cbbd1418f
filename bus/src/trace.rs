//! W3C Trace Context (`traceparent`), carried in a NATS header from the CLI through admission
//! to the agent and on every event, so one operation is one trace. Each hop keeps the trace
//! id and starts a span of its own (`child`).

use std::fmt;

use rand_core::{OsRng, RngCore};

/// The header that carries it.
pub const TRACEPARENT: &str = "traceparent";

/// One position in a trace: `00-<trace id>-<span id>-<flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    /// A new trace (sampled), as the first hop starts it.
    pub fn root() -> Self {
        let mut trace_id = [0; 16];
        while trace_id == [0; 16] {
            OsRng.fill_bytes(&mut trace_id);
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 1,
        }
    }

    /// The same trace, a new span of this hop.
    pub fn child(&self) -> Self {
        Self {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// Reads a `traceparent` value; `None` unless it is a valid version-00 one (all-zero
    /// ids are invalid, as the specification says).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        let flags: [u8; 1] = hex(flags)?.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }

    /// The next hop's context: a child of `incoming` when it is valid, else a new trace.
    pub fn continue_from(incoming: Option<&str>) -> Self {
        incoming
            .and_then(Self::parse)
            .map_or_else(Self::root, |parent| parent.child())
    }

    /// A context from its parts (as an OpenTelemetry span has them).
    pub fn from_parts(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Self {
        Self {
            trace_id,
            span_id,
            flags,
        }
    }

    /// The trace id's bytes.
    pub fn trace_id_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The span id's bytes.
    pub fn span_id_bytes(&self) -> [u8; 8] {
        self.span_id
    }

    /// The trace flags (1: sampled).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// The trace id, 32 lowercase hex digits (what log lines and `rct show` print).
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags
        )
    }
}

fn new_span_id() -> [u8; 8] {
    let mut id = [0; 8];
    while id == [0; 8] {
        OsRng.fill_bytes(&mut id);
    }
    id
}

fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2)
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specification_example_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceContext::parse(text).unwrap();
        assert_eq!(parsed.to_string(), text);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let root = TraceContext::root();
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.to_string(), root.to_string());
        let next = TraceContext::continue_from(Some(&child.to_string()));
        assert_eq!(next.trace_id(), root.trace_id());
    }

    #[test]
    fn invalid_values_are_refused_and_restart_the_trace() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-xx",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        let fresh = TraceContext::continue_from(Some("garbage"));
        assert_eq!(fresh.trace_id().len(), 32);
    }
}
