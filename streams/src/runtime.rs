//! What every rct binary does the same way: layered configuration, logging from `RCT_LOG` /
//! `RCT_LOG_FORMAT` (and span export when OpenTelemetry is configured), a shutdown token fired
//! by SIGINT or SIGTERM, and the exit status.

use std::path::Path;

use tokio_util::sync::CancellationToken;

/// The configuration file of a service binary (`--config`).
pub const ENV_CONFIG: &str = "RCT_CONFIG";
/// The log filter ([`init_logging`]).
pub const ENV_LOG: &str = "RCT_LOG";
/// The log format, `json` or `text` ([`init_logging`]).
pub const ENV_LOG_FORMAT: &str = "RCT_LOG_FORMAT";
/// The CLI's state folder (`rct`'s contexts, sessions and keys).
pub const ENV_HOME: &str = "RCT_HOME";
/// The CLI's context, over the current one.
pub const ENV_CONTEXT: &str = "RCT_CONTEXT";
/// How long the CLI waits for admission's decision before saying so.
pub const ENV_DECISION_WAIT: &str = "RCT_DECISION_WAIT";
/// How long a request may wait for admission before it expires (`rct`; default 60s).
pub const ENV_REQUEST_TTL: &str = "RCT_REQUEST_TTL";

/// Environment variables that start with `RCT_` but are not settings of a service: its own
/// command-line and logging variables, and the CLI's (an operator's shell that starts
/// `rct-admission` or `rct-agent` has them set).
pub const NOT_SETTINGS: [&str; 7] = [
    ENV_CONFIG,
    ENV_LOG,
    ENV_LOG_FORMAT,
    ENV_HOME,
    ENV_CONTEXT,
    ENV_DECISION_WAIT,
    ENV_REQUEST_TTL,
];

/// Layers a component's settings: its defaults < `file` (YAML or TOML by extension) < `env`
/// (`RCT_` variables, `__` for nesting, the `lists` keys comma-separated). `env` is passed
/// in, so tests never touch the process environment. Unknown keys are refused by name.
pub fn load_config<T: serde::de::DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    lists: &[&str],
) -> Result<T, String> {
    let env: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("RCT_") && !NOT_SETTINGS.contains(&k.as_str()))
        .collect();
    let mut environment = config::Environment::with_prefix("RCT")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .try_parsing(true)
        .source(Some(env));
    for key in lists {
        environment = environment.with_list_parse_key(key);
    }
    let mut builder = config::Config::builder();
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).required(true));
    }
    builder
        .add_source(environment)
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}

/// The exit status of a binary named `name`: 0, or 2 after printing the error chain.
pub fn exit<E: std::fmt::Display>(name: &str, result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Logs to stderr; `RCT_LOG` filters (default `info`), `RCT_LOG_FORMAT=json` for JSON lines.
/// With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans
/// are also exported over OTLP/HTTP as service `service` (see
/// [`crate::telemetry::continue_trace`]). Keep the guard until the end of `main`: dropping it
/// flushes the spans not yet sent.
pub fn init_logging(service: &str) -> Logging {
    init_logging_at(service, "info")
}

/// [`init_logging`], with `default` as the filter when `RCT_LOG` is not set.
pub fn init_logging_at(service: &str, default: &str) -> Logging {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_env(ENV_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colours(&std::io::stderr()));
    let fmt = if std::env::var(ENV_LOG_FORMAT).as_deref() == Ok("json") {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let (otlp, provider) = match crate::telemetry::otlp(service) {
        Ok(Some((layer, provider))) => (Some(layer), Some(provider)),
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("{service}: not exporting traces: {e}");
            (None, None)
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otlp)
        .init();
    Logging { provider }
}

/// Whether to write escape codes (colour, bold) to `stream`: only to a terminal, and not when
/// `NO_COLOR` is set (no-color.org).
pub fn colours(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Keeps span export going; flushes it when dropped.
#[derive(Debug)]
pub struct Logging {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Logging {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("cannot flush the last spans: {e}");
        }
    }
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let fired = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        fired.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[serde(default)]
        concurrency: usize,
    }

    #[test]
    fn the_cli_variables_in_the_environment_are_not_settings() {
        let env = [
            ("RCT_HOME", "/home/alice/.config/rct"),
            ("RCT_CONTEXT", "prod"),
            ("RCT_DECISION_WAIT", "30s"),
            ("RCT_LOG", "debug"),
            ("RCT_CONCURRENCY", "8"),
            ("HOME", "/home/alice"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let settings: Settings = load_config(None, env, &[]).unwrap();
        assert_eq!(settings.concurrency, 8);
        // Any other RCT_ variable is still a setting, and an unknown one is refused by name.
        let error = load_config::<Settings>(None, [("RCT_CONCURENCY".into(), "8".into())], &[])
            .unwrap_err();
        assert!(error.contains("concurency"), "{error}");
    }
}
