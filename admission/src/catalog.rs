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
    // A syntax error ends the reading: nothing after it can be understood.
    let index = Index::of(text).map_err(|p| fail(vec![p]))?;
    let mut problems = index.duplicates.clone();
    // Read as serde_yaml reads a document (a plain scalar is text where text is expected);
    // only when that fails is the structure walked to find every problem.
    let direct = if problems.is_empty() {
        serde_yaml_ng::from_str::<Catalog>(text).map_err(Some)
    } else {
        Err(None)
    };
    let catalog = match direct {
        Ok(catalog) => Some(catalog),
        Err(direct) => {
            let (catalog, structural) = structure(text, &index);
            match (structural.is_empty(), direct) {
                // The walk found nothing serde_yaml refused: say what it said.
                (true, Some(e)) => problems.push(Problem {
                    line: e.location().map_or(0, |l| l.line()),
                    message: hint(&e.to_string()),
                }),
                _ => problems.extend(structural),
            }
            catalog
        }
    };
    // The rules are checked on what could be read, so one run says everything.
    if let Some(catalog) = &catalog {
        problems.extend(catalog.problems().into_iter().map(|p| Problem {
            line: index.line_of(&p.path),
            message: p.message,
        }));
    }
    let catalog = match catalog {
        Some(catalog) if problems.is_empty() => catalog,
        _ => {
            problems.sort_by_key(|p| p.line);
            return Err(fail(problems));
        }
    };
    {
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
    }
    Ok(catalog)
}

/// Reads the catalog's structure, collecting every unknown field and every value of the
/// wrong type: each is noted and taken out, and the reading starts again, until the rest
/// reads. The catalog is `None` when what is left cannot be one (a required field missing or
/// wrong).
fn structure(text: &str, index: &Index) -> (Option<Catalog>, Vec<Problem>) {
    let mut problems = Vec::new();
    // Keys written twice (already said) stop serde_yaml: read the rest another way.
    let parsed = if index.duplicates.is_empty() {
        serde_yaml_ng::from_str(text).map_err(Some)
    } else {
        index.value.clone().ok_or(None)
    };
    let mut value: serde_yaml_ng::Value = match parsed {
        Ok(value) => value,
        Err(None) => return (None, problems),
        Err(Some(e)) => {
            let line = e.location().map_or(0, |l| l.line());
            problems.push(Problem {
                line,
                message: hint(&e.to_string()),
            });
            return (None, problems);
        }
    };
    let mut removed: Vec<Vec<String>> = Vec::new();
    // Each round takes one thing out; a catalog has far fewer than this.
    for _ in 0..200 {
        let error = match serde_path_to_error::deserialize::<_, Catalog>(value.clone()) {
            Ok(catalog) => return (Some(catalog), problems),
            Err(error) => error,
        };
        let path = path_of(error.path());
        let message = error.inner().to_string();
        // A plain number or boolean is text where text is expected (as serde_yaml reads a
        // document): read it so, and go on.
        if message.contains("expected a string")
            && [
                "invalid type: integer",
                "invalid type: boolean",
                "invalid type: floating point",
            ]
            .iter()
            .any(|m| message.starts_with(m))
            && as_text(&mut value, &path)
        {
            continue;
        }
        // Missing because an earlier round took it out: already said.
        let consequence = removed.iter().any(|r| r.starts_with(&path));
        if !consequence {
            problems.push(Problem {
                line: index.line_of(&path),
                message: match path.split_last() {
                    Some((_, [])) | None => hint(&message),
                    Some((_, parents)) => format!("{}: {}", parents.join("."), hint(&message)),
                },
            });
        }
        if consequence || path.is_empty() || !remove(&mut value, &path) {
            return (None, problems);
        }
        removed.push(path);
    }
    (None, problems)
}

/// A serde path as the index's keys (`operations`, `traffic/drain-cluster`, `params`, …).
fn path_of(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect()
}

/// The value at `path` in `value`.
fn at_mut<'a>(
    value: &'a mut serde_yaml_ng::Value,
    path: &[String],
) -> Option<&'a mut serde_yaml_ng::Value> {
    let mut at = value;
    for key in path {
        at = match at {
            serde_yaml_ng::Value::Mapping(map) => map.get_mut(key.as_str())?,
            serde_yaml_ng::Value::Sequence(list) => list.get_mut(key.parse::<usize>().ok()?)?,
            serde_yaml_ng::Value::Tagged(tagged) => &mut tagged.value,
            _ => return None,
        };
    }
    Some(at)
}

/// Replaces the number or boolean at `path` by its text; whether it did.
fn as_text(value: &mut serde_yaml_ng::Value, path: &[String]) -> bool {
    use serde_yaml_ng::Value;
    let Some(at) = at_mut(value, path) else {
        return false;
    };
    let text = match at {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return false,
    };
    *at = Value::String(text);
    true
}

