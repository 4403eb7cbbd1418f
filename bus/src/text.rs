//! Text on record, made safe to show; and the rule for the text an operator writes into the
//! record (a justification).
//!
//! Anything read from the streams may hold characters a terminal or a browser acts on
//! instead of showing: escape sequences that move the cursor or clear a line, carriage
//! returns and line feeds that start a fake line, bidirectional controls that reorder what is
//! read. [`printable`] writes each of them out (`\u{1b}`, `\r`, `\n`), so what is shown is
//! what the stream holds and nothing in it can pass for something else. Everything that
//! shows a record to a person goes through [`make_printable`] or [`printable`].

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::proto::{self, event::Kind, value::Kind as V};

/// The longest justification admission takes, in characters.
pub const JUSTIFICATION_MAX: usize = 500;

/// Whether `c` is shown as it is: not a control character (C0, DEL, C1, Cc), a format
/// character (Cf: bidirectional controls, zero-width characters, tags, the soft hyphen), a
/// line or paragraph separator (Zl, Zp), or a filler that shows as nothing.
fn shown_as_is(c: char) -> bool {
    !c.is_control()
        && !matches!(
            c,
            '\u{00ad}'
                | '\u{034f}'
                | '\u{061c}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// Whether `text` shows as it is ([`printable`] would leave it alone).
pub fn is_printable(text: &str) -> bool {
    text.chars().all(shown_as_is)
}

/// `text` with every character a terminal or a browser would act on written out instead:
/// `\n`, `\r`, `\t`, and `\u{…}` for the others.
///
/// Applying it again changes nothing (a backslash is left as it is), so a text typed with
/// `\u{1b}` in it reads like one that held the character: on a terminal neither does anything.
pub fn printable(text: &str) -> Cow<'_, str> {
    if is_printable(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            c if shown_as_is(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

/// Why `text` cannot be a justification, if it cannot: a justification is one line of
/// printable characters, at most [`JUSTIFICATION_MAX`] of them.
pub fn justification_problem(text: &str) -> Option<String> {
    line_problem("the justification", text)
}

/// What is wrong with `text` (a reason given with a request, named `what` in the sentence)
/// as a justification is held to: one line of printable text, at most
/// [`JUSTIFICATION_MAX`] characters; `None` when it is fine.
pub fn line_problem(what: &str, text: &str) -> Option<String> {
    if let Some((at, c)) = text.chars().enumerate().find(|(_, c)| !shown_as_is(*c)) {
        return Some(format!(
            "{what} must be one line of printable text, and its character {} is {} (a \
             control or formatting character)",
            at + 1,
            printable(&c.to_string())
        ));
    }
    let length = text.chars().count();
    (length > JUSTIFICATION_MAX).then(|| {
        format!(
            "{what} is {length} characters long; at most {JUSTIFICATION_MAX} are taken: give \
             a ticket or incident reference and a short reason"
        )
    })
}

fn clean(text: &mut String, max: usize) {
    if let Cow::Owned(shown) = printable(text) {
        *text = shown;
    }
    cut(text, max);
}

/// Holds `text` to `max` bytes (on a character boundary), saying how much was cut.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    let _ = write!(text, "…(cut: {cut} bytes)");
}

fn clean_operator(operator: &mut Option<proto::Operator>, max: usize) {
    if let Some(o) = operator {
        clean(&mut o.subject, max);
        clean(&mut o.email, max);
        o.groups.iter_mut().for_each(|g| clean(g, max));
    }
}

fn clean_value(value: &mut proto::Value, max: usize) {
    match &mut value.kind {
        Some(V::String(s) | V::Enumeration(s) | V::Target(s)) => clean(s, max),
        Some(
            V::Integer(_)
            | V::Number(_)
            | V::Boolean(_)
            | V::Duration(_)
            | V::Masked(_)
            | V::Sealed(_),
        )
        | None => {}
    }
}

fn clean_request(request: &mut Option<proto::Request>, max: usize) {
    let Some(r) = request else { return };
    clean_operator(&mut r.operator, max);
    clean(&mut r.justification, max);
    clean(&mut r.cancels, max);
    clean(&mut r.approves, max);
    clean(&mut r.break_glass, max);
    clean(&mut r.key_id, max);
    // Names too: a refusal records the names a submission gave.
    r.params = std::mem::take(&mut r.params)
        .into_iter()
        .map(|(mut name, mut value)| {
            clean(&mut name, max);
            clean_value(&mut value, max);
            (name, value)
        })
        .collect();
}

fn clean_plan(plan: &mut proto::Plan, max: usize) {
    clean(&mut plan.summary, max);
    for change in &mut plan.changes {
        clean(&mut change.action, max);
        clean(&mut change.resource, max);
        clean(&mut change.detail, max);
    }
}

/// Makes every text of `event` [`printable`], in place. A log event keeps its lines apart:
/// the `\n` between them stays, and each line is made printable.
pub fn make_printable(event: &mut proto::Event) {
    make_printable_within(event, usize::MAX);
}

/// [`make_printable`], each text then held to `max` bytes (what a refusal quotes from a
/// request nobody checked: written out, a control character takes several bytes).
pub fn make_printable_within(event: &mut proto::Event, max: usize) {
    clean(&mut event.command_id, max);
    clean(&mut event.source, max);
    clean(&mut event.operation, max);
    clean(&mut event.target, max);
    let Some(kind) = &mut event.kind else { return };
    match kind {
        Kind::Rejected(r) => {
            clean(&mut r.message, max);
            clean_request(&mut r.request, max);
        }
        Kind::Admitted(a) => clean_request(&mut a.request, max),
        Kind::Approval(a) => {
            clean_operator(&mut a.by, max);
            clean(&mut a.comment, max);
            clean(&mut a.approval_id, max);
        }
        Kind::Pending(p) => {
            clean_request(&mut p.request, max);
            clean(&mut p.catalog_version, max);
            clean(&mut p.fingerprint, max);
            if let Some(rule) = &mut p.rule {
                rule.approver_groups.iter_mut().for_each(|g| clean(g, max));
            }
        }
        Kind::Started(s) => {
            clean(&mut s.agent, max);
            clean(&mut s.host, max);
            clean(&mut s.target, max);
        }
        Kind::Progress(p) => {
            clean(&mut p.step, max);
            clean(&mut p.message, max);
        }
        Kind::Log(l) => {
            if !l.line.split('\n').all(is_printable) {
                l.line = l
                    .line
                    .split('\n')
                    .map(printable)
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            cut(&mut l.line, max);
        }
        Kind::CancelRequested(c) => {
            clean_operator(&mut c.by, max);
            clean(&mut c.justification, max);
        }
        Kind::Succeeded(s) => {
            clean(&mut s.summary, max);
            s.outputs = std::mem::take(&mut s.outputs)
                .into_iter()
                .map(|(mut k, mut v)| {
                    clean(&mut k, max);
                    clean(&mut v, max);
                    (k, v)
                })
                .collect();
        }
        Kind::Failed(f) => {
            clean(&mut f.code, max);
            clean(&mut f.message, max);
            for plan in [&mut f.approved_plan, &mut f.fresh_plan]
                .into_iter()
                .flatten()
            {
                clean_plan(plan, max);
            }
        }
        Kind::Plan(plan) => clean_plan(plan, max),
        Kind::Expired(_) => {}
        Kind::Cancelled(c) => clean(&mut c.reason, max),
        Kind::Unknown(u) => clean(&mut u.reason, max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a refusal quotes is held to a size, on a character boundary, saying so.
    #[test]
    fn texts_are_held_to_a_size_when_asked() {
        let mut event = proto::Event {
            target: "\u{1}".repeat(1000),
            kind: Some(Kind::Rejected(proto::Rejected {
                message: "é".repeat(10),
                ..Default::default()
            })),
            ..Default::default()
        };
        make_printable_within(&mut event, 15);
        assert!(
            event.target.starts_with("\\u{1}\\u{1}\\u{1}"),
            "{}",
            event.target
        );
        assert!(
            event.target.ends_with("…(cut: 4985 bytes)"),
            "{}",
            event.target
        );
        let Some(Kind::Rejected(r)) = &event.kind else {
            unreachable!()
        };
        assert_eq!(r.message, format!("{}…(cut: 6 bytes)", "é".repeat(7)));
    }

    /// What a terminal would act on is written out; everything else is left as it is.
    #[test]
    fn what_a_terminal_acts_on_is_written_out() {
        assert!(matches!(printable("SRE-101 drain é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            printable("\u{1b}[2K\rceo@example.com drained prod-1\n"),
            "\\u{1b}[2K\\rceo@example.com drained prod-1\\n"
        );
        assert_eq!(printable("a\tb\u{7f}\u{9b}31m"), "a\\tb\\u{7f}\\u{9b}31m");
        // Bidirectional overrides reorder what is read ("Trojan source").
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
    }

    /// Zero-width and invisible characters, separators and tags are written out too.
    #[test]
    fn what_shows_as_nothing_is_written_out() {
        for c in [
            '\u{200b}',
            '\u{2028}',
            '\u{feff}',
            '\u{e0041}',
            '\u{00ad}',
            '\u{3164}',
        ] {
            assert!(!is_printable(&format!("a{c}b")), "{:x}", u32::from(c));
        }
        assert_eq!(
            printable(&printable("\u{1b}")),
            printable("\u{1b}"),
            "applied twice"
        );
    }

    #[test]
    fn a_justification_is_one_printable_line_of_bounded_length() {
        assert_eq!(
            justification_problem("SRE-101: traffic shift for the incident"),
            None
        );
        let why = justification_problem("SRE-1\n\u{1b}[1A").unwrap();
        assert!(why.contains("character 6 is \\n"), "{why}");
        assert!(justification_problem("x\u{2066}").is_some());
        assert_eq!(justification_problem(&"é".repeat(JUSTIFICATION_MAX)), None);
        let why = justification_problem(&"x".repeat(JUSTIFICATION_MAX + 1)).unwrap();
        assert!(why.contains("501 characters"), "{why}");
    }

    /// Every text of a refusal, its request's names and values included, and each line of a
    /// log event apart.
    #[test]
    fn every_text_of_an_event_is_made_printable() {
        let esc = "\u{1b}[2K";
        let mut rejected = proto::Event {
            source: format!("admission/{esc}"),
            target: esc.into(),
            kind: Some(Kind::Rejected(proto::Rejected {
                code: 8,
                message: format!("signed by key {esc}"),
                request: Some(proto::Request {
                    operator: Some(proto::Operator {
                        subject: esc.into(),
                        email: esc.into(),
                        groups: vec![esc.into()],
                    }),
                    justification: format!("\r{esc}ceo drained prod-1"),
                    key_id: esc.into(),
                    params: [(
                        format!("p{esc}"),
                        proto::Value {
                            kind: Some(V::String(esc.into())),
                        },
                    )]
                    .into(),
                    ..proto::Request::default()
                }),
            })),
            ..proto::Event::default()
        };
        make_printable(&mut rejected);
        let text = texts(&rejected);
        assert!(!text.chars().any(|c| c.is_control()), "{text}");
        assert_eq!(text.matches("\\u{1b}[2K").count(), 10, "{text}");

        let mut log = proto::Event {
            kind: Some(Kind::Log(proto::Log {
                stream: 1,
                line: format!("first\nsecond{esc}\rthird"),
                undone_by: String::new(),
            })),
            ..proto::Event::default()
        };
        make_printable(&mut log);
        let Some(Kind::Log(l)) = &log.kind else {
            unreachable!()
        };
        assert_eq!(l.line, "first\nsecond\\u{1b}[2K\\rthird");
    }

    /// Every string of the refusal above, joined (its Debug form would escape them itself).
    fn texts(event: &proto::Event) -> String {
        let Some(Kind::Rejected(r)) = &event.kind else {
            unreachable!()
        };
        let q = r.request.as_ref().unwrap();
        let o = q.operator.as_ref().unwrap();
        let mut all = vec![
            event.source.clone(),
            event.target.clone(),
            r.message.clone(),
            q.justification.clone(),
            q.key_id.clone(),
            o.subject.clone(),
            o.email.clone(),
        ];
        all.extend(o.groups.iter().cloned());
        for (k, v) in &q.params {
            all.push(k.clone());
            if let Some(V::String(s)) = &v.kind {
                all.push(s.clone());
            }
        }
        all.join("|")
    }
}
