//! Test support for end-to-end tests and benchmarks: `tern agent`
//! processes laid out on one machine ([`tern_agent::layout`]), started
//! inside network namespaces or with fault-injection variables, killed,
//! terminated or restarted, and ended with their guests when a test ends.
//! Never a dependency of the shipped binary.

use std::path::Path;
pub use tern_agent::layout::{
    free_port, guest_pids, kill_guests, wait_ready, write, write_joined, HostPlan, LocalHost,
};

/// A `tern agent` process of a test, killed (with its guests, unless
/// released) when dropped.
pub struct AgentProcess {
    child: std::process::Child,
    host: LocalHost,
    /// Whether dropping it kills its guest processes too.
    owns_guests: bool,
    /// Its ready line (name, addresses, public key).
    pub ready_line: String,
}

impl AgentProcess {
    /// Runs `bin agent CONFIG` (inside network namespace `netns` if given)
    /// and waits up to 30 s for its ready line.
    pub fn start(bin: &Path, host: &LocalHost, netns: Option<&str>) -> std::io::Result<Self> {
        Self::start_with_env(bin, host, netns, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables (fault
    /// injection: its guest processes inherit them).
    pub fn start_with_env(
        bin: &Path,
        host: &LocalHost,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        let mut cmd = match netns {
            // Only the network namespace changes (`ip netns exec` would
            // also remount /sys, hiding the cgroup mounts runc needs).
            Some(ns) => {
                let mut c = std::process::Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let child = cmd
            .envs(env.iter().copied())
            .arg("agent")
            .arg(&host.config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        let mut proc = AgentProcess {
            child,
            host: host.clone(),
            owns_guests: true,
            ready_line: String::new(),
        };
        proc.ready_line = wait_ready(&mut proc.child, host)?;
        Ok(proc)
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A client of its API.
    pub fn client(&self) -> std::io::Result<tern_agent::AgentClient> {
        Ok(tern_agent::AgentClient::new(
            &self.host.api_url,
            &self.host.token()?,
        ))
    }

    /// Sends SIGTERM and waits for it to exit (a clean shutdown).
    pub fn terminate(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }

    /// Leaves its guest processes running when it is dropped (another
    /// agent process of the same host adopts them).
    pub fn release_guests(&mut self) {
        self.owns_guests = false;
    }

    /// Its host.
    pub fn host(&self) -> &LocalHost {
        &self.host
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    /// Ends the agent and its guests: a test leaves no process behind.
    fn drop(&mut self) {
        self.kill();
        if self.owns_guests {
            kill_guests(&self.host.data_dir);
        }
    }
}
