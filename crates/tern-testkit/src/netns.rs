//! Network namespaces as test hosts: each on one bridge in the root
//! namespace, with its own address, removed when dropped. (`tc` here has no
//! netem: link conditions come from the crate's link emulator.)

use std::net::IpAddr;

/// Network namespaces on one bridge (the bridge holds `.1` in the root
/// namespace, namespace `i` holds `.{i+2}` of `10.{net}.0.0/24`); removed
/// on drop.
pub struct Netns {
    pub names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// The root namespace's address on the bridge.
    pub bridge_ip: IpAddr,
    bridge: String,
    /// The root namespace's ends of the veth pairs.
    host_ends: Vec<String>,
}

/// Tells apart the interfaces of successive `Netns` of one process: a
/// namespace the kernel is still tearing down (it does so after `ip netns
/// del` returns) keeps its veth pair, so a name reused at once would clash.
static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Netns {
    fn sh(args: &[&str]) -> bool {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `sh`, saying which command failed: a test that cannot make its
    /// hosts should tell why.
    fn must(args: &[&str]) -> bool {
        let ok = Self::sh(args);
        if !ok {
            eprintln!("netns: `{}` failed", args.join(" "));
        }
        ok
    }

    /// Quietly removes what may be there: a namespace a crashed run left
    /// (interface names are this call's own), or a veth end whose pair
    /// is gone already. Absence is no error.
    fn remove_quietly(args: &[&str]) {
        let _ = std::process::Command::new(args[0])
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// `n` namespaces named after `tag`, on subnet `10.{net}.0.0/24`, or
    /// `None` where namespaces cannot be made (not root, no iproute2).
    pub fn create(tag: &str, net: u8, n: usize) -> Option<Netns> {
        // Interface names stay within Linux's 15 characters.
        let pid = std::process::id() % 100000;
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let bridge = format!("tb{net}{pid}x{seq}");
        let mut ns = Netns {
            names: Vec::new(),
            ips: Vec::new(),
            bridge_ip: IpAddr::V4(std::net::Ipv4Addr::new(10, net, 0, 1)),
            bridge: bridge.clone(),
            host_ends: Vec::new(),
        };
        let cidr = format!("10.{net}.0.1/24");
        let ok = Self::must(&["ip", "link", "add", &bridge, "type", "bridge"])
            && Self::must(&["ip", "addr", "add", &cidr, "dev", &bridge])
            && Self::must(&["ip", "link", "set", &bridge, "up"]);
        if !ok {
            return None;
        }
        // Where bridged traffic goes through iptables (br_netfilter, as a
        // Docker Engine with its default settings leaves it, with FORWARD
        // dropping), let this bridge's own traffic through; undone on drop.
        Self::sh(&[
            "iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
        ]);
        for i in 0..n {
            let name = format!("tern-{tag}-{i}");
            let host_end = format!("tv{net}{pid}x{seq}{i}");
            let ip = format!("10.{net}.0.{}/24", i + 2);
            Self::remove_quietly(&["ip", "netns", "del", &name]);
            ns.names.push(name.clone());
            ns.host_ends.push(host_end.clone());
            let ok = Self::must(&["ip", "netns", "add", &name])
                && Self::must(&[
                    "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                    "netns", &name,
                ])
                && Self::must(&["ip", "link", "set", &host_end, "master", &bridge])
                && Self::must(&["ip", "link", "set", &host_end, "up"])
                && Self::must(&[
                    "ip", "netns", "exec", &name, "ip", "addr", "add", &ip, "dev", "eth0",
                ])
                && Self::must(&[
                    "ip", "netns", "exec", &name, "ip", "link", "set", "eth0", "up",
                ])
                && Self::must(&[
                    "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
                ]);
            if !ok {
                return None;
            }
            ns.ips
                .push(IpAddr::V4(std::net::Ipv4Addr::new(10, net, 0, i as u8 + 2)));
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a veth end removes the pair at once; the namespace's
        // own teardown happens later, in the kernel's time.
        for end in &self.host_ends {
            Self::remove_quietly(&["ip", "link", "del", end]);
        }
        for ns in &self.names {
            Self::sh(&["ip", "netns", "del", ns]);
        }
        Self::sh(&["ip", "link", "del", &self.bridge]);
        let b = self.bridge.as_str();
        Self::sh(&[
            "iptables", "-D", "FORWARD", "-i", b, "-o", b, "-j", "ACCEPT",
        ]);
    }
}
