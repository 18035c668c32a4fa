//! Compiles the XDP steering program (`bpf/steer.c`) with `clang -target bpf` into
//! `$OUT_DIR/steer.o`, which the AF_XDP driver embeds and loads through libbpf. Only with
//! the `afxdp` feature; `CLANG` overrides the compiler.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/steer.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    if env::var_os("CARGO_FEATURE_AFXDP").is_none() {
        return;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("steer.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            "bpf",
            "-c",
            "bpf/steer.c",
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile bpf/steer.c ({s})"),
        Err(e) => panic!(
            "cannot run {clang} to compile the XDP steering program ({e}); install clang \
             (scripts/setup.sh does) or build without the `afxdp` feature"
        ),
    }
}
