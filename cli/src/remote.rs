//! Reaching rct: which context, connecting, and the catalog (cached per context).

use std::sync::Arc;

use rct_bus::catalog::Served;
use rct_bus::provenance::Trust;
use rct_streams::Connection;
use rct_streams::replay::Filter;
use rct_streams::topology::{CATALOG_BUCKET, CATALOG_KEY};

use crate::exit::{Error, Result};
use crate::home::{DEFAULT_CONTEXT, Home};

/// The flags every verb takes.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Global {
    /// The context to use (see `rct context`); default: $RCT_CONTEXT, then the current one.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// NATS server URL, overriding the context's; repeat for several.
    #[arg(long = "server", global = true)]
    pub servers: Vec<String>,
}

/// A connection to rct's NATS.
#[derive(Clone, Debug)]
pub struct Remote {
    /// The context's name.
    pub context: String,
    /// The client.
    pub client: async_nats::Client,
    /// JetStream (with the context's domain).
    pub js: async_nats::jetstream::Context,
    /// Whether the connection is up now (it changes as NATS goes away and comes back).
    pub connected: tokio::sync::watch::Receiver<bool>,
    /// Whether this is the context's own server (not `--server`): only then is the catalog
    /// cached under the context, or its cache used.
    pub cached: bool,
    /// Where the context's pinned admission keys are, if it pins any.
    pinned: Option<std::path::PathBuf>,
    /// What who wrote each event is checked against, read when first needed (see
    /// [`Remote::trust`]).
    trust: Arc<tokio::sync::OnceCell<Arc<Trust>>>,
}

/// Where a context pins admission's public keys (`rct context set --admission-key`).
pub fn pinned_keys(home: &Home, context: &str) -> std::path::PathBuf {
    home.context_dir(context).join("admission-keys.pem")
}

/// The admission keys events are checked against: those the context pins, else those
/// admission publishes beside the catalog (as trustworthy as that bucket's permissions:
/// only admission may write it). With neither, no key: every event reads UNVERIFIED, and
/// rct says why once.
async fn trust(
    pinned: Option<&std::path::Path>,
    js: &async_nats::jetstream::Context,
    own_servers: bool,
) -> Arc<Trust> {
    if let Some(pinned) = pinned.filter(|p| p.exists()) {
        let keys = std::fs::read_to_string(pinned)
            .map_err(|e| e.to_string())
            .and_then(|text| rct_bus::PublicKey::all_from_pem(&text).map_err(|e| e.to_string()));
        let keys = keys.unwrap_or_else(|e| {
            // Nothing verifies then: every event shows UNVERIFIED, and this says why.
            eprintln!(
                "rct: the admission keys pinned in {} do not read ({e}): no event verifies",
                pinned.display()
            );
            Vec::new()
        });
        let signed_from = pinned_signed_from(pinned, js, own_servers).await;
        return Arc::new(Trust::new(rct_bus::Verifier::new(keys)).signed_from(signed_from));
    }
    let trust = match rct_streams::topology::admission_trust(js).await {
        Ok(Some(trust)) => trust,
        Ok(None) => {
            eprintln!(
                "rct: admission publishes no public keys here ({CATALOG_BUCKET}/{}): no event \
                 can be verified (is admission running? or pin them: rct context set \
                 --admission-key)",
                rct_streams::topology::ADMISSION_KEYS_KEY
            );
            Trust::new(rct_bus::Verifier::default())
        }
        Err(e) => {
            eprintln!("rct: cannot read admission's public keys ({e}): no event can be verified");
            Trust::new(rct_bus::Verifier::default())
        }
    };
    Arc::new(trust)
}

/// Where signed events begin, for a context that pins admission's keys: the mark admission
/// published when this context first read it, kept beside the pinned keys (trusted on first
/// use, like the keys), so a mark changed later in the bucket does not turn unsigned events
/// into history here. A change is said. Only a mark read from the context's own servers is
/// kept (`--server` may name another deployment's).
async fn pinned_signed_from(
    pinned: &std::path::Path,
    js: &async_nats::jetstream::Context,
    own_servers: bool,
) -> Option<u64> {
    let kept_in = pinned.with_file_name("signed-from");
    let kept: Option<u64> = std::fs::read_to_string(&kept_in)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let published = rct_streams::topology::signed_from(js).await.ok().flatten();
    match (kept, published) {
        (Some(kept), Some(published)) if kept != published => {
            eprintln!(
                "rct: admission's mark of where signed events begin is now {published}, not \
                 {kept} as when this context first read it: keeping {kept} (remove {} to take \
                 the new one)",
                kept_in.display()
            );
            Some(kept)
        }
        (Some(kept), _) => Some(kept),
        (None, Some(published)) if own_servers => {
            if let Err(e) = crate::home::write_private(&kept_in, published.to_string().as_bytes()) {
                tracing::debug!(error = %e.message, "cannot keep where signed events begin");
            }
            Some(published)
        }
        (None, published) => published,
    }
}

