//! `rct`: see the `rct_cli` library for the verbs.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // On the heap: one future holds whichever verb runs.
    Box::pin(rct_cli::main()).await
}
