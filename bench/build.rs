//! Compiles the bench tools' XDP programs (`bpf/pktgen.c`: the `pktgen rx` sink counter
//! and the `xdp_fwd` socket redirect) with `clang -target bpf` into `$OUT_DIR/pktgen.o`,
//! which `src/pktgen/bpf.rs` embeds and loads through libbpf. `CLANG` overrides the
//! compiler, as in dataplane/build.rs.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/pktgen.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("pktgen.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            "bpf",
            "-mcpu=v3",
            "-c",
            "bpf/pktgen.c",
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile bpf/pktgen.c ({s})"),
        Err(e) => panic!(
            "cannot run {clang} to compile the bench XDP programs ({e}); install clang \
             (scripts/setup.sh does)"
        ),
    }
}
