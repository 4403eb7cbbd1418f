//! Undo: the command that reverses a succeeded one, as its operation's catalog entry says.
//!
//! ```yaml
//! traffic/drain-cluster:
//!   inverse:
//!     operation: traffic/set-weights
//!     params: { cluster: "{cluster}", weight: "{outputs.previous_weight}" }
//! ```
//!
//! Each parameter of the inverse is a template over the original's parameters (`{cluster}`)
//! and the outputs its success recorded (`{outputs.previous_weight}`). The CLI fills them to
//! show and submit the undo; admission fills them again from the record and admits the undo
//! only when it asks for exactly that. Everything here is pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Operation, display_value};
use crate::{OperationName, proto};

/// Where a template names an output of the original's success: `{outputs.<name>}`.
pub const OUTPUTS: &str = "outputs.";

/// An operation's `inverse`: the operation that undoes it, and its parameters as templates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inverse {
    /// The operation that undoes it, `<tower>/<op>`.
    pub operation: String,
    /// Its parameters by name: templates over the original's parameters and outputs.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

impl Inverse {
    /// What is wrong with the inverse of `operation` in `catalog`, if anything: it names an
    /// operation of the catalog, gives every parameter that one needs and nothing else, and
    /// uses only the original's parameters (none secret: the record holds them masked) and
    /// outputs.
    pub fn problems(&self, catalog: &Catalog, operation: &Operation) -> Vec<String> {
        let mut problems = Vec::new();
        let inverse = match self.operation.parse::<OperationName>() {
            Err(e) => {
                problems.push(format!("{e}; the inverse is named <tower>/<op>"));
                None
            }
            Ok(name) => match catalog.operation(&name) {
                None => {
                    problems.push(format!(
                        "the inverse {name} is not an operation of the catalog"
                    ));
                    None
                }
                Some((_, inverse)) => Some((name, inverse)),
            },
        };
        if let Some((name, inverse)) = inverse {
            for (param, spec) in &inverse.params {
                match self.params.get(param) {
                    None if spec.default.is_none() => problems.push(format!(
                        "{name} needs {param}: give it in the inverse's params"
                    )),
                    Some(_) if spec.secret => problems.push(format!(
                        "{param} of {name} is secret: an undo cannot fill it from the record"
                    )),
                    _ => {}
                }
            }
            for param in self.params.keys() {
                if !inverse.params.contains_key(param) {
                    problems.push(format!("{name} takes no parameter {param}"));
                }
            }
        }
        for (param, template) in &self.params {
            for used in crate::template::names(template) {
                match used.strip_prefix(OUTPUTS) {
                    Some(output) if !output.is_empty() => {}
                    Some(_) => problems.push(format!(
                        "{param}: {template:?} names no output: write {{outputs.<name>}}"
                    )),
                    None => match operation.params.get(used) {
                        None => problems.push(format!(
                            "{param}: {template:?} uses {{{used}}}, which is neither one of the \
                             operation's parameters nor {{outputs.<name>}}"
                        )),
                        Some(p) if p.secret => problems.push(format!(
                            "{param}: {template:?} uses the secret parameter {used}, which the \
                             record holds masked"
                        )),
                        Some(_) => {}
                    },
                }
            }
        }
        problems
    }

    /// The inverse's parameters for the original command's `params` (as its decision recorded
    /// them) and the `outputs` of its success, as text for the inverse to parse; or why the
    /// record cannot fill them.
    pub fn fill(
        &self,
        params: &BTreeMap<String, proto::Value>,
        outputs: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, String> {
        let values: BTreeMap<String, String> = params
            .iter()
            .map(|(name, value)| (name.clone(), display_value(value)))
            .chain(
                outputs
                    .iter()
                    .map(|(name, value)| (format!("{OUTPUTS}{name}"), value.clone())),
            )
            .collect();
        self.params
            .iter()
            .map(|(param, template)| {
                if let Some(missing) = crate::template::names(template)
                    .into_iter()
                    .find(|used| !values.contains_key(*used))
                {
                    return Err(match missing.strip_prefix(OUTPUTS) {
                        Some(output) => format!(
                            "its success recorded no output {output}, which the inverse needs \
                             for {param}"
                        ),
                        None => format!("its record has no parameter {missing}"),
                    });
                }
                Ok((param.clone(), crate::template::fill(template, &values)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inverse(params: &[(&str, &str)]) -> Inverse {
        Inverse {
            operation: "traffic/set-weights".into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn target(t: &str) -> proto::Value {
        proto::Value {
            kind: Some(proto::value::Kind::Target(t.into())),
        }
    }

    #[test]
    fn parameters_fill_from_the_record_and_outputs() {
        let inverse = inverse(&[
            ("cluster", "{cluster}"),
            ("weight", "{outputs.previous_weight}"),
        ]);
        let params = BTreeMap::from([("cluster".to_owned(), target("prod-1"))]);
        let outputs = BTreeMap::from([("previous_weight".to_owned(), "60".to_owned())]);
        assert_eq!(
            inverse.fill(&params, &outputs).unwrap(),
            BTreeMap::from([
                ("cluster".to_owned(), "prod-1".to_owned()),
                ("weight".to_owned(), "60".to_owned())
            ])
        );
        let none = BTreeMap::new();
        let missing = inverse.fill(&params, &none).unwrap_err();
        assert!(missing.contains("no output previous_weight"), "{missing}");
    }
}