/// Takes the value at `path` out of `value`; whether there was one.
fn remove(value: &mut serde_yaml_ng::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let Some(at) = at_mut(value, parents) else {
        return false;
    };
    match at {
        serde_yaml_ng::Value::Mapping(map) => map.remove(last.as_str()).is_some(),
        serde_yaml_ng::Value::Sequence(list) => match last.parse::<usize>() {
            Ok(i) if i < list.len() => {
                list.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
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
    /// The document, where a key written twice keeps its first value (serde_yaml refuses
    /// it whole; this lets the other problems be found too).
    value: Option<serde_yaml_ng::Value>,
    building: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Mapping(serde_yaml_ng::Mapping, Option<serde_yaml_ng::Value>),
    Sequence(Vec<serde_yaml_ng::Value>),
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

    /// Puts a finished value where the document being built expects one.
    fn attach(&mut self, value: serde_yaml_ng::Value) {
        match self.building.last_mut() {
            None => self.value = Some(value),
            Some(Node::Sequence(items)) => items.push(value),
            Some(Node::Mapping(_, key @ None)) => *key = Some(value),
            Some(Node::Mapping(map, key)) => {
                let key = key.take().expect("matched above");
                if !map.contains_key(&key) {
                    map.insert(key, value);
                }
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
        match &event {
            Event::MappingStart(..) => self
                .building
                .push(Node::Mapping(serde_yaml_ng::Mapping::new(), None)),
            Event::SequenceStart(..) => self.building.push(Node::Sequence(Vec::new())),
            Event::MappingEnd | Event::SequenceEnd => {
                let done = match self.building.pop() {
                    Some(Node::Mapping(map, _)) => serde_yaml_ng::Value::Mapping(map),
                    Some(Node::Sequence(items)) => serde_yaml_ng::Value::Sequence(items),
                    None => serde_yaml_ng::Value::Null,
                };
                self.attach(done);
            }
            Event::Scalar(text, style, ..) => self.attach(scalar(text, *style)),
            Event::Alias(_) => self.attach(serde_yaml_ng::Value::Null),
            _ => {}
        }
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

/// A scalar as YAML's core schema reads it: plain `null`, booleans and numbers; the rest,
/// and anything quoted, text.
fn scalar(text: &str, style: yaml_rust2::scanner::TScalarStyle) -> serde_yaml_ng::Value {
    use serde_yaml_ng::Value;
    if style != yaml_rust2::scanner::TScalarStyle::Plain {
        return Value::String(text.to_owned());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => Value::Null,
        "true" | "True" | "TRUE" => Value::Bool(true),
        "false" | "False" | "FALSE" => Value::Bool(false),
        _ => text
            .parse::<i64>()
            .map(|i| Value::Number(i.into()))
            .or_else(|_| text.parse::<f64>().map(|f| Value::Number(f.into())))
            .unwrap_or_else(|_| Value::String(text.to_owned())),
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

    /// Every problem in one run: unknown fields anywhere, a value of the wrong type, a
    /// duplicate, and the rules on what could be read.
    #[test]
    fn every_problem_is_reported_in_one_run() {
        let text = "\
towers:
  traffic:
    flavour: cluster
    targets: [prod-1, prod-2]
    colour: blue
operations:
  traffic/drain-cluster:
    allowed_group: [sre_team]
    allowed_groups: [sre_team]
    timeout: soon
    params:
      cluster: { type: target, secrett: false }
  db/failover:
    allowed_groups: [dba]
  db/failover:
    allowed_groups: [dba]
";
        // Without the duplicate, serde_yaml reads the document; with it, the index does.
        let without = text.trim_end().rsplitn(3, '\n').nth(2).unwrap().to_owned() + "\n";
        let found = problems(&without);
        let lines: Vec<usize> = found.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [5, 8, 10, 12, 13], "{found:#?}");
        let found = problems(text);
        let lines: Vec<usize> = found.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [5, 8, 10, 12, 13, 15], "{found:#?}");
        assert!(found[0].1.contains("unknown field `colour`"), "{found:#?}");
        assert!(
            found[1].1.contains("unknown field `allowed_group`"),
            "{found:#?}"
        );
        assert!(found[2].1.contains("soon"), "{found:#?}");
        assert!(found[3].1.contains("unknown field `secrett`"), "{found:#?}");
        assert!(found[4].1.starts_with("unknown tower db"), "{found:#?}");
        assert!(found[5].1.contains("defined twice"), "{found:#?}");
    }

    /// A plain number or boolean is text where text is expected, as it was before every
    /// problem was collected: such catalogs still load, and are still read so when another
    /// problem is reported.
    #[test]
    fn plain_numbers_and_booleans_are_text_where_text_is_expected() {
        let text = GOOD
            .replace("targets: [prod-1, prod-2]", "targets: [prod-1, 2024]")
            .replace("allowed_groups: [sre_team]", "allowed_groups: [1001, true]")
            + "    description: 42\n";
        let catalog = parse(Path::new("good.yaml"), &text).unwrap();
        assert_eq!(
            catalog.operations["traffic/drain-cluster"].description,
            "42"
        );
        assert_eq!(
            catalog.operations["traffic/drain-cluster"].allowed_groups,
            ["1001", "true"]
        );
        let found = problems(&(text.clone() + "    colour: blue\n"));
        assert_eq!(found.len(), 1, "only the unknown field: {found:#?}");
        assert!(found[0].1.contains("unknown field `colour`"), "{found:#?}");
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
