//! `rct`: see the `rct_cli` library for the verbs.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    rct_cli::main().await
}
