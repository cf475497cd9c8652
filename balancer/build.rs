//! Embeds the eBPF object that `cargo xtask build` compiled.
//!
//! `BALANCER_EBPF_OBJ` names the object. Without it (a plain `cargo build`, clippy, docs)
//! an empty placeholder is embedded, and the binary refuses to run the balancer rather
//! than load an empty program.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=BALANCER_EBPF_OBJ");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("balancer.bpf.o");
    match env::var_os("BALANCER_EBPF_OBJ") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            if let Err(e) = fs::copy(&path, &out) {
                panic!("BALANCER_EBPF_OBJ={}: {e}", path.display());
            }
        }
        None => fs::write(&out, []).expect("write the empty eBPF placeholder"),
    }
}
