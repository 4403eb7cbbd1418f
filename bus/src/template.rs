//! `{name}` placeholders in text the catalog and scripts files hold: a script's arguments, a
//! lock's key (`locks: ["{cluster}"]`). One reading of them everywhere.

use std::collections::BTreeMap;

/// Replaces `{name}` with its value; unknown names and an unclosed `{` stay as written.
pub fn fill(template: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                let name = &rest[start + 1..start + end];
                match values.get(name) {
                    Some(value) => out.push_str(value),
                    None => out.push_str(&rest[start..=start + end]),
                }
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The names `template` uses, in order, as [`fill`] reads them.
pub fn names(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        names.push(&rest[start + 1..start + end]);
        rest = &rest[start + end + 1..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_within_one_item() {
        let values: BTreeMap<String, String> =
            [("ns".to_owned(), "a b; rm -rf /".to_owned())].into();
        assert_eq!(
            fill("--namespace={ns}", &values),
            "--namespace=a b; rm -rf /"
        );
        assert_eq!(fill("{ns}", &values), "a b; rm -rf /");
        assert_eq!(fill("{unknown} {", &values), "{unknown} {");
    }

    #[test]
    fn names_are_what_fill_would_replace() {
        assert_eq!(names("a-{cluster}.{ns}"), ["cluster", "ns"]);
        assert_eq!(
            names("{outputs.previous_weight}"),
            ["outputs.previous_weight"]
        );
        assert!(names("plain {").is_empty());
    }
}
