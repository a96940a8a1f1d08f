//! The store's writer thread: log writes leave the caller's path (a
//! migration's checkpoint written to the page cache costs about 1 ms per
//! MB), in the order they were committed. A synced write, a removal and a
//! barrier (before the logs are read) wait for everything queued before
//! them, so readers and durable commits see the files as committed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::mpsc;

/// One thing for the thread to do.
enum Job {
    /// Writes a record: a new log (`full`: written aside, then renamed) or
    /// an append; `done` waits for it (and makes it durable).
    Write {
        path: PathBuf,
        full: bool,
        record: Vec<u8>,
        done: Option<mpsc::Sender<io::Result<()>>>,
    },
    /// Removes a log.
    Remove {
        path: PathBuf,
        done: mpsc::Sender<io::Result<()>>,
    },
    /// Answers once everything before it is written.
    Barrier { done: mpsc::Sender<io::Result<()>> },
}

/// The handle the store keeps; the thread ends when it is dropped.
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
    dir: PathBuf,
}

impl Writer {
    pub(super) fn start(dir: PathBuf) -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        let d = dir.clone();
        std::thread::Builder::new()
            .name("tern-ckpt-writer".into())
            .spawn(move || run(&d, rx))?;
        Ok(Self { jobs, dir })
    }

    /// Queues a record for the log at `path` (written length-prefixed); with `sync`,
    /// waits until it (and all before it) is on disk.
    pub(super) fn write(
        &self,
        path: PathBuf,
        full: bool,
        record: Vec<u8>,
        sync: bool,
    ) -> io::Result<()> {
        if !sync {
            return self.send(Job::Write {
                path,
                full,
                record,
                done: None,
            });
        }
        let (tx, rx) = mpsc::channel();
        self.send(Job::Write {
            path,
            full,
            record,
            done: Some(tx),
        })?;
        Self::wait(rx)
    }

    /// Removes the log at `path` after what is queued.
    pub(super) fn remove(&self, path: PathBuf) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Remove { path, done: tx })?;
        Self::wait(rx)
    }

    /// Waits until everything queued is written.
    pub(super) fn barrier(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Barrier { done: tx })?;
        Self::wait(rx)
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.jobs.send(job).map_err(|_| {
            io::Error::other(format!(
                "the checkpoint writer of {} stopped",
                self.dir.display()
            ))
        })
    }

    fn wait(rx: mpsc::Receiver<io::Result<()>>) -> io::Result<()> {
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the checkpoint writer stopped")))
    }
}

fn run(dir: &std::path::Path, jobs: mpsc::Receiver<Job>) {
    // A write that failed unseen fails the next one somebody waits for.
    let mut failed: Option<io::Error> = None;
    for job in jobs {
        match job {
            Job::Write {
                path,
                full,
                record,
                done,
            } => {
                let r = write(dir, &path, full, &record, done.is_some());
                match done {
                    Some(tx) => {
                        let _ = tx.send(failed.take().map_or(r, Err));
                    }
                    None => {
                        if let Err(e) = r {
                            tracing::error!(path = %path.display(), error = %e, "a checkpoint write failed");
                            failed.get_or_insert(e);
                        }
                    }
                }
            }
            Job::Remove { path, done } => {
                let r = match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
                let _ = done.send(r);
            }
            Job::Barrier { done } => {
                let _ = done.send(failed.take().map_or(Ok(()), Err));
            }
        }
    }
}

/// Writes one record: its length, then its bytes.
fn write(
    dir: &std::path::Path,
    path: &std::path::Path,
    full: bool,
    record: &[u8],
    sync: bool,
) -> io::Result<()> {
    let len = (record.len() as u64).to_le_bytes();
    if full {
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&len)?;
        f.write_all(record)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if sync {
            File::open(dir)?.sync_all()?;
        }
    } else {
        let mut f = OpenOptions::new().append(true).open(path)?;
        f.write_all(&len)?;
        f.write_all(record)?;
        if sync {
            // Also flushes earlier unsynced records of this log.
            f.sync_data()?;
        }
    }
    Ok(())
}
