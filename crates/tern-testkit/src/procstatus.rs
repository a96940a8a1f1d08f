//! Reading a process's `/proc/PID/status`, as the jail tests check it.

/// The value of `key` in `/proc/<pid>/status` (tabs kept, ends trimmed).
pub fn field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Asserts that process `pid` runs jailed as `id` (uid and gid): no
/// capability in any set, `no_new_privs`, a seccomp filter.
pub fn assert_jailed(pid: u32, id: u32) {
    let ids = format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(field(pid, "Uid"), ids);
    assert_eq!(field(pid, "Gid"), ids);
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field(pid, "NoNewPrivs"), "1");
    assert_eq!(field(pid, "Seccomp"), "2");
}
