//! Loading the catalog from YAML, with every problem pointed at its file and line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rct_bus::catalog::Catalog;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One problem in a catalog file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line; 0 when unknown.
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// A catalog that cannot be used, with all its problems.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    /// The file.
    pub file: PathBuf,
    /// Its problems, in line order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the catalog {} is not valid:", self.file.display())?;
        for problem in &self.problems {
            write!(
                f,
                "\n  {}:{}: {}",
                self.file.display(),
                problem.line,
                problem.message
            )?;
        }
        Ok(())
    }
}

/// Reads and checks the catalog at `path`.
pub fn load(path: &Path) -> Result<Catalog, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error {
        file: path.to_owned(),
        problems: vec![Problem {
            line: 0,
            message: format!("cannot read it: {e}"),
        }],
    })?;
    parse(path, &text)
}

/// Checks catalog text; `file` names it in errors.
pub fn parse(file: &Path, text: &str) -> Result<Catalog, Error> {
    let fail = |problems: Vec<Problem>| Error {
        file: file.to_owned(),
        problems,
    };
    let index = Index::of(text).map_err(|p| fail(vec![p]))?;
    if !index.duplicates.is_empty() {
        return Err(fail(index.duplicates));
    }
    let catalog: Catalog = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map_or(0, |l| l.line());
        fail(vec![Problem {
            line,
            message: hint(&e.to_string()),
        }])
    })?;
    let mut problems: Vec<Problem> = catalog
        .problems()
        .into_iter()
        .map(|p| Problem {
            line: index.line_of(&p.path),
            message: p.message,
        })
        .collect();
    if problems.is_empty() {
        for (name, tower) in &catalog.towers {
            let listed = tower
                .recipients
                .iter()
                .chain(tower.target_recipients.values().flatten());
            if listed
                .into_iter()
                .any(|r| r == rct_bus::sealed::EXAMPLE_RECIPIENT)
            {
                tracing::warn!(
                    tower = %name,
                    "the catalog lists the example key of ops/examples/workloads.agekey, which is \
                     public: anything sealed to it can be read by anyone; list your agents' own \
                     keys (rct-agent keygen)"
                );
            }
        }
        Ok(catalog)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(fail(problems))
    }
}

/// serde_yaml's message, without the position (we print our own) and with a pointer for the
/// commonest mistake.
fn hint(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(at) => &message[..at],
        None => message,
    };
    if message.contains("unknown field") {
        format!("{message} (check the spelling; ops/catalog.example.yaml shows every field)")
    } else {
        message.to_owned()
    }
}

/// Where each key path of a YAML document starts, and the keys written twice in one mapping
/// (which YAML parsers silently collapse).
#[derive(Debug, Default)]
struct Index {
    lines: HashMap<Vec<String>, usize>,
    duplicates: Vec<Problem>,
    stack: Vec<Frame>,
}

#[derive(Debug)]
struct Frame {
    path: Vec<String>,
    /// For mappings: the key whose value comes next; `None` while a key is expected.
    key: Option<String>,
    is_mapping: bool,
    seen: HashMap<String, usize>,
    index: usize,
}

impl Index {
    fn of(text: &str) -> Result<Self, Problem> {
        let mut index = Index::default();
        Parser::new_from_str(text)
            .load(&mut index, false)
            .map_err(|e| Problem {
                line: e.marker().line(),
                message: format!("not valid YAML: {}", e.info()),
            })?;
        Ok(index)
    }

    /// The line of the longest known prefix of `path`.
    fn line_of(&self, path: &[String]) -> usize {
        (0..=path.len())
            .rev()
            .find_map(|n| self.lines.get(&path[..n]).copied())
            .unwrap_or(0)
    }

    /// The path a value starting now sits at, and marks the parent as having received it.
    fn value_path(&mut self) -> Vec<String> {
        match self.stack.last_mut() {
            None => Vec::new(),
            Some(frame) if frame.is_mapping => {
                let mut path = frame.path.clone();
                path.extend(frame.key.take());
                path
            }
            Some(frame) => {
                let mut path = frame.path.clone();
                path.push(frame.index.to_string());
                frame.index += 1;
                path
            }
        }
    }

    fn open(&mut self, is_mapping: bool, line: usize) {
        let path = self.value_path();
        self.lines.entry(path.clone()).or_insert(line);
        self.stack.push(Frame {
            path,
            key: None,
            is_mapping,
            seen: HashMap::new(),
            index: 0,
        });
    }
}

