//! The model of a fleet: hosts, what their VMs use, what migrations in
//! flight reserve, and placement over it.

use std::collections::HashMap;
use tern_proto::{labels_satisfy, Capacity, HostId, HostLoad, HostState, Labels, VmId};

/// What a VM takes of a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

impl Demand {
    fn plus(self, o: Demand) -> Demand {
        Demand {
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            vcpus: self.vcpus.saturating_add(o.vcpus),
        }
    }

    fn minus(self, o: Demand) -> Demand {
        Demand {
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            vcpus: self.vcpus.saturating_sub(o.vcpus),
        }
    }

    /// Whether this fits in `free`.
    pub fn fits_in(self, free: Demand) -> bool {
        self.memory_mib <= free.memory_mib && self.vcpus <= free.vcpus
    }
}

/// A host as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct Host {
    /// Its id.
    pub id: HostId,
    /// Active, draining or down.
    pub state: HostState,
    /// Its labels (`region=eu`).
    pub labels: Labels,
    /// What it may hand out.
    pub capacity: Capacity,
    /// Its last heartbeat's load.
    pub load: HostLoad,
}

/// A VM as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct Vm {
    /// Its id.
    pub id: VmId,
    /// The host that owns it.
    pub host: HostId,
    /// What it takes.
    pub demand: Demand,
    /// Labels every host it runs on must carry.
    pub requires: Labels,
    /// A migration of it is in flight (at most one at a time).
    pub migrating: bool,
    /// When it last moved (seconds on the caller's clock), for cooldowns.
    pub last_moved: Option<u64>,
}

/// Why a VM cannot go where asked (or anywhere).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlaceError {
    /// The fleet has no host (other than the one a VM leaves).
    #[error("the fleet has no host to run it: join one with `tern agent --join`")]
    NoHosts,
    /// No host carries the labels the VM requires.
    #[error("no host carries the labels the VM requires ({})", show(.0))]
    NoMatchingHost(Labels),
    /// Hosts with the labels exist but none has room.
    #[error("no host with the required labels has room for {memory_mib} MiB and {vcpus} vCPUs")]
    NoRoom {
        /// Memory asked for.
        memory_mib: u64,
        /// vCPUs asked for.
        vcpus: u32,
    },
    /// The host is not in the fleet.
    #[error("unknown host {0}")]
    UnknownHost(HostId),
    /// The host takes no new work.
    #[error("host {host} takes no new VMs: it is {state}")]
    NotAccepting {
        /// The host.
        host: HostId,
        /// Its state.
        state: &'static str,
    },
    /// The host lacks a label the VM requires (data residency).
    #[error("host {host} lacks labels the VM requires ({})", show(.required))]
    LabelMismatch {
        /// The host.
        host: HostId,
        /// What the VM requires.
        required: Labels,
    },
    /// The host has no room (its VMs and the migrations it expects).
    #[error("host {host} has no room: {free_mib} MiB and {free_vcpus} vCPUs free")]
    Full {
        /// The host.
        host: HostId,
        /// Memory free after reservations.
        free_mib: u64,
        /// vCPUs free after reservations.
        free_vcpus: u32,
    },
    /// The VM is not in the fleet.
    #[error("unknown VM {0}")]
    UnknownVm(VmId),
    /// The VM is already migrating.
    #[error("VM {0} is already migrating")]
    AlreadyMigrating(VmId),
}

fn show(l: &Labels) -> String {
    let v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(",")
}

#[derive(Clone, Debug)]
struct Slot {
    host: Host,
    /// What its VMs take.
    used: Demand,
    /// What incoming migrations hold.
    reserved: Demand,
    /// Busy fraction of its cores, as estimated after planned moves.
    cpu: f64,
    /// Migrations it takes part in (either end).
    migrations: u32,
    /// Indices into `Fleet::vms` of the VMs it owns.
    vms: Vec<usize>,
}

