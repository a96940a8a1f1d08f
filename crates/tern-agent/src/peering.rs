//! The host's migration listener: streams routed to a migration go, as
//! sockets, to the guest process running it; unrouted sessions ask this
//! agent to take a migration in ([`SessionHello::Data`]) or to settle one
//! whose `Commit` went unconfirmed ([`SessionHello::Settle`]).

use crate::agent::{lock, Agent, AgentError, Inner, Routes};
use crate::control::{self, Request};
use crate::guestproc::read_hello as read_session_hello;
use crate::guestproc::SessionError;
use crate::vmdir::{Launch, LaunchRole, VmDir};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tern_migrate::protocol::{hello_frame, Offer, SessionHello, PROTOCOL_VERSION};
use tern_proto::{GuestSpec, GuestStatus, MigrationRole};
use tern_transport::{Listener, Receiver, Router, Sender, SessionConfig};

/// Binds the listener and serves it for as long as the agent lives.
pub(crate) async fn listen(inner: &Arc<Inner>) -> Result<SocketAddr, AgentError> {
    let server = match &inner.tls {
        Some(t) => Some(
            t.server_config()
                .map_err(|e| AgentError::BadRequest(format!("TLS server: {e}")))?,
        ),
        None => None,
    };
    let mut listener = Listener::bind_routed(
        inner.cfg.migrate_addr,
        server,
        Duration::from_secs(inner.cfg.resume_deadline_secs),
        Some(router(inner.routes.clone())),
    )
    .await
    .map_err(|e| {
        AgentError::Internal(format!("cannot listen on {}: {e}", inner.cfg.migrate_addr))
    })?;
    let addr = listener.local_addr();
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        while let Some(rx) = listener.accept().await {
            let Some(inner) = weak.upgrade() else { return };
            let agent = Agent {
                inner,
                migrate_addr: addr,
            };
            tokio::spawn(async move { agent.session(rx).await });
        }
    });
    Ok(addr)
}

/// Hands each routed stream to its migration's guest process.
fn router(routes: Routes) -> Router {
    Arc::new(move |route: String, sock: tokio::net::TcpStream| {
        let Some(dir) = lock(&routes).get(&route).cloned() else {
            tracing::warn!(route, "a stream for no migration here");
            return;
        };
        let fd: OwnedFd = match sock.into_std() {
            Ok(s) => s.into(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot detach a routed stream");
                return;
            }
        };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = control::hand_over(&dir.streams(), fd) {
                tracing::warn!(route, error = %e, "cannot hand a stream to its guest process");
            }
        });
    })
}

/// Why an incoming migration is refused before anything starts.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("the source speaks migration protocol version {theirs}, this host version {ours}")]
    Version { theirs: u32, ours: u32 },
    #[error("`{0}` is not a configured peer")]
    UnknownPeer(String),
    #[error("the peer claims to be `{claimed}` but authenticated as {actual}")]
    Impersonation { claimed: String, actual: String },
    #[error("bad VM spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Name(#[from] crate::vmdir::BadName),
    #[error("{0} already runs on this host")]
    AlreadyHere(String),
    #[error(
        "no capacity for {mib} MiB and {vcpus} vCPUs (limit {max_mib} MiB, {max_vcpus} vCPUs)"
    )]
    Capacity {
        mib: u64,
        vcpus: u8,
        max_mib: u64,
        max_vcpus: u8,
    },
    #[error("cannot start a guest process: {0}")]
    Start(String),
}

impl Agent {
    /// Whether the peer that opened a session (by its certificate) is the
    /// host it names in its messages. Without TLS (tests on one machine)
    /// there is nothing to check against.
    fn check_claim(&self, pin: Option<[u8; 32]>, claimed: &str) -> Result<(), Refusal> {
        if self.inner.tls.is_none() {
            return Ok(());
        }
        let actual = pin.and_then(|p| self.inner.peers.by_pin(&p));
        match actual {
            Some(p) if p.name == claimed => Ok(()),
            other => Err(Refusal::Impersonation {
                claimed: claimed.into(),
                actual: other.map_or("no configured peer".into(), |p| format!("`{}`", p.name)),
            }),
        }
    }

