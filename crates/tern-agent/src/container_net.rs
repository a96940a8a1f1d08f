//! A container's own address, which moves with it.
//!
//! Each container with an address gets a network namespace of its own
//! (runc joins it; CRIU treats it as external, so a checkpoint never
//! carries it) and a veth pair to the agent's namespace:
//!
//! ```text
//!  container netns           agent's netns                 neighbours
//!  eth0 ADDR/32  ── veth ──  tcXXXX 169.254.1.1/32         (on the uplink)
//!  default via 169.254.1.1   route ADDR/32 dev tcXXXX
//!                            proxy ARP on the uplink  ──►  "ADDR is at this host"
//! ```
//!
//! The host answers ARP for the container's address on its uplink and
//! forwards to it, so neighbours reach the container wherever it runs. When
//! a container arrives, its new host announces the address with gratuitous
//! ARP (`arping -U`), and neighbours send to the new host from the next
//! packet on; a TCP connection that CRIU carried (`--tcp-established`) goes
//! on over the same socket.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// The host end's address inside every container's link (link-local: it
/// never leaves the host).
const GATEWAY: &str = "169.254.1.1";

/// A container's namespace and link on this host.
#[derive(Clone, Debug)]
pub struct ContainerNet {
    ns: String,
    host_if: String,
    addr: Ipv4Addr,
    uplink: Option<String>,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all)
}

fn sysctl(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{path}: {e}"))
}

impl ContainerNet {
    /// The names of `vm`'s namespace and host link on `host` (short: a
    /// link name has at most 15 bytes; unique per host, so two agents on
    /// one machine never share one).
    fn names(host: &str, vm: &str) -> (String, String) {
        let h = blake3::hash(format!("{host}/{vm}").as_bytes()).to_hex();
        (format!("tern-ct-{}", &h[..12]), format!("tc{}", &h[..12]))
    }

    /// Makes the namespace, the link and the routes for a container of
    /// `vm` with address `addr` (one left from an earlier try is replaced).
    pub fn create(
        host: &str,
        vm: &str,
        addr: Ipv4Addr,
        uplink: Option<&str>,
    ) -> Result<Self, String> {
        let (ns, host_if) = Self::names(host, vm);
        let net = Self {
            ns,
            host_if,
            addr,
            uplink: uplink.map(str::to_string),
        };
        net.remove();
        net.build().inspect_err(|_| net.remove())?;
        Ok(net)
    }

    /// Its names, as [`ContainerNet::remove_named`] takes them (kept in the
    /// VM's directory, so a guest process that died can be cleaned up after).
    pub fn record(&self) -> String {
        format!("{} {}", self.ns, self.host_if)
    }

    /// Removes a namespace and link [`ContainerNet::record`] named.
    pub fn remove_named(record: &str) {
        let mut it = record.split_whitespace();
        if let (Some(ns), Some(hif)) = (it.next(), it.next()) {
            let _ = sh(&["ip", "netns", "del", ns]);
            let _ = sh(&["ip", "link", "del", hif]);
        }
    }

    fn build(&self) -> Result<(), String> {
        let (ns, hif) = (self.ns.as_str(), self.host_if.as_str());
        let addr = format!("{}/32", self.addr);
        sh(&["ip", "netns", "add", ns])?;
        sh(&[
            "ip", "link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        sh(&["ip", "addr", "add", &format!("{GATEWAY}/32"), "dev", hif])?;
        sh(&["ip", "link", "set", hif, "up"])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        in_ns(ns, &["ip", "addr", "add", &addr, "dev", "eth0"])?;
        in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(
            ns,
            &[
                "ip", "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
            ],
        )?;
        in_ns(
            ns,
            &[
                "ip", "route", "add", "default", "via", GATEWAY, "dev", "eth0",
            ],
        )?;
        Ok(())
    }

    /// Routes the address to the container here, and answers for it on the
    /// uplink. Only the host that runs the container does (a destination
    /// that holds a checkpoint not yet committed must not draw its
    /// traffic: nothing there would answer but a reset).
    pub fn route(&self) -> Result<(), String> {
        let addr = format!("{}/32", self.addr);
        sh(&["ip", "route", "replace", &addr, "dev", &self.host_if])?;
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        if let Some(up) = &self.uplink {
            sysctl(&format!("/proc/sys/net/ipv4/conf/{up}/proxy_arp"), "1")?;
        }
        Ok(())
    }

    /// The namespace runc joins.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.ns))
    }

    /// Tells the uplink's neighbours that the address is here now
    /// (gratuitous ARP). Best effort: without `arping`, neighbours find the
    /// new host when their entry for the address goes stale.
    pub fn announce(&self) {
        let Some(up) = &self.uplink else { return };
        // Three announcements a second apart, in the background (a lost
        // one is covered by the next); the first goes out at once.
        let child = Command::new("arping")
            .args(["-U", "-c", "3", "-I", up])
            .arg(self.addr.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(mut c) => {
                std::thread::spawn(move || c.wait());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot announce the container's address (install arping)")
            }
        }
    }

    /// Clears the namespace's filter rules: what CRIU added to lock the
    /// container's connections for a dump that did not end in a restore
    /// (tern adds no rules of its own there). Best effort.
    pub fn unlock_filters(&self) {
        for tool in ["iptables", "ip6tables"] {
            for chain in ["INPUT", "OUTPUT"] {
                if let Err(e) = in_ns(&self.ns, &[tool, "-F", chain]) {
                    tracing::warn!(error = %e, "clearing the container's locked connections");
                }
            }
        }
    }

    /// Removes the namespace (and with it the link and its route).
    pub fn remove(&self) {
        let _ = sh(&["ip", "netns", "del", &self.ns]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_differ_per_host() {
        let (ns_a, if_a) = ContainerNet::names("host-a", "vm-1");
        let (ns_b, if_b) = ContainerNet::names("host-b", "vm-1");
        assert!(if_a.len() <= 15 && if_b.len() <= 15);
        assert_ne!(ns_a, ns_b);
        assert_ne!(if_a, if_b);
    }
}