/// The context's name and connection settings.
pub fn resolve(home: &Home, global: &Global) -> Result<(String, Connection)> {
    let contexts = home.contexts()?;
    let name = global
        .context
        .clone()
        .or_else(|| std::env::var(rct_streams::runtime::ENV_CONTEXT).ok())
        .or(contexts.current.clone())
        .unwrap_or_else(|| DEFAULT_CONTEXT.to_owned());
    let mut connection = match contexts.contexts.get(&name) {
        Some(c) => c.clone(),
        None if name == DEFAULT_CONTEXT => Connection::default(),
        None => {
            return Err(Error::usage(format!(
                "there is no context {name}; rct context list shows the known ones"
            )));
        }
    };
    if !global.servers.is_empty() {
        connection.servers = global.servers.clone();
    }
    connection
        .inbox_prefix
        .get_or_insert_with(|| "_INBOX_rct".to_owned());
    Ok((name, connection))
}

/// Connects, failing at once with a way forward when nothing answers.
pub async fn connect(home: &Home, global: &Global) -> Result<Remote> {
    let (context, connection) = resolve(home, global)?;
    let (up, connected) = tokio::sync::watch::channel(true);
    let observe = move |event: &async_nats::Event| match event {
        async_nats::Event::Disconnected => {
            up.send_replace(false);
        }
        async_nats::Event::Connected => {
            up.send_replace(true);
        }
        _ => {}
    };
    let client = connection.connect_observed("rct", false, observe).await.map_err(|e| {
        Error::usage(format!(
            "{e} (context {context}); is `rct dev` running, or is the context right? (rct context list)"
        ))
    })?;
    let js = connection.jetstream(client.clone());
    let cached = global.servers.is_empty();
    Ok(Remote {
        // Pinned keys hold whichever servers of the context are named: admission's keys are
        // the deployment's, not a server's.
        pinned: Some(pinned_keys(home, &context)),
        context,
        client,
        js,
        connected,
        cached,
        trust: Arc::default(),
    })
}

impl Remote {
    /// What who wrote each event is checked against: the admission keys the context pins,
    /// else those admission publishes (read once, when first needed).
    pub async fn trust(&self) -> Arc<Trust> {
        self.trust
            .get_or_init(|| trust(self.pinned.as_deref(), &self.js, self.cached))
            .await
            .clone()
    }

    /// `filter`, checking who wrote each event (see [`Remote::trust`]).
    pub async fn checked(&self, filter: Filter) -> Filter {
        filter.trusting(Some(self.trust().await))
    }

    /// The catalog admission serves, or (when NATS cannot give it now) the one cached by the
    /// last command that read it, so parameters are still checked before submitting; a
    /// stale cache costs nothing, admission checks again.
    pub async fn catalog_or_cached(&self, home: &Home) -> Result<Served> {
        match self.catalog(home).await {
            Ok(served) => Ok(served),
            Err(e) if !self.cached => Err(e),
            Err(e) => match cached_catalog(home, &self.context) {
                Some(cached) => {
                    tracing::debug!(error = %e.message, "using the cached catalog");
                    Ok(cached)
                }
                None => Err(e),
            },
        }
    }

    /// The catalog admission serves; cached for offline `--help`.
    pub async fn catalog(&self, home: &Home) -> Result<Served> {
        let missing = || {
            Error::usage(
                "admission serves no catalog here (bucket rct_catalog is empty or missing); is admission running?",
            )
        };
        let bucket = self.js.get_key_value(CATALOG_BUCKET).await.map_err(|e| {
            Error::usage(format!(
                "cannot read the catalog (bucket {CATALOG_BUCKET}): {e}; is it provisioned, \
                 and is NATS healthy?"
            ))
        })?;
        let bytes = bucket
            .get(CATALOG_KEY)
            .await
            .map_err(|e| Error::usage(format!("cannot read the catalog: {e}")))?
            .ok_or_else(missing)?;
        let served: Served = serde_json::from_slice(&bytes)
            .map_err(|e| Error::usage(format!("the served catalog is not readable: {e}")))?;
        if self.cached {
            let cache = home.context_dir(&self.context).join("catalog.json");
            let _ = crate::home::write_private(&cache, &bytes);
        }
        Ok(served)
    }
}

/// The catalog cached for `context` by the last command that read it.
pub fn cached_catalog(home: &Home, context: &str) -> Option<Served> {
    let bytes = std::fs::read(home.context_dir(context).join("catalog.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}