    async fn session(self, mut rx: Receiver) {
        let pin = rx.peer_pin();
        match read_session_hello(&mut rx, Duration::from_secs(10)).await {
            Err(e) => tracing::warn!(error = %e, "refused a migration session"),
            Ok(SessionHello::Data(offer)) => {
                if let Err(r) = self.check_claim(pin, &offer.source_host) {
                    tracing::warn!(migration = offer.migration, error = %r, "refused a migration offer");
                    return;
                }
                self.offer(offer).await;
                // The asking session stays open until the source closes it.
                while let Some(Ok((seq, _))) = rx.recv().await {
                    rx.ack(seq);
                }
            }
            Ok(SessionHello::Settle {
                migration,
                source_host,
                ..
            }) => match self.check_claim(pin, &source_host) {
                Ok(()) => self.answer_settle(&migration, &source_host).await,
                Err(r) => tracing::warn!(migration, error = %r, "refused a settle request"),
            },
            Ok(other) => tracing::warn!(?other, "unexpected session hello"),
        }
    }

    /// Takes a migration in: a guest process of its own receives it.
    async fn offer(&self, o: Offer) {
        match self.accept_offer(&o).await {
            Ok(()) => {
                metrics::counter!("migrations_accepted_total").increment(1);
                tracing::info!(
                    migration = o.migration,
                    from = o.source_host,
                    vm = o.vm,
                    "incoming migration"
                )
            }
            Err(r) => {
                metrics::counter!("migrations_rejected_total").increment(1);
                tracing::warn!(migration = o.migration, from = o.source_host, error = %r, "incoming migration refused");
                let msg = SessionHello::Refused {
                    migration: o.migration.clone(),
                    reason: r.to_string(),
                };
                if let Err(e) = self.dial_back(&o.source_host, &o.migration, &msg).await {
                    tracing::warn!(error = %e, "cannot tell the source why");
                }
            }
        }
    }

    async fn accept_offer(&self, o: &Offer) -> Result<(), Refusal> {
        if o.version != PROTOCOL_VERSION {
            return Err(Refusal::Version {
                theirs: o.version,
                ours: PROTOCOL_VERSION,
            });
        }
        let cfg = &self.inner.cfg;
        // Replies go where this host's configuration says the peer is,
        // never where the offer says: the peer does not choose whom we dial.
        let Some(peer) = self.inner.peers.get(&o.source_host) else {
            return Err(Refusal::UnknownPeer(o.source_host.clone()));
        };
        let reply_to = peer.migrate_addr.to_string();
        // Both become the guest directory's name.
        crate::vmdir::check_name("VM id", &o.vm)?;
        crate::vmdir::check_name("migration id", &o.migration)?;
        if o.vm.parse::<tern_proto::VmId>().is_err() {
            return Err(crate::vmdir::BadName {
                kind: "VM id (a UUID)",
                value: o.vm.chars().take(80).collect(),
            }
            .into());
        }
        let spec: GuestSpec =
            serde_json::from_value(o.spec.clone()).map_err(|e| Refusal::Spec(e.to_string()))?;
        spec.validate().map_err(Refusal::Spec)?;
        if spec.memory_mib > cfg.max_memory_mib || spec.vcpus > cfg.max_vcpus {
            return Err(Refusal::Capacity {
                mib: spec.memory_mib,
                vcpus: spec.vcpus,
                max_mib: cfg.max_memory_mib,
                max_vcpus: cfg.max_vcpus,
            });
        }
        if let Ok(v) = self.vm(&o.vm).await {
            if matches!(
                v.status,
                GuestStatus::Running | GuestStatus::Migrating | GuestStatus::Starting
            ) {
                return Err(Refusal::AlreadyHere(o.vm.clone()));
            }
        }
        let dir = VmDir::new(&cfg.data_dir, &format!("{}.{}", o.vm, o.migration));
        dir.write_launch(&Launch {
            vm: o.vm.clone(),
            epoch: o.epoch + 1,
            spec,
            role: LaunchRole::Receive {
                migration: o.migration.clone(),
                source_host: o.source_host.clone(),
                reply_to,
            },
            agent: cfg.clone(),
        })
        .map_err(|e| Refusal::Start(e.to_string()))?;
        lock(&self.inner.routes).insert(o.migration.clone(), dir.clone());
        if let Err(e) = self.spawn_guest(&dir) {
            lock(&self.inner.routes).remove(&o.migration);
            return Err(Refusal::Start(e.to_string()));
        }
        self.track(
            &o.migration,
            &o.vm,
            MigrationRole::Destination,
            &o.source_host,
            dir,
            None,
        );
        Ok(())
    }

