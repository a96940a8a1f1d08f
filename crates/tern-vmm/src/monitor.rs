//! The monitor process: hosts one machine, serves its control socket, and
//! reports its life on stdout as JSON lines (`started`, `ready`, `exited`).
//!
//! One process per VM keeps a crash contained and lets VMs outlive a restart
//! of the control plane. The `tern-vmm` binary is a thin wrapper over [`run`].

use crate::control::{self, ServerContext};
use crate::machine::{MachineConfig, WaitOutcome};
use crate::snapshot::{self, RestoreOptions};
use crate::{x86, TestGuestConfig, VmmError};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the monitor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// tern's freestanding test guest.
    Test,
    /// A Linux bzImage (needs hardware virtualization to boot usefully).
    Linux,
}

/// Command-line arguments of a monitor process.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "tern-vmm",
    about = "tern's microVM monitor: one VM per process"
)]
pub struct MonitorArgs {
    /// Control socket path.
    #[arg(long)]
    pub control: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Back guest RAM with huge pages.
    #[arg(long)]
    pub hugepages: bool,
    /// What to boot.
    #[arg(long, value_enum, default_value_t = GuestKind::Test)]
    pub guest: GuestKind,
    /// The test guest ELF (default: the one built with this monitor).
    #[arg(long)]
    pub guest_elf: Option<PathBuf>,
    /// Test guest: working-set pages.
    #[arg(long, default_value_t = 64)]
    pub ws_pages: u64,
    /// Test guest: pages dirtied per report.
    #[arg(long, default_value_t = 4)]
    pub pages_per_tick: u64,
    /// Test guest: reports between checksums.
    #[arg(long, default_value_t = 16)]
    pub ticks_per_sum: u64,
    /// Test guest: reset after this many reports (0: never).
    #[arg(long, default_value_t = 0)]
    pub exit_after: u64,
    /// Linux: the bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Linux: the initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Linux: the command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1 quiet")]
    pub cmdline: String,
    /// The console line that means the guest is ready (default: the test
    /// guest's ready line, or "tern-ready" for Linux).
    #[arg(long)]
    pub ready_line: Option<String>,
    /// Restore from these snapshot directories (a full one, then
    /// incrementals) instead of booting.
    #[arg(long, num_args = 1..)]
    pub restore: Vec<PathBuf>,
    /// Skip the memory checksum when restoring.
    #[arg(long)]
    pub no_verify: bool,
    /// Append console output to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Do not start the vCPUs (a controller resumes them).
    #[arg(long)]
    pub paused: bool,
}

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    Started {
        pid: u32,
        control: &'a std::path::Path,
        restored: bool,
        /// From entering `run` to vCPUs started.
        monitor_start_us: u64,
    },
    Ready {
        since_start_ms: f64,
    },
    Exited {
        reason: &'a str,
    },
}

fn emit(e: &Event<'_>) {
    if let Ok(s) = serde_json::to_string(e) {
        println!("{s}");
    }
}

/// Runs a monitor until its guest exits or a controller stops it.
pub fn run(args: MonitorArgs) -> Result<(), VmmError> {
    let t0 = Instant::now();
    let cfg = MachineConfig {
        memory_mib: args.memory,
        vcpus: args.vcpus,
        hugepages: args.hugepages,
        console_log: args.console_log.clone(),
        console_tee: None,
    };
    let ready_line = args.ready_line.clone().unwrap_or_else(|| match args.guest {
        GuestKind::Test => crate::TEST_GUEST_READY.to_string(),
        GuestKind::Linux => "tern-ready".to_string(),
    });
    let listener = control::bind(&args.control)?;
    let restored = !args.restore.is_empty();
    let machine = if restored {
        snapshot::restore(
            &args.restore,
            RestoreOptions {
                verify_memory: !args.no_verify,
                config: cfg,
            },
        )?
    } else {
        match args.guest {
            GuestKind::Test => {
                let guest = TestGuestConfig {
                    ws_pages: args.ws_pages,
                    pages_per_tick: args.pages_per_tick,
                    ticks_per_sum: args.ticks_per_sum,
                    exit_after: args.exit_after,
                };
                match &args.guest_elf {
                    Some(elf) => crate::boot_test_guest(cfg, &guest, elf)?,
                    None => crate::boot_builtin_test_guest(cfg, &guest)?,
                }
            }
            GuestKind::Linux => {
                let kernel = args
                    .kernel
                    .as_deref()
                    .ok_or_else(|| VmmError::Config("--guest linux needs --kernel PATH".into()))?;
                crate::boot_linux(
                    cfg,
                    &x86::LinuxBoot {
                        kernel,
                        initrd: args.initrd.as_deref(),
                        cmdline: &args.cmdline,
                    },
                )?
            }
        }
    };
    if !args.paused {
        machine.resume()?;
    }
    let watch = machine.watch();
    let ctx = Arc::new(ServerContext {
        machine: Arc::new(Mutex::new(machine)),
        ready_line: ready_line.clone(),
    });
    {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(listener, ctx))?;
    }
    emit(&Event::Started {
        pid: std::process::id(),
        control: &args.control,
        restored,
        monitor_start_us: t0.elapsed().as_micros() as u64,
    });
    let mut ready_seen = restored;
    let reason = loop {
        let out = watch.wait_until(Duration::from_secs(3600), |d| {
            !ready_seen && d.console().recent_contains(&ready_line)
        });
        match out {
            WaitOutcome::Satisfied => {
                ready_seen = true;
                emit(&Event::Ready {
                    since_start_ms: t0.elapsed().as_secs_f64() * 1e3,
                });
            }
            WaitOutcome::TimedOut => {}
            WaitOutcome::Exited(r) => break r,
        }
    };
    // Join the vCPU threads before exiting.
    ctx.machine
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stop(&reason);
    emit(&Event::Exited { reason: &reason });
    let _ = std::fs::remove_file(&args.control);
    Ok(())
}
