//! `rct-admission`'s flags. (Here rather than in the binary, so deployment files can be
//! checked against them.)

use std::path::PathBuf;

/// rct admission service.
#[derive(Debug, clap::Parser)]
#[command(name = "rct-admission", version, about)]
pub struct Args {
    /// Configuration file (YAML or TOML).
    #[arg(long, env = "RCT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The operation catalog (overrides the file).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Admission's signing key, PKCS#8 PEM (overrides the file).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// NATS server URL; repeat for several (overrides the file).
    #[arg(long = "server")]
    pub servers: Vec<String>,
    /// This replica's name.
    #[arg(long)]
    pub instance: Option<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Print the public key of the signing key (PEM: what agents trust) and exit; with
    /// generate_key, the key is made first when missing.
    #[arg(long)]
    pub print_public_key: bool,
    /// Create or converge the streams, buckets and consumers (every tower's, from the
    /// catalog), print what changed, and exit. Needs an administrator's NATS identity.
    #[arg(long)]
    pub provision: bool,
}