    /// The final word on whether `migration` committed here. A process
    /// still receiving it is fenced first; one that ended left its journal.
    async fn answer_settle(&self, migration: &str, source_host: &str) {
        let committed = self.committed_here(migration).await;
        let Some(committed) = committed else {
            tracing::warn!(
                migration,
                "cannot settle yet: its guest process does not answer"
            );
            return;
        };
        tracing::info!(migration, committed, from = source_host, "settled a commit");
        let msg = SessionHello::Settled {
            migration: migration.into(),
            committed,
        };
        if let Err(e) = self.dial_back(source_host, migration, &msg).await {
            tracing::warn!(migration, error = %e, "cannot send the verdict");
        }
    }

    async fn committed_here(&self, migration: &str) -> Option<bool> {
        let dir = lock(&self.inner.routes)
            .get(migration)
            .cloned()
            .or_else(|| {
                let root = self.inner.cfg.data_dir.join("vms");
                std::fs::read_dir(root).ok()?.flatten().find_map(|d| {
                    let name = d.file_name().to_string_lossy().into_owned();
                    name.ends_with(&format!(".{migration}"))
                        .then(|| VmDir(d.path()))
                })
            });
        let Some(dir) = dir else {
            return Some(false); // never received here: it never will be
        };
        if dir.live_pid().is_some() {
            let req = Request::Settle {
                migration: migration.into(),
            };
            match control::call::<bool>(&dir.control(), &req, Duration::from_secs(5)).await {
                Ok(c) => return Some(c),
                Err(control::ControlError::Refused(_)) => {}
                Err(_) if dir.live_pid().is_some() => return None,
                Err(_) => {}
            }
        }
        // The process ended: its journal holds the commit if there was one.
        let records = dir.records().ok()?;
        Some(records.iter().any(|r| {
            matches!(r, crate::journal::Record::CommitReceived { migration: m, .. } if m == migration)
        }))
    }

    /// Opens a short session on the source's reply route (at the peer's
    /// configured address) and sends `msg`.
    async fn dial_back(
        &self,
        peer: &str,
        migration: &str,
        msg: &SessionHello,
    ) -> Result<(), SessionError> {
        let addr: SocketAddr = self
            .inner
            .peers
            .get(peer)
            .map(|p| p.migrate_addr)
            .ok_or_else(|| SessionError::UnknownPeer(peer.into()))?;
        let security = crate::guestproc::security(self.inner.tls.as_ref(), peer)?;
        let cfg = SessionConfig {
            streams: 1,
            resume_deadline: Duration::from_secs(5),
            route: Some(migration.into()),
            ..Default::default()
        };
        let s = Sender::connect(addr, security, cfg, None).await?;
        s.send(hello_frame(msg)).await?;
        let wait = Duration::from_secs(5);
        tokio::time::timeout(wait, s.finish())
            .await
            .map_err(|_| SessionError::Timeout {
                waiting_for: "acknowledgement",
                after: wait,
            })??;
        Ok(())
    }
}