/// Hosts, their VMs and the migrations in flight.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    slots: Vec<Slot>,
    hosts: HashMap<HostId, usize>,
    vms: Vec<Vm>,
    by_vm: HashMap<VmId, usize>,
}

impl Fleet {
    /// A fleet of `hosts` running `vms` (a VM naming no known host is
    /// kept, but counts against nothing).
    pub fn new(hosts: Vec<Host>, vms: Vec<Vm>) -> Self {
        let mut f = Fleet::default();
        for h in hosts {
            f.hosts.insert(h.id.clone(), f.slots.len());
            f.slots.push(Slot {
                cpu: h.load.cpu,
                host: h,
                used: Demand::default(),
                reserved: Demand::default(),
                migrations: 0,
                vms: Vec::new(),
            });
        }
        for vm in vms {
            f.add_vm(vm);
        }
        f
    }

    /// Adds a VM where it says it runs.
    pub fn add_vm(&mut self, vm: Vm) {
        let i = self.vms.len();
        if let Some(&s) = self.hosts.get(&vm.host) {
            let slot = &mut self.slots[s];
            slot.used = slot.used.plus(vm.demand);
            slot.vms.push(i);
        }
        self.by_vm.insert(vm.id, i);
        self.vms.push(vm);
    }

    /// The host `id`.
    pub fn host(&self, id: &HostId) -> Option<&Host> {
        self.hosts.get(id).map(|&s| &self.slots[s].host)
    }

