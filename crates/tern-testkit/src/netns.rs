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
}

impl Netns {
    fn sh(args: &[&str]) -> bool {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `n` namespaces named after `tag`, on subnet `10.{net}.0.0/24`, or
    /// `None` where namespaces cannot be made (not root, no iproute2).
    pub fn create(tag: &str, net: u8, n: usize) -> Option<Netns> {
        let pid = std::process::id() % 100000;
        let bridge = format!("tbr{net}{pid}");
        let mut ns = Netns {
            names: Vec::new(),
            ips: Vec::new(),
            bridge_ip: IpAddr::V4(std::net::Ipv4Addr::new(10, net, 0, 1)),
            bridge: bridge.clone(),
        };
        let cidr = format!("10.{net}.0.1/24");
        let ok = Self::sh(&["ip", "link", "add", &bridge, "type", "bridge"])
            && Self::sh(&["ip", "addr", "add", &cidr, "dev", &bridge])
            && Self::sh(&["ip", "link", "set", &bridge, "up"]);
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
            let host_end = format!("tv{net}{pid}{i}");
            let ip = format!("10.{net}.0.{}/24", i + 2);
            ns.names.push(name.clone());
            let ok = Self::sh(&["ip", "netns", "add", &name])
                && Self::sh(&[
                    "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                    "netns", &name,
                ])
                && Self::sh(&["ip", "link", "set", &host_end, "master", &bridge])
                && Self::sh(&["ip", "link", "set", &host_end, "up"])
                && Self::sh(&[
                    "ip", "netns", "exec", &name, "ip", "addr", "add", &ip, "dev", "eth0",
                ])
                && Self::sh(&[
                    "ip", "netns", "exec", &name, "ip", "link", "set", "eth0", "up",
                ])
                && Self::sh(&[
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
