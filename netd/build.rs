//! Compiles the eBPF programs in `bpf/*.c` with clang (`-target bpf -O2 -g`) into
//! `$OUT_DIR`, where `src/dataplane` embeds them. A missing clang is a clear build
//! error naming the packages to install (scripts/setup.sh installs them).

use std::path::PathBuf;
use std::process::Command;

/// Objects built from `bpf/<name>.c`; `bad` exists only to test verifier errors.
const PROGRAMS: &[&str] = &["slot", "bad"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = std::env::var("GROVE_BPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=GROVE_BPF_CLANG");
    println!("cargo:rerun-if-changed=bpf/slot.h");
    // Debian puts <asm/types.h> (needed by <linux/bpf.h>) under the multiarch dir.
    let multiarch = "/usr/include/x86_64-linux-gnu";
    for name in PROGRAMS {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let result = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .output();
        match result {
            Err(e) => panic!(
                "grove-netd: cannot run `{clang}` to compile the eBPF programs ({e}). \
                 Install clang and libbpf-dev (apt-get install clang libbpf-dev, or run \
                 scripts/setup.sh), or point GROVE_BPF_CLANG at a clang with the BPF target."
            ),
            Ok(o) if !o.status.success() => panic!(
                "grove-netd: `{clang} -target bpf` failed on {src} (is libbpf-dev installed, \
                 for <bpf/bpf_helpers.h>?):\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Ok(_) => {}
        }
    }
}
