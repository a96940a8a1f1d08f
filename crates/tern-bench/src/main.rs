//! `tern-bench`: benchmarks that put tern beside other tools on this
//! machine. A development binary (it carries the link emulator), never
//! part of the shipped `tern`.

mod agentrun;
mod containerbench;
mod jailbench;
mod qemubench;

use clap::{Parser, Subcommand};
use qemubench::tern_binary;

#[derive(Parser)]
#[command(
    name = "tern-bench",
    about = "tern against other tools, measured on this machine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One Linux guest migrated by QEMU itself and by tern, alternately, on
    /// loopback and across an emulated WAN link; prints both and the ratios.
    MigrateQemu(qemubench::QemuBenchArgs),
    /// Test guests started and migrated by plain and jailed agents, in
    /// turns; prints medians and the jail's ratios.
    Jail(jailbench::JailBenchArgs),
    /// A container moved by tern between two agents against a plain CRIU
    /// dump + copy + restore of the same workload; prints both and the ratio.
    MigrateContainer(containerbench::ContainerBenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::MigrateQemu(a) => qemubench::run(a),
        Cmd::Jail(a) => jailbench::run(a),
        Cmd::MigrateContainer(a) => containerbench::run(a),
    }
}
