//! The operator's image catalogue: what a tenant may boot, by name.
//!
//! Monitors run as root and read the files they boot into the tenant's guest
//! RAM, so a tenant never names a host path: a VM's `spec.image` is a name,
//! and only this catalogue turns names into files. Every file an image names
//! lies under the catalogue's directory (checked when the catalogue is built
//! and again, after symlinks are resolved, each time a VM boots), so no
//! entry, however written, reaches outside it. An unknown name is refused the
//! same way whether or not some file of that name exists (no oracle).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// tern's own freestanding test guest, built into the monitor (no files).
pub const TEST_IMAGE: &str = "test";

/// One catalogue entry as the operator writes it: file names relative to the
/// catalogue's directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDef {
    /// The bzImage, relative to the image directory.
    pub kernel: String,
    /// The initramfs, relative to the image directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line (default: the monitor's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// What a VM boots, resolved to files this host owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootImage {
    /// tern's test guest.
    Test,
    /// A Linux kernel (with an optional initramfs).
    Linux {
        /// The bzImage, canonical and under the image directory.
        kernel: PathBuf,
        /// The initramfs, canonical and under the image directory.
        initrd: Option<PathBuf>,
        /// The kernel command line, if the image sets one.
        cmdline: Option<String>,
    },
}