    /// Every host.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.slots.iter().map(|s| &s.host)
    }

    /// The VM `id`.
    pub fn vm(&self, id: &VmId) -> Option<&Vm> {
        self.by_vm.get(id).map(|&i| &self.vms[i])
    }

    /// Every VM.
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// The VMs `host` owns.
    pub fn vms_on(&self, host: &HostId) -> impl Iterator<Item = &Vm> {
        let idx = self.hosts.get(host).map(|&s| self.slots[s].vms.as_slice());
        idx.unwrap_or_default().iter().map(|&i| &self.vms[i])
    }

    /// What `host`'s VMs take, and what its incoming migrations reserve.
    pub fn usage(&self, host: &HostId) -> Option<(Demand, Demand)> {
        self.hosts
            .get(host)
            .map(|&s| (self.slots[s].used, self.slots[s].reserved))
    }

    /// Migrations `host` takes part in.
    pub fn migrations_at(&self, host: &HostId) -> u32 {
        self.hosts
            .get(host)
            .map_or(0, |&s| self.slots[s].migrations)
    }

    /// Room left on `host` after its VMs and reservations.
    pub fn free(&self, host: &HostId) -> Option<Demand> {
        self.hosts.get(host).map(|&s| free_of(&self.slots[s]))
    }

    /// How loaded `host` is, 0..: the highest of its memory and vCPU
    /// allocation (reservations included) and its cores' busy fraction.
    pub fn pressure(&self, host: &HostId) -> f64 {
        self.hosts.get(host).map_or(0.0, |&s| {
            pressure_with(&self.slots[s], Demand::default(), 0.0)
        })
    }

    /// How loaded `host` will be once the migrations leaving it in flight
    /// commit: what a policy should judge, or it sheds the same load twice.
    pub fn pressure_settled(&self, host: &HostId) -> f64 {
        self.hosts.get(host).map_or(0.0, |&s| {
            let leaving = self
                .vms_on(host)
                .filter(|v| v.migrating)
                .fold(Demand::default(), |d, v| d.plus(v.demand));
            let mut slot = self.slots[s].clone();
            slot.used = slot.used.minus(leaving);
            pressure_with(&slot, Demand::default(), 0.0)
        })
    }

    /// Whether `demand` with `requires` may go to `host` now.
    pub fn check_target(
        &self,
        host: &HostId,
        demand: Demand,
        requires: &Labels,
    ) -> Result<(), PlaceError> {
        let &s = self
            .hosts
            .get(host)
            .ok_or_else(|| PlaceError::UnknownHost(host.clone()))?;
        check_slot(&self.slots[s], demand, requires)
    }

    /// The host a new VM should go to: among active hosts with the labels
    /// it requires and room for it, the one least loaded afterwards.
    pub fn place(&self, demand: Demand, requires: &Labels) -> Result<HostId, PlaceError> {
        self.best_target(demand, requires, 0.0, None, f64::INFINITY)
            .map(|s| self.slots[s].host.id.clone())
    }

    /// The best target for `demand` (adding `cpu_abs` cores of load),
    /// skipping `exclude`, whose pressure afterwards stays at most `limit`.
    fn best_target(
        &self,
        demand: Demand,
        requires: &Labels,
        cpu_abs: f64,
        exclude: Option<usize>,
        limit: f64,
    ) -> Result<usize, PlaceError> {
        let mut any = false;
        let mut labelled = false;
        let mut best: Option<(f64, usize)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if Some(i) == exclude {
                continue;
            }
            any = true;
            if !labels_satisfy(&s.host.labels, requires) {
                continue;
            }
            labelled = true;
            if check_slot(s, demand, requires).is_err() {
                continue;
            }
            let p = pressure_with(s, demand, cpu_abs);
            if p <= limit && best.is_none_or(|(bp, _)| p < bp) {
                best = Some((p, i));
            }
        }
        match best {
            Some((_, i)) => Ok(i),
            None if !any => Err(PlaceError::NoHosts),
            None if !labelled => Err(PlaceError::NoMatchingHost(requires.clone())),
            None => Err(PlaceError::NoRoom {
                memory_mib: demand.memory_mib,
                vcpus: demand.vcpus,
            }),
        }
    }

    /// The target for moving `vm` off its host, with its share of the
    /// source's CPU load, whose pressure afterwards stays at most `limit`.
    pub fn target_for_move(&self, vm: &VmId, limit: f64) -> Result<HostId, PlaceError> {
        let &i = self.by_vm.get(vm).ok_or(PlaceError::UnknownVm(*vm))?;
        let v = &self.vms[i];
        let from = self.hosts.get(&v.host).copied();
        let cpu_abs = from.map_or(0.0, |s| self.cpu_share(s, v.demand));
        self.best_target(v.demand, &v.requires, cpu_abs, from, limit)
            .map(|s| self.slots[s].host.id.clone())
    }

    /// The cores' worth of load a VM of `demand` is estimated to put on
    /// slot `s`: the host's busy cores split by allocated vCPUs.
    fn cpu_share(&self, s: usize, demand: Demand) -> f64 {
        let slot = &self.slots[s];
        if slot.used.vcpus == 0 {
            return 0.0;
        }
        slot.cpu * f64::from(slot.host.capacity.vcpus.max(1)) * f64::from(demand.vcpus)
            / f64::from(slot.used.vcpus)
    }

    /// A migration of `vm` to `to` starts: the target reserves its room,
    /// both hosts count it, the VM is marked migrating.
    pub fn start_migration(&mut self, vm: &VmId, to: &HostId) -> Result<(), PlaceError> {
        let &i = self.by_vm.get(vm).ok_or(PlaceError::UnknownVm(*vm))?;
        if self.vms[i].migrating {
            return Err(PlaceError::AlreadyMigrating(*vm));
        }
        let (demand, requires) = (self.vms[i].demand, self.vms[i].requires.clone());
        self.check_target(to, demand, &requires)?;
        let t = self.hosts[to];
        self.slots[t].reserved = self.slots[t].reserved.plus(demand);
        self.slots[t].migrations += 1;
        if let Some(&f) = self.hosts.get(&self.vms[i].host) {
            self.slots[f].migrations += 1;
        }
        self.vms[i].migrating = true;
        Ok(())
    }

    /// A migration of `vm` to `to` ended: committed, the VM and its load
    /// move there; rolled back, the target's reservation is released.
    pub fn end_migration(&mut self, vm: &VmId, to: &HostId, committed: bool, now: u64) {
        let Some(&i) = self.by_vm.get(vm) else {
            return;
        };
        let demand = self.vms[i].demand;
        let from = self.hosts.get(&self.vms[i].host).copied();
        if let Some(&t) = self.hosts.get(to) {
            let slot = &mut self.slots[t];
            slot.reserved = slot.reserved.minus(demand);
            slot.migrations = slot.migrations.saturating_sub(1);
        }
        if let Some(f) = from {
            self.slots[f].migrations = self.slots[f].migrations.saturating_sub(1);
        }
        self.vms[i].migrating = false;
        if !committed {
            return;
        }
        let cpu_abs = from.map_or(0.0, |f| self.cpu_share(f, demand));
        if let Some(f) = from {
            let slot = &mut self.slots[f];
            slot.used = slot.used.minus(demand);
            slot.vms.retain(|&x| x != i);
            slot.cpu = (slot.cpu - cpu_abs / f64::from(slot.host.capacity.vcpus.max(1))).max(0.0);
        }
        if let Some(&t) = self.hosts.get(to) {
            let slot = &mut self.slots[t];
            slot.used = slot.used.plus(demand);
            slot.vms.push(i);
            slot.cpu += cpu_abs / f64::from(slot.host.capacity.vcpus.max(1));
        }
        self.vms[i].host = to.clone();
        self.vms[i].last_moved = Some(now);
    }

    /// Records a host's load (a heartbeat): its reported CPU replaces the
    /// estimate planned moves made.
    pub fn set_load(&mut self, host: &HostId, load: HostLoad) {
        if let Some(&s) = self.hosts.get(host) {
            self.slots[s].cpu = load.cpu;
            self.slots[s].host.load = load;
        }
    }

    /// Sets a host's state (draining, down, active again).
    pub fn set_state(&mut self, host: &HostId, state: HostState) {
        if let Some(&s) = self.hosts.get(host) {
            self.slots[s].host.state = state;
        }
    }
}

