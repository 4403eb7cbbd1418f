//! Where `rct` keeps its state: `$RCT_HOME`, else `~/.config/rct`. Contexts (how to reach
//! NATS, like kubectl's), per-context sessions (0600) and the catalog cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rct_streams::Connection;
use serde::{Deserialize, Serialize};

use crate::exit::{Error, Result};

/// The context used when none is named or current.
pub const DEFAULT_CONTEXT: &str = "default";

/// The state folder.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

/// Named connection settings and which one is current.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Contexts {
    /// The context used when none is named.
    #[serde(default)]
    pub current: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Connection>,
}

impl Home {
    /// `$RCT_HOME`, else the platform's config folder + `rct`.
    pub fn locate() -> Self {
        let root = std::env::var_os(rct_streams::runtime::ENV_HOME)
            .map(PathBuf::from)
            .or_else(|| dirs::config_dir().map(|d| d.join("rct")))
            .unwrap_or_else(|| PathBuf::from(".rct"));
        Self { root }
    }

    /// A home at `root` (tests, the demo).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    fn contexts_file(&self) -> PathBuf {
        self.root.join("contexts.yaml")
    }

    /// The contexts file (empty when there is none).
    pub fn contexts(&self) -> Result<Contexts> {
        match std::fs::read_to_string(self.contexts_file()) {
            Ok(text) => serde_yaml_ng::from_str(&text).map_err(|e| {
                Error::usage(format!(
                    "{} is not valid: {e}",
                    self.contexts_file().display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
            Err(e) => Err(Error::usage(format!(
                "cannot read {}: {e}",
                self.contexts_file().display()
            ))),
        }
    }

    /// Writes the contexts file.
    pub fn save_contexts(&self, contexts: &Contexts) -> Result<()> {
        let text = serde_yaml_ng::to_string(contexts).expect("contexts serialize");
        write_private(&self.contexts_file(), text.as_bytes())
    }

    /// The folder of one context's session and cache.
    pub fn context_dir(&self, context: &str) -> PathBuf {
        self.root.join("contexts").join(context)
    }
}

/// A context's name becomes a folder's: a plain word, no path.
pub fn check_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if plain {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "{name:?} cannot name a context: use letters, digits, '-', '_' and '.' (not first)"
        )))
    }
}

/// Writes a file readable by its owner only (mode 0600), creating folders as needed.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| Error::usage(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(contents).map_err(fail)
}