impl MarkedEventReceiver for Index {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let line = mark.line();
        match event {
            Event::MappingStart(..) => self.open(true, line),
            Event::SequenceStart(..) => self.open(false, line),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Scalar(value, ..) => {
                let expecting_key = self
                    .stack
                    .last()
                    .is_some_and(|f| f.is_mapping && f.key.is_none());
                if expecting_key {
                    let frame = self.stack.last_mut().expect("checked above");
                    if let Some(first) = frame.seen.insert(value.clone(), line) {
                        self.duplicates.push(Problem {
                            line,
                            message: format!(
                                "{value} is defined twice (first at line {first}); \
                                 keep one definition"
                            ),
                        });
                    }
                    let mut path = frame.path.clone();
                    path.push(value.clone());
                    frame.key = Some(value);
                    self.lines.entry(path).or_insert(line);
                } else {
                    self.value_path();
                }
            }
            Event::Alias(_) => {
                self.value_path();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(usize, String)> {
        parse(Path::new("catalog.yaml"), text)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| (p.line, p.message))
            .collect()
    }

    const GOOD: &str = "\
towers:
  traffic:
    flavour: cluster
    targets: [prod-1, prod-2]
operations:
  traffic/drain-cluster:
    allowed_groups: [sre_team]
    params:
      cluster: { type: target }
";

    #[test]
    fn the_example_catalog_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/catalog.example.yaml");
        let catalog = load(&path).unwrap();
        assert!(catalog.operations.contains_key("traffic/drain-cluster"));
        parse(Path::new("good.yaml"), GOOD).unwrap();
    }

    #[test]
    fn unknown_fields_point_at_their_line_with_a_hint() {
        let text = GOOD.replace("    allowed_groups", "    allowed_group");
        let found = problems(&text);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 7);
        assert!(
            found[0].1.contains("unknown field `allowed_group`"),
            "{found:?}"
        );
        assert!(found[0].1.contains("expected"), "{found:?}");
    }

    #[test]
    fn duplicate_operations_are_refused() {
        let text = format!(
            "{GOOD}  traffic/drain-cluster:\n    allowed_groups: [x]\n    params:\n      cluster: {{ type: target }}\n"
        );
        assert_eq!(
            problems(&text),
            [(
                10,
                "traffic/drain-cluster is defined twice (first at line 6); keep one definition"
                    .to_owned()
            )]
        );
    }

    #[test]
    fn semantic_problems_point_at_the_entry() {
        let text = format!(
            "{GOOD}  db/failover:\n    allowed_groups: [dba]\n    justification: {{ required: true, pattern: \"([\" }}\n"
        );
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, 10);
        assert!(found[0].1.starts_with("unknown tower db"), "{found:?}");
        assert_eq!(found[1].0, 12);
        assert!(found[1].1.contains("bad regular expression"), "{found:?}");
    }

    #[test]
    fn a_target_on_a_simple_tower_is_refused() {
        let text = "\
towers:
  workloads:
    flavour: simple
operations:
  workloads/restart:
    allowed_groups: [sre_team]
    params:
      where: { type: target }
";
        let found = problems(text);
        assert_eq!(found[0].0, 7, "{found:?}");
        assert!(found[0].1.contains("needs a cluster tower"), "{found:?}");
    }

    #[test]
    fn broken_yaml_and_missing_files_are_explained() {
        let found = problems("towers: [\n");
        assert!(found[0].1.starts_with("not valid YAML"), "{found:?}");
        let error = load(Path::new("/nonexistent/catalog.yaml")).unwrap_err();
        assert!(error.to_string().contains("cannot read it"), "{error}");
    }

    /// A deadline or timeout no clock can add (`100000000years`) loaded, then panicked the
    /// first decision that added it to the time.
    #[test]
    fn absurd_deadlines_and_timeouts_point_at_their_line() {
        let text = format!("{GOOD}    deadline: 100000000years\n    timeout: 100000000years\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, 10, "{found:?}");
        assert!(found[0].1.contains("deadline"), "{found:?}");
        assert_eq!(found[1].0, 11, "{found:?}");
        assert!(found[1].1.contains("timeout"), "{found:?}");
        let text = GOOD.replace(
            "      cluster: { type: target }",
            "      cluster: { type: target }\n      ramp: { type: duration, default: 500000000000years }",
        );
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, 10, "{found:?}");
    }
}
