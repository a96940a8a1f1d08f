//! `tern-vmm`: the monitor process the kvm driver runs, one per VM.
//! Events go to stdout as JSON lines, diagnostics to stderr. With
//! `--jail-uid` it jails itself (see `tern_drivers::kvmjail`) before any
//! guest code runs.

use clap::Parser;

#[derive(Parser)]
#[command(name = "tern-vmm", about = "tern's KVM microVM monitor")]
struct Cli {
    #[command(flatten)]
    monitor: tern_vmm::monitor::MonitorArgs,
    #[command(flatten)]
    jail: tern_drivers::kvmjail::MonitorJail,
}

fn main() {
    if let Err(e) = tern_vmm::close_inherited_fds() {
        eprintln!("tern-vmm: closing inherited descriptors: {e}");
        std::process::exit(1);
    }
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
    let cli = Cli::parse();
    if let Err(e) = jail(&cli) {
        eprintln!("tern-vmm: {e}");
        std::process::exit(1);
    }
    if let Err(e) = tern_vmm::monitor::run(cli.monitor) {
        eprintln!("tern-vmm: {e}");
        std::process::exit(1);
    }
}

/// Enters the jail the flags describe, named after the VM's directory (the
/// control socket's).
fn jail(cli: &Cli) -> Result<(), String> {
    let name = cli
        .monitor
        .control
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "monitor".into());
    let m = &cli.monitor;
    let Some(plan) = cli.jail.plan(&name, m.memory, m.vcpus)? else {
        return Ok(());
    };
    if plan.seccomp {
        tern_vmm::set_vcpu_thread_hook(tern_jail::filter::install_vcpu);
    }
    tern_jail::enter(&plan).map_err(|e| e.to_string())
}
