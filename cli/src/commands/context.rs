//! `rct context`: named connection settings, like kubectl's.

use crate::exit::{Error, Exit, Result};
use crate::home::Home;

/// Manage contexts (how to reach NATS).
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// List contexts; the current one is marked.
    List,
    /// Make a context current.
    Use {
        /// Its name.
        name: String,
    },
    /// Print the current context's name.
    Current,
    /// Delete a context, with its session and catalog cache.
    Delete {
        /// Its name.
        name: String,
    },
    /// Rename a context (its session and cache go with it).
    Rename {
        /// Its name now.
        from: String,
        /// Its new name.
        to: String,
    },
    /// Create or change a context.
    Set {
        /// Its name.
        name: String,
        /// NATS server URL; repeat for several.
        #[arg(long = "server", required = true)]
        servers: Vec<String>,
        /// JetStream domain (behind a leaf node).
        #[arg(long)]
        domain: Option<String>,
        /// NATS credentials file.
        #[arg(long)]
        credentials: Option<std::path::PathBuf>,
        /// File holding the operator identity's nkey seed (see ops/nats/accounts.conf).
        #[arg(long)]
        nkey: Option<std::path::PathBuf>,
        /// CA certificate for TLS.
        #[arg(long)]
        tls_ca: Option<std::path::PathBuf>,
        /// Client certificate for mutual TLS (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// Client key for mutual TLS (with --tls-cert).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// How long one JetStream request or acknowledgement may take (e.g. 5s); a submission
        /// is tried about ten times before rct says it may not be on record.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// PEM file of admission's public key(s) to check who wrote each event against,
        /// instead of the keys admission publishes beside the catalog (which are only as
        /// trustworthy as that bucket's permissions). Pin them where the stream's
        /// administrators are not the people it must hold to account.
        #[arg(long)]
        admission_key: Option<std::path::PathBuf>,
    },
}

/// Runs `rct context`.
#[allow(clippy::print_stdout)] // the listing is the result
pub fn run(home: &Home, args: Args) -> Result {
    let mut contexts = home.contexts()?;
    match args {
        Args::List => {
            for (name, c) in &contexts.contexts {
                let mark = if contexts.current.as_deref() == Some(name) {
                    "*"
                } else {
                    " "
                };
                println!("{mark} {name:<12} {}", c.servers.join(","));
            }
            if contexts.contexts.is_empty() {
                eprintln!(
                    "no contexts yet: rct dev creates one, or rct context set NAME --server URL"
                );
            }
        }
        Args::Use { name } => {
            known(&contexts, &name)?;
            contexts.current = Some(name.clone());
            home.save_contexts(&contexts)?;
            eprintln!("now using context {name}");
        }
        Args::Current => match &contexts.current {
            Some(name) => println!("{name}"),
            None => {
                return Err(Error::usage(
                    "no context is current: rct context use NAME picks one (rct context list)",
                ));
            }
        },
        Args::Delete { name } => {
            known(&contexts, &name)?;
            contexts.contexts.remove(&name);
            let was_current = contexts.current.as_deref() == Some(name.as_str());
            if was_current {
                contexts.current = None;
            }
            home.save_contexts(&contexts)?;
            remove_dir(&home.context_dir(&name))?;
            eprintln!(
                "deleted context {name}, with its session and catalog cache{}",
                if was_current {
                    "; no context is current now (rct context use NAME)"
                } else {
                    ""
                }
            );
        }
        Args::Rename { from, to } => {
            known(&contexts, &from)?;
            if contexts.contexts.contains_key(&to) {
                return Err(Error::usage(format!(
                    "there is already a context {to}: rct context delete {to} first"
                )));
            }
            crate::home::check_name(&to)?;
            let connection = contexts.contexts.remove(&from).expect("known");
            contexts.contexts.insert(to.clone(), connection);
            if contexts.current.as_deref() == Some(from.as_str()) {
                contexts.current = Some(to.clone());
            }
            let (old, new) = (home.context_dir(&from), home.context_dir(&to));
            if old.exists() {
                std::fs::rename(&old, &new).map_err(|e| {
                    Error::usage(format!(
                        "cannot move {} to {}: {e}",
                        old.display(),
                        new.display()
                    ))
                })?;
            }
            home.save_contexts(&contexts)?;
            eprintln!("renamed context {from} to {to}");
        }
        Args::Set {
            name,
            servers,
            domain,
            credentials,
            nkey,
            tls_ca,
            tls_cert,
            tls_key,
            timeout,
            admission_key,
        } => {
            let connection = rct_streams::Connection {
                servers,
                domain,
                credentials_file: credentials,
                nkey_file: nkey,
                tls_ca,
                tls_cert,
                tls_key,
                timeout: timeout.unwrap_or(rct_streams::Connection::default().timeout),
                ..rct_streams::Connection::default()
            };
            crate::home::check_name(&name)?;
            if let Some(path) = &admission_key {
                pin(home, &name, path)?;
            }
            let existed = contexts.contexts.insert(name.clone(), connection).is_some();
            let current = contexts.current.get_or_insert(name.clone()) == &name;
            home.save_contexts(&contexts)?;
            eprintln!(
                "{} context {name}{}",
                if existed { "updated" } else { "created" },
                if current { " (current)" } else { "" }
            );
        }
    }
    Ok(Exit::Ok)
}

fn known(contexts: &crate::home::Contexts, name: &str) -> Result<()> {
    if contexts.contexts.contains_key(name) {
        return Ok(());
    }
    let hint = rct_bus::catalog::nearest(name, contexts.contexts.keys().map(String::as_str))
        .map(|n| format!(" (did you mean {n}?)"))
        .unwrap_or_default();
    Err(Error::usage(format!(
        "there is no context {name}{hint}; rct context list shows the known ones"
    )))
}

fn remove_dir(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::usage(format!(
            "cannot remove {}: {e}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Pins the admission keys in `path` for context `name` (see `--admission-key`).
pub fn pin(home: &Home, name: &str, path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", path.display())))?;
    let keys = rct_bus::PublicKey::all_from_pem(&text)
        .map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
    if keys.is_empty() {
        return Err(Error::usage(format!(
            "{} holds no public key (PEM)",
            path.display()
        )));
    }
    std::fs::create_dir_all(home.context_dir(name))
        .map_err(|e| Error::usage(format!("cannot make the context's folder: {e}")))?;
    let pinned = crate::remote::pinned_keys(home, name);
    // A new pin trusts anew where signed events begin, on first use.
    let _ = std::fs::remove_file(pinned.with_file_name("signed-from"));
    crate::home::write_private(&pinned, text.as_bytes())
}
