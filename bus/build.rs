//! Compiles `proto/rct/v1/*.proto` with protox (pure Rust, no system `protoc`) and prost.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("rct/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let mut files: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rerun-if-changed={}", root.join("rct/v1").display());

    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new()
        // Deterministic iteration for display; signing never depends on it (bytes are signed).
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
