//! Builds the clock shift `rct chaos` injects into agents (`clock-shift/lib.rs`) as a shared
//! library, with the compiler building rct, for `rct` to embed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "clock-shift/lib.rs";
    println!("cargo::rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let library = out.join("librct_clock_shift.so");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let native_glibc = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("TARGET") == var("HOST");
    if !native_glibc {
        // Chaos runs on Linux only (it reads /proc), and the shift is built natively against
        // glibc only; elsewhere an empty file stands in, and the agent clock skew fault says
        // it did not bite.
        std::fs::write(&library, b"").expect("write a placeholder");
        return;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition=2024",
            "--crate-type=cdylib",
            "--crate-name=rct_clock_shift",
            "-Copt-level=2",
            "-Cstrip=symbols",
            "--target",
        ])
        .arg(std::env::var("TARGET").expect("cargo sets TARGET"))
        .arg("-o")
        .arg(&library)
        .arg(source)
        .status()
        .expect("run rustc for the clock shift");
    assert!(status.success(), "the clock shift did not build");
}
