//! Where VMs run and when they move, decided for a whole fleet.
//!
//! This crate makes the control plane's decisions and nothing else: it
//! reads a model of hosts and VMs ([`Fleet`]) and answers where a new VM
//! goes ([`Fleet::place`]), which VMs a hot host should shed and where
//! ([`Policy`], [`LoadBalance`]), how to empty a host ([`drain`]), and which
//! queued migrations start, wait or preempt others ([`Queue`]). No I/O, no
//! clocks: the control plane feeds it from its store and heartbeats, and
//! tests and benchmarks feed it simulated fleets of thousands of hosts.
//!
//! Every decision counts capacity reserved by migrations in flight (a
//! target holds room for a VM from accept to commit or rollback), and
//! honours the labels a VM requires (a VM pinned to `region=eu` is never
//! placed on, or moved to, a host without that label).

pub mod fleet;
pub mod policy;
pub mod queue;
pub mod sim;

pub use fleet::{Demand, Fleet, Host, PlaceError, Vm};
pub use policy::{drain, LoadBalance, Plan, Policy};
pub use queue::{Limits, Queue, Request, Step};
