//! The jail's filesystem: a mount namespace of its own whose root is the
//! plan's directory, holding only the plan's binds and device nodes.

use crate::{errno, os, JailError, Plan};
use rustix::fs::{FileType, Mode, CWD};
use rustix::mount::{
    mount_bind, mount_bind_recursive, mount_change, mount_remount, unmount, MountFlags,
    MountPropagationFlags, UnmountFlags,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Where the old root is parked during `pivot_root`.
const OLD_ROOT: &str = ".old-root";

/// Gives every file under `dir` (not following links) to `uid:gid`, so the
/// jailed process may write its own directory.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .map_err(os(format!("chown {}", dir.display())))?;
    for e in std::fs::read_dir(dir).map_err(os(format!("read {}", dir.display())))? {
        let e = e.map_err(os(format!("read {}", dir.display())))?;
        let t = e.file_type().map_err(os("file type"))?;
        if t.is_dir() {
            chown_tree(&e.path(), uid, gid)?;
        } else {
            std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))
                .map_err(os(format!("chown {}", e.path().display())))?;
        }
    }
    Ok(())
}

/// Makes `root/inside` and every directory between, each 0755 (the
/// process's umask would make them its owner's alone, and the jailed uid
/// must be able to pass through them).
fn make_dirs(root: &Path, inside: &Path) -> Result<std::path::PathBuf, JailError> {
    let mut at = root.to_path_buf();
    for part in inside.components() {
        at.push(part);
        match std::fs::create_dir(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(os(format!("mkdir {}", at.display()))(e)),
        }
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))
            .map_err(os(format!("chmod {}", at.display())))?;
    }
    Ok(at)
}

/// Makes (or remakes) the device node `host` at `dev/<name>` in the jail,
/// owned by the jail's uid and private to it.
fn make_device(root: &Path, host: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let meta = std::fs::metadata(host).map_err(os(format!("stat {}", host.display())))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_char_device() {
        return Err(JailError::Plan(format!(
            "{} is not a character device",
            host.display()
        )));
    }
    let name = host
        .file_name()
        .ok_or_else(|| JailError::Plan(format!("{} has no name", host.display())))?;
    let dev = make_dirs(root, Path::new("dev"))?;
    let node = dev.join(name);
    let _ = std::fs::remove_file(&node);
    rustix::fs::mknodat(
        CWD,
        &node,
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        meta.rdev(),
    )
    .map_err(errno(format!("mknod {}", node.display())))?;
    std::os::unix::fs::lchown(&node, Some(uid), Some(gid))
        .map_err(os(format!("chown {}", node.display())))
}

/// Builds the jail's room under `plan.root` and makes it this process's `/`.
pub fn pivot(plan: &Plan) -> Result<(), JailError> {
    let root = &plan.root;
    std::fs::create_dir_all(root).map_err(os(format!("mkdir {}", root.display())))?;
    // The room is root's; the jailed uid may look, not write.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(os("chmod jail root"))?;
    for d in &plan.devices {
        make_device(root, d, plan.uid, plan.gid)?;
    }
    // `unshare` is deprecated for `unshare_unsafe` because of
    // `UnshareFlags::FILES` (threads could see each other's descriptors go);
    // new mount and network namespaces touch no descriptor table, and this
    // crate stays free of `unsafe` (only the VMM has it).
    let mut flags = rustix::thread::UnshareFlags::NEWNS;
    if plan.own_network {
        flags |= rustix::thread::UnshareFlags::NEWNET;
    }
    #[allow(deprecated)]
    rustix::thread::unshare(flags).map_err(errno("unshare the mount (and network) namespace"))?;
    // Nothing mounted from here on reaches the host's namespace.
    mount_change(
        "/",
        MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
    )
    .map_err(errno("make / a slave mount"))?;
    // pivot_root wants the new root to be a mount point.
    mount_bind(root, root).map_err(errno(format!("bind {}", root.display())))?;
    for b in &plan.binds {
        if b.inside.is_absolute() || b.inside.components().any(|c| c.as_os_str() == "..") {
            return Err(JailError::Plan(format!(
                "bind target {} leaves the jail",
                b.inside.display()
            )));
        }
        let at = make_dirs(root, &b.inside)?;
        if b.writable {
            chown_tree(&b.host, plan.uid, plan.gid)?;
        }
        mount_bind_recursive(&b.host, &at).map_err(errno(format!(
            "bind {} at {}",
            b.host.display(),
            at.display()
        )))?;
        let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
        if !b.writable {
            flags |= MountFlags::RDONLY;
        }
        mount_remount(&at, flags, "").map_err(errno(format!("remount {}", at.display())))?;
    }
    let old = root.join(OLD_ROOT);
    std::fs::create_dir_all(&old).map_err(os("mkdir old root"))?;
    rustix::process::pivot_root(root, &old).map_err(errno("pivot_root"))?;
    std::env::set_current_dir("/").map_err(os("chdir /"))?;
    let old = Path::new("/").join(OLD_ROOT);
    unmount(&old, UnmountFlags::DETACH).map_err(errno("unmount the old root"))?;
    std::fs::remove_dir(&old).map_err(os("remove the old root"))?;
    // The room itself is read-only; only the writable binds take writes.
    mount_remount(
        "/",
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID,
        "",
    )
    .map_err(errno("remount / read-only"))?;
    Ok(())
}