/// Why a name or an entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The catalogue has no image of this name.
    #[error("unknown image `{name}` (this host offers: {offered})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names it could have been.
        offered: String,
    },
    /// A name is not a plain identifier.
    #[error("image name `{0}` must be 1-64 characters of a-z, 0-9, `.`, `_` or `-`, starting with a letter or digit")]
    BadName(String),
    /// An entry names a file outside the image directory, or no file.
    #[error("image `{image}`: {field} `{file}`: {reason}")]
    BadFile {
        /// The entry.
        image: String,
        /// `kernel` or `initrd`.
        field: &'static str,
        /// The file as written.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The image directory itself is unusable.
    #[error("image directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks an image name: a short identifier, never a path.
pub fn check_name(name: &str) -> Result<(), ImageError> {
    if tern_proto::is_image_name(name) {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// The catalogue: the image directory and the named images in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageCatalogue {
    dir: Option<PathBuf>,
    images: BTreeMap<String, ImageDef>,
}

impl ImageCatalogue {
    /// The catalogue with only the built-in `test` image.
    pub fn builtin() -> Self {
        Self::default()
    }

    /// Builds a catalogue, checking every entry now (so a bad configuration
    /// stops the daemon at start-up, naming the entry).
    pub fn new(dir: &Path, images: BTreeMap<String, ImageDef>) -> Result<Self, ImageError> {
        let dir = dir.canonicalize().map_err(|source| ImageError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let cat = Self {
            dir: Some(dir),
            images,
        };
        for name in cat.images.keys() {
            check_name(name)?;
            if name == TEST_IMAGE {
                return Err(ImageError::BadName(format!(
                    "{name} (reserved for tern's test guest)"
                )));
            }
            cat.resolve(name)?;
        }
        Ok(cat)
    }

    /// A catalogue of one image made of these files, with the directory that
    /// holds both as its image directory (for tests and benchmarks that are
    /// handed a kernel and an initramfs).
    pub fn single(
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: Option<&str>,
    ) -> Result<Self, ImageError> {
        let mut dir = kernel.parent().unwrap_or(Path::new("/")).to_path_buf();
        if let Some(i) = initrd {
            while !i.starts_with(&dir) && dir.pop() {}
        }
        let rel = |p: &Path| p.strip_prefix(&dir).unwrap_or(p).display().to_string();
        let def = ImageDef {
            kernel: rel(kernel),
            initrd: initrd.map(rel),
            cmdline: cmdline.map(Into::into),
        };
        Self::new(&dir, BTreeMap::from([(name.to_owned(), def)]))
    }

    /// Whether `name` may be asked for.
    pub fn contains(&self, name: &str) -> bool {
        name == TEST_IMAGE || self.images.contains_key(name)
    }

    /// The names on offer, for error messages and the API.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(TEST_IMAGE.to_owned())
            .chain(self.images.keys().cloned())
            .collect()
    }

    /// Turns a name into the files it boots, checking again that each is a
    /// regular file under the image directory (it may have changed since).
    pub fn resolve(&self, name: &str) -> Result<BootImage, ImageError> {
        if name == TEST_IMAGE {
            return Ok(BootImage::Test);
        }
        let (Some(dir), Some(def)) = (&self.dir, self.images.get(name)) else {
            return Err(ImageError::Unknown {
                name: name.to_owned(),
                offered: self.names().join(", "),
            });
        };
        let file = |field, rel: &str| inside(dir, name, field, rel);
        Ok(BootImage::Linux {
            kernel: file("kernel", &def.kernel)?,
            initrd: def
                .initrd
                .as_deref()
                .map(|i| file("initrd", i))
                .transpose()?,
            cmdline: def.cmdline.clone(),
        })
    }
}

/// `rel` under `dir`: relative, no `..`, and still under `dir` once every
/// symlink is resolved; a regular file.
fn inside(dir: &Path, image: &str, field: &'static str, rel: &str) -> Result<PathBuf, ImageError> {
    let bad = |reason: &str| ImageError::BadFile {
        image: image.to_owned(),
        field,
        file: rel.to_owned(),
        reason: reason.to_owned(),
    };
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(
            "must be a relative path inside the image directory, without `..`",
        ));
    }
    let real = dir
        .join(p)
        .canonicalize()
        .map_err(|e| bad(&format!("cannot be opened: {e}")))?;
    if !real.starts_with(dir) {
        return Err(bad("resolves to a file outside the image directory"));
    }
    if !real.is_file() {
        return Err(bad("is not a regular file"));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(kernel: &str, initrd: Option<&str>) -> ImageDef {
        ImageDef {
            kernel: kernel.into(),
            initrd: initrd.map(Into::into),
            cmdline: Some("console=ttyS0".into()),
        }
    }

    fn one(dir: &Path, d: ImageDef) -> Result<ImageCatalogue, ImageError> {
        ImageCatalogue::new(dir, BTreeMap::from([("linux".to_owned(), d)]))
    }

    #[test]
    fn names_resolve_to_files_under_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("boot")).unwrap();
        std::fs::write(d.path().join("boot/vmlinuz"), b"k").unwrap();
        std::fs::write(d.path().join("initrd"), b"i").unwrap();
        let cat = one(d.path(), def("boot/vmlinuz", Some("initrd"))).unwrap();
        let real = d.path().canonicalize().unwrap();
        assert_eq!(
            cat.resolve("linux").unwrap(),
            BootImage::Linux {
                kernel: real.join("boot/vmlinuz"),
                initrd: Some(real.join("initrd")),
                cmdline: Some("console=ttyS0".into())
            }
        );
        assert_eq!(cat.resolve("test").unwrap(), BootImage::Test);
        assert!(cat.contains("linux") && cat.contains("test") && !cat.contains("other"));
    }

    #[test]
    fn entries_reaching_outside_are_refused() {
        let outer = tempfile::tempdir().unwrap();
        let d = outer.path().join("images");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(outer.path().join("secret"), b"s").unwrap();
        std::fs::write(d.join("k"), b"k").unwrap();
        std::os::unix::fs::symlink(outer.path().join("secret"), d.join("link")).unwrap();
        let secret = outer.path().join("secret").display().to_string();
        for kernel in ["../secret", secret.as_str(), "link", "", ".", "missing"] {
            let err = one(&d, def(kernel, None)).unwrap_err();
            assert!(matches!(err, ImageError::BadFile { .. }), "{kernel}: {err}");
        }
        let err = one(&d, def("k", Some("../secret"))).unwrap_err();
        assert!(matches!(
            err,
            ImageError::BadFile {
                field: "initrd",
                ..
            }
        ));
    }

    #[test]
    fn a_symlink_swapped_in_later_is_refused_at_boot() {
        let outer = tempfile::tempdir().unwrap();
        let d = outer.path().join("images");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(outer.path().join("secret"), b"s").unwrap();
        std::fs::write(d.join("k"), b"k").unwrap();
        let cat = one(&d, def("k", None)).unwrap();
        std::fs::remove_file(d.join("k")).unwrap();
        std::os::unix::fs::symlink(outer.path().join("secret"), d.join("k")).unwrap();
        assert!(matches!(
            cat.resolve("linux"),
            Err(ImageError::BadFile { .. })
        ));
    }

    #[test]
    fn unknown_names_and_bad_names_are_refused_alike() {
        let cat = ImageCatalogue::builtin();
        for name in ["/etc/passwd", "linux", "../x"] {
            assert!(matches!(cat.resolve(name), Err(ImageError::Unknown { .. })));
        }
        for name in ["", "../x", "/etc/passwd", "A", "a/b", &"a".repeat(65)] {
            assert!(check_name(name).is_err(), "{name}");
        }
        check_name("debian-6.1_amd64").unwrap();
    }
}
