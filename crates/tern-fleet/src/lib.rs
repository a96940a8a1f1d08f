//! The control plane's side of a tern fleet.
//!
//! Hosts join the control plane (`tern agent --join`, served by
//! `tern_api::hosts`); from then on the control plane runs VMs on them
//! through their agents' APIs. [`AgentsDriver`] is the `agents` driver of
//! `tern up`: it places each new VM with the scheduler over the hosts and
//! VMs the store knows, and starts, configures, probes and stops it on the
//! agent of the host the store records as its owner.

mod driver;
pub mod migrations;

pub use driver::AgentsDriver;
pub use migrations::{Ask, MigrationError, Migrations};
