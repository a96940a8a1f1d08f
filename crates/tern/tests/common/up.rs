//! `tern up` as a process: start on a free port, stop with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `tern up`, killed when dropped.
pub struct Up {
    pub child: Child,
    pub base: String,
}

impl Up {
    /// Starts `tern up` with `driver` on a free port, `env` added.
    pub fn start(data: &Path, driver: &str, env: &[(&str, &str)]) -> Up {
        Self::start_with(data, driver, env, Stdio::inherit())
    }

    /// [`Up::start`] listening on `ip` (a free port).
    pub fn start_on(data: &Path, driver: &str, env: &[(&str, &str)], ip: std::net::IpAddr) -> Up {
        let listen = format!("{ip}:0");
        let mut env = env.to_vec();
        env.push(("TERN_LISTEN", &listen));
        Self::start_with(data, driver, &env, Stdio::inherit())
    }

    /// [`Up::start`] with its log (stderr) going to `log`.
    pub fn start_logged(data: &Path, driver: &str, env: &[(&str, &str)], log: &Path) -> Up {
        let f = std::fs::File::create(log).expect("log file");
        Self::start_with(data, driver, env, Stdio::from(f))
    }

    fn start_with(data: &Path, driver: &str, env: &[(&str, &str)], stderr: Stdio) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["up", "--driver", driver])
            .env("TERN_LISTEN", "127.0.0.1:0")
            .env("TERN_DATA", data)
            .env("TERN_POOL_SIZE", "2")
            .env("TERN_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tern up");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("tern: API listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Up { child, base }
    }

    /// SIGTERM, and the exit must be clean.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tern up exited with {status}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token from `tern token` for `tenant`.
pub fn token(data: &Path, tenant: &str) -> String {
    token_with(data, tenant, "vms:read,vms:write")
}

/// A token from `tern token` for `tenant` with `permissions`.
pub fn token_with(data: &Path, tenant: &str, permissions: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["token", "--tenant", tenant, "--permissions", permissions])
        .env("TERN_DATA", data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
