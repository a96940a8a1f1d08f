//! `tern-vmm`: the monitor process the kvm driver runs, one per VM.
//! Events go to stdout as JSON lines, diagnostics to stderr.

use clap::Parser;

fn main() {
    // Snapshots hold guest memory and the console the guest's output: the
    // monitor's files are its owner's alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = tern_vmm::monitor::MonitorArgs::parse();
    if let Err(e) = tern_vmm::monitor::run(args) {
        eprintln!("tern-vmm: {e}");
        std::process::exit(1);
    }
}
