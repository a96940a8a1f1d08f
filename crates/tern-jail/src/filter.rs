//! Default-deny seccomp filters, one per thread kind.
//!
//! - [`install_process`]: every thread of a jailed guest process (its
//!   control server, migration and device threads) may make the system
//!   calls below and no other; any other kills the process. `clone` may
//!   start threads only (`CLONE_THREAD`), never processes, and `clone3`
//!   (whose flags a filter cannot read) answers `ENOSYS`, so the C library
//!   falls back to `clone`.
//! - [`install_vcpu`]: vCPU threads add a narrower filter: no files, no
//!   sockets; they run `KVM_RUN`, wait and log.
//!
//! The lists were taken from what guest processes call while booting,
//! migrating (pre-copy, post-copy, hybrid) and being stopped (`strace -f` of
//! the agents tests), widened by the calls their error paths and the C
//! library make.

use crate::JailError;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// Calls any thread of a guest process may make, without conditions.
const PROCESS: &[i64] = &[
    // Files (only those its jail shows).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_umask,
    // Devices: KVM, userfaultfd, sockets.
    libc::SYS_ioctl,
    libc::SYS_userfaultfd,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_brk,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_pidfd_open,
    libc::SYS_process_madvise,
    // Threads, time and signals.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getcpu,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_prctl,
    // More filters (vCPU threads add theirs): they can only narrow.
    libc::SYS_seccomp,
    libc::SYS_getrandom,
    // Event loops.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    // Sockets: its control socket, migration streams handed in, peers it dials.
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
];

/// Calls a vCPU thread may make (on top of [`PROCESS`], which also applies).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_futex,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_getrandom,
    libc::SYS_close,
    libc::SYS_munlock,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| JailError::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conds).map_err(|e| JailError::Seccomp(e.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, JailError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .and_then(|f| f.try_into())
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
}

/// The process-wide filter for the process `pid`.
pub fn process_filter(pid: u32) -> Result<BpfProgram, JailError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        PROCESS.iter().map(|&n| (n, Vec::new())).collect();
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Signals to its own threads only (vCPU kicks).
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, u64::from(pid))?])?],
    );
    // Its own limits may be read, never raised.
    rules.insert(
        libc::SYS_prlimit64,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, 0)?,
            cond(2, SeccompCmpOp::Eq, 0)?,
        ])?],
    );
    // Unix, IPv4 and IPv6 sockets; nothing raw, no netlink.
    rules.insert(
        libc::SYS_socket,
        [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
            .iter()
            .map(|&d| rule(vec![cond(0, SeccompCmpOp::Eq, d as u64)?]))
            .collect::<Result<_, _>>()?,
    );
    compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// The filter that makes `clone3` answer `ENOSYS` (stacked on the process
/// filter: of two filters' answers the stricter wins).
fn clone3_filter() -> Result<BpfProgram, JailError> {
    let rules = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// The filter vCPU threads add on top of the process's.
pub fn vcpu_filter() -> Result<BpfProgram, JailError> {
    let rules = VCPU.iter().map(|&n| (n, Vec::new())).collect();
    compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)
}

fn apply_all(p: &BpfProgram) -> Result<(), JailError> {
    seccompiler::apply_filter_all_threads(p).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// Installs the process filter on every thread of this process (and so on
/// every thread it starts later). Needs `no_new_privs` (or root).
pub fn install_process() -> Result<(), JailError> {
    apply_all(&clone3_filter()?)?;
    apply_all(&process_filter(std::process::id())?)
}

/// Installs the vCPU filter on the calling thread.
pub fn install_vcpu() -> Result<(), String> {
    let p = vcpu_filter().map_err(|e| e.to_string())?;
    seccompiler::apply_filter(&p).map_err(|e| e.to_string())
}

/// Makes a system call no filter allows (`chroot`): the test hook that
/// shows a jailed process dies by it. Outside a filter it fails (EPERM) or
/// does nothing (`/` is already the root).
pub fn forbidden_call() -> std::io::Result<()> {
    rustix::process::chroot("/").map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    const CHILD: &str = "TERN_JAIL_FILTER_CHILD";

    #[test]
    fn the_filters_compile() {
        assert!(!process_filter(1).unwrap().is_empty());
        assert!(!vcpu_filter().unwrap().is_empty());
        assert!(!clone3_filter().unwrap().is_empty());
    }

    /// Runs in a child process (this test binary, again): installs the
    /// process filter, shows threads still start and files still open,
    /// then makes a forbidden call.
    #[test]
    fn filtered_child() {
        let Ok(step) = std::env::var(CHILD) else {
            return;
        };
        rustix::thread::set_no_new_privs(true).unwrap();
        install_process().unwrap();
        // Threads start (clone3 answers ENOSYS, clone with CLONE_THREAD).
        std::thread::spawn(|| std::fs::read("/proc/self/status").unwrap())
            .join()
            .unwrap();
        if step == "forbidden" {
            let _ = forbidden_call();
        }
        println!("survived");
    }

    fn run_child(step: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "filter::tests::filtered_child", "--nocapture"])
            .env(CHILD, step)
            .output()
            .unwrap()
    }

    #[test]
    fn a_filtered_process_runs_threads_and_dies_on_a_forbidden_call() {
        let ok = run_child("threads");
        let out = String::from_utf8_lossy(&ok.stdout);
        assert!(ok.status.success() && out.contains("survived"), "{ok:?}");
        let killed = run_child("forbidden");
        assert_eq!(killed.status.signal(), Some(libc::SIGSYS), "{killed:?}");
        assert!(!String::from_utf8_lossy(&killed.stdout).contains("survived"));
    }
}