fn free_of(s: &Slot) -> Demand {
    Demand {
        memory_mib: s.host.capacity.memory_mib,
        vcpus: s.host.capacity.vcpus,
    }
    .minus(s.used.plus(s.reserved))
}

fn check_slot(s: &Slot, demand: Demand, requires: &Labels) -> Result<(), PlaceError> {
    if !s.host.state.accepts_work() {
        return Err(PlaceError::NotAccepting {
            host: s.host.id.clone(),
            state: s.host.state.as_str(),
        });
    }
    if !labels_satisfy(&s.host.labels, requires) {
        return Err(PlaceError::LabelMismatch {
            host: s.host.id.clone(),
            required: requires.clone(),
        });
    }
    let free = free_of(s);
    if !demand.fits_in(free) {
        return Err(PlaceError::Full {
            host: s.host.id.clone(),
            free_mib: free.memory_mib,
            free_vcpus: free.vcpus,
        });
    }
    Ok(())
}

/// A slot's pressure with `demand` (and `cpu_abs` cores of load) added.
fn pressure_with(s: &Slot, demand: Demand, cpu_abs: f64) -> f64 {
    let cap = s.host.capacity;
    let taken = s.used.plus(s.reserved).plus(demand);
    // Allocation against what the host offers guests, and the machine's
    // own memory in use against all it has (its heartbeat's figures).
    let allocated = taken.memory_mib as f64 / cap.memory_mib.max(1) as f64;
    let load = s.host.load;
    let physical =
        load.memory_used_mib as f64 / (load.memory_used_mib + load.memory_free_mib).max(1) as f64;
    let mem = allocated.max(physical);
    let vcpu = f64::from(taken.vcpus) / f64::from(cap.vcpus.max(1));
    let cpu = s.cpu + cpu_abs / f64::from(cap.vcpus.max(1));
    mem.max(vcpu).max(cpu)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn host(id: &str, region: &str, memory_mib: u64, vcpus: u32) -> Host {
        Host {
            id: HostId::new(id).unwrap(),
            state: HostState::Active,
            labels: [("region".to_string(), region.to_string())].into(),
            capacity: Capacity { memory_mib, vcpus },
            load: HostLoad::default(),
        }
    }

    pub(crate) fn vm(host: &str, memory_mib: u64, vcpus: u32) -> Vm {
        Vm {
            id: VmId::new(),
            host: HostId::new(host).unwrap(),
            demand: Demand { memory_mib, vcpus },
            requires: Labels::new(),
            migrating: false,
            last_moved: None,
        }
    }

    pub(crate) fn eu() -> Labels {
        [("region".to_string(), "eu".to_string())].into()
    }

    #[test]
    fn placement_picks_the_least_loaded_host_with_room_and_labels() {
        let f = Fleet::new(
            vec![
                host("a", "eu", 4096, 8),
                host("b", "eu", 4096, 8),
                host("c", "us", 65536, 64),
            ],
            vec![vm("a", 2048, 2)],
        );
        let d = Demand {
            memory_mib: 1024,
            vcpus: 1,
        };
        assert_eq!(f.place(d, &eu()).unwrap().as_str(), "b");
        let big = Demand {
            memory_mib: 8192,
            vcpus: 1,
        };
        assert!(matches!(
            f.place(big, &eu()),
            Err(PlaceError::NoRoom { .. })
        ));
        let mars = [("region".to_string(), "mars".to_string())].into();
        let e = f.place(d, &mars).unwrap_err();
        assert!(e.to_string().contains("region=mars"), "{e}");
        // Without constraints the big host wins.
        assert_eq!(f.place(d, &Labels::new()).unwrap().as_str(), "c");
    }

    #[test]
    fn an_empty_fleet_says_so() {
        let f = Fleet::new(vec![], vec![]);
        let d = Demand {
            memory_mib: 64,
            vcpus: 1,
        };
        let e = f.place(d, &Labels::new()).unwrap_err();
        assert_eq!(e, PlaceError::NoHosts);
        assert!(e.to_string().contains("tern agent --join"), "{e}");
    }

    #[test]
    fn reservations_hold_room_until_the_migration_ends() {
        let mut f = Fleet::new(
            vec![host("a", "eu", 4096, 8), host("b", "eu", 2048, 8)],
            vec![vm("a", 2048, 2)],
        );
        let id = f.vms()[0].id;
        let b = HostId::new("b").unwrap();
        f.start_migration(&id, &b).unwrap();
        assert_eq!(f.free(&b).unwrap().memory_mib, 0);
        assert!(matches!(
            f.start_migration(&id, &b),
            Err(PlaceError::AlreadyMigrating(_))
        ));
        f.end_migration(&id, &b, false, 10);
        assert_eq!(f.free(&b).unwrap().memory_mib, 2048);
        assert_eq!(f.vm(&id).unwrap().host.as_str(), "a");
        f.start_migration(&id, &b).unwrap();
        f.end_migration(&id, &b, true, 20);
        assert_eq!(f.vm(&id).unwrap().host, b);
        assert_eq!(f.free(&b).unwrap().memory_mib, 0);
        assert_eq!(f.free(&HostId::new("a").unwrap()).unwrap().memory_mib, 4096);
        assert_eq!(f.vm(&id).unwrap().last_moved, Some(20));
    }

    #[test]
    fn a_draining_or_foreign_host_is_refused_with_a_reason() {
        let mut f = Fleet::new(
            vec![host("a", "eu", 4096, 8), host("us1", "us", 4096, 8)],
            vec![],
        );
        let d = Demand {
            memory_mib: 1,
            vcpus: 1,
        };
        let us1 = HostId::new("us1").unwrap();
        let e = f.check_target(&us1, d, &eu()).unwrap_err();
        assert!(matches!(e, PlaceError::LabelMismatch { .. }), "{e}");
        let a = HostId::new("a").unwrap();
        f.set_state(&a, HostState::Draining);
        let e = f.check_target(&a, d, &eu()).unwrap_err();
        assert_eq!(e.to_string(), "host a takes no new VMs: it is draining");
    }
}
