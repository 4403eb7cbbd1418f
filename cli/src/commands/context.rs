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
            if !contexts.contexts.contains_key(&name) {
                return Err(Error::usage(format!("there is no context {name}")));
            }
            contexts.current = Some(name);
            home.save_contexts(&contexts)?;
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
            contexts.contexts.insert(name.clone(), connection);
            contexts.current.get_or_insert(name);
            home.save_contexts(&contexts)?;
        }
    }
    Ok(Exit::Ok)
}
