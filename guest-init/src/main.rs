//! guest-init: PID 1 inside a sandbox.

fn main() {
    eprintln!("guest-init: not built yet");
    std::process::exit(1);
}
