//! Connecting to NATS the same way in every component: servers, credentials, TLS, JetStream
//! domain, an inbox prefix per identity (so permissions can scope inboxes), and every
//! connection event logged (a permission denial shows up only there).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};

/// How to reach NATS.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Connection {
    /// Server URLs; the client fails over between them.
    pub servers: Vec<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// A file holding this identity's nkey seed (`SU…`); the server knows its public key.
    pub nkey_file: Option<PathBuf>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`.
    pub password: Option<String>,
    /// CA certificate(s) to trust for TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS, with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS, with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// JetStream domain of the hub, for clients behind a leaf node.
    pub domain: Option<String>,
    /// Prefix of this client's reply inboxes (`_INBOX_<identity>`).
    pub inbox_prefix: Option<String>,
    /// How long JetStream API calls and publish acknowledgements may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Connection {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            credentials_file: None,
            nkey_file: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            domain: None,
            inbox_prefix: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {servers}: {reason}")]
pub struct Error {
    /// The servers tried.
    pub servers: String,
    /// Why.
    pub reason: String,
}

impl Connection {
    /// A connection to these servers with default settings.
    pub fn to(servers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            servers: servers.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Connects as `name` (shown in the server's connection list). With `wait`, retries until
    /// a server answers; without, fails at once when none does.
    pub async fn connect(&self, name: &str, wait: bool) -> Result<async_nats::Client, Error> {
        self.connect_observed(name, wait, |_| {}).await
    }

    /// [`Connection::connect`], also telling `observe` of every connection event
    /// (disconnected, connected again, …) as it happens, besides logging it.
    pub async fn connect_observed(
        &self,
        name: &str,
        wait: bool,
        observe: impl Fn(&async_nats::Event) + Send + Sync + 'static,
    ) -> Result<async_nats::Client, Error> {
        let error = |reason: String| Error {
            servers: self.servers.join(","),
            reason,
        };
        let mut options = match &self.credentials_file {
            Some(file) => async_nats::ConnectOptions::with_credentials_file(file.clone())
                .await
                .map_err(|e| error(format!("cannot read {}: {e}", file.display())))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(file) = &self.nkey_file {
            let seed = std::fs::read_to_string(file)
                .map_err(|e| error(format!("cannot read {}: {e}", file.display())))?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        if wait {
            options = options.retry_on_initial_connect();
        }
        let addrs = self
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(format!("bad server address: {e}")))?;
        options
            .name(name)
            .event_callback(move |event| {
                observe(&event);
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        other => tracing::warn!(event = %other, "NATS connection event"),
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| error(e.to_string()))
    }

    /// A JetStream context on `client` with this connection's domain and timeout.
    pub fn jetstream(&self, client: async_nats::Client) -> jetstream::Context {
        let builder = jetstream::ContextBuilder::new().timeout(self.timeout);
        match &self.domain {
            Some(domain) => builder.domain(domain).build(client),
            None => builder.build(client),
        }
    }
}
