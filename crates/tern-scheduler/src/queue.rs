//! The migration queue: what starts now, what waits, and what a more
//! urgent migration preempts.
//!
//! Requests start in priority order ([`MigrationReason`]: evacuation,
//! maintenance, manual, rebalance), oldest first within one, as long as
//! both hosts and the link between them are under their limits and the
//! target has room (the room is reserved from the start to the end). A
//! request blocked by a lower-priority migration (holding a host's or the
//! link's slot, the target's room, or the VM itself) cancels it; the
//! cancelled one rolls back, and the request starts once it has ended.

use crate::fleet::{Fleet, PlaceError};
use tern_proto::{HostId, MigrationId, MigrationReason, VmId};

/// A migration asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Its id.
    pub id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Where it runs.
    pub from: HostId,
    /// Where it goes.
    pub to: HostId,
    /// Why: its priority.
    pub reason: MigrationReason,
}

/// How many migrations may run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Per host, counting both ends.
    pub per_host: u32,
    /// Per pair of hosts (either direction).
    pub per_link: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_host: 2,
            per_link: 1,
        }
    }
}

/// What the control plane should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Start this migration (its target's room is reserved).
    Start(MigrationId),
    /// Cancel `victim` (it rolls back) to make way for `for_`.
    Cancel {
        /// The lower-priority migration to cancel.
        victim: MigrationId,
        /// The request it makes way for.
        for_: MigrationId,
    },
    /// This request can never start as asked.
    Refuse {
        /// The request.
        id: MigrationId,
        /// Why.
        error: PlaceError,
    },
}

/// What keeps a request from starting.
enum Block {
    Host(HostId),
    Link,
    Room,
    Vm,
}

struct Running {
    req: Request,
    /// Cancelled to make way for this request; it still holds what it
    /// held until it has rolled back.
    cancelled_for: Option<MigrationId>,
}

/// Pending and running migrations.
#[derive(Default)]
pub struct Queue {
    limits: Limits,
    pending: Vec<(u64, Request)>,
    running: Vec<Running>,
    next_seq: u64,
}

impl Queue {
    /// An empty queue.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Queues a request.
    pub fn push(&mut self, req: Request) {
        self.pending.push((self.next_seq, req));
        self.next_seq += 1;
    }

    /// Takes in a migration that already runs (a queue rebuilt from the
    /// store): it holds its slots, and its target's room is already
    /// reserved in the fleet the queue admits against. `cancelled_for`
    /// names the request it was cancelled for, if any, so it is not
    /// cancelled twice while it rolls back.
    pub fn resume(&mut self, req: Request, cancelled_for: Option<MigrationId>) {
        self.running.push(Running { req, cancelled_for });
    }

    /// Requests waiting, in no particular order.
    pub fn pending(&self) -> impl Iterator<Item = &Request> {
        self.pending.iter().map(|(_, r)| r)
    }

    /// Migrations running (cancelled ones too, until they end).
    pub fn running(&self) -> impl Iterator<Item = &Request> {
        self.running.iter().map(|r| &r.req)
    }

    /// Drops a request that has not started; false if there is none.
    pub fn withdraw(&mut self, id: &MigrationId) -> bool {
        let before = self.pending.len();
        self.pending.retain(|(_, r)| &r.id != id);
        self.pending.len() != before
    }

    /// Starts what can start, in priority order, and cancels what blocks a
    /// more urgent request. Started migrations reserve their room in `fleet`.
    pub fn admit(&mut self, fleet: &mut Fleet) -> Vec<Step> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by(|a, b| b.1.reason.cmp(&a.1.reason).then(a.0.cmp(&b.0)));
        let mut steps = Vec::new();
        for (seq, req) in pending {
            match self.blocker(&req, fleet) {
                Ok(None) => match fleet.start_migration(&req.vm, &req.to) {
                    Ok(()) => {
                        steps.push(Step::Start(req.id.clone()));
                        self.running.push(Running {
                            req,
                            cancelled_for: None,
                        });
                    }
                    Err(error) => steps.push(Step::Refuse { id: req.id, error }),
                },
                Ok(Some(block)) => {
                    if let Some(victim) = self.preempt(&req, &block, fleet) {
                        steps.push(Step::Cancel {
                            victim,
                            for_: req.id.clone(),
                        });
                    }
                    self.pending.push((seq, req));
                }
                Err(error) => steps.push(Step::Refuse { id: req.id, error }),
            }
        }
        steps
    }

    /// A migration ended (committed or rolled back): its slots and the
    /// target's reservation are released.
    pub fn end(&mut self, id: &MigrationId, fleet: &mut Fleet, committed: bool, now: u64) {
        if let Some(i) = self.running.iter().position(|r| &r.req.id == id) {
            let r = self.running.swap_remove(i);
            fleet.end_migration(&r.req.vm, &r.req.to, committed, now);
        }
    }

    /// Why `req` cannot start now (`None`: it can), or why it never can.
    fn blocker(&self, req: &Request, fleet: &Fleet) -> Result<Option<Block>, PlaceError> {
        let vm = fleet.vm(&req.vm).ok_or(PlaceError::UnknownVm(req.vm))?;
        if vm.migrating {
            return Ok(Some(Block::Vm));
        }
        for h in [&req.from, &req.to] {
            let n = self.running.iter().filter(|r| involves(&r.req, h)).count();
            if n as u32 >= self.limits.per_host {
                return Ok(Some(Block::Host(h.clone())));
            }
        }
        let on_link = self
            .running
            .iter()
            .filter(|r| same_link(&r.req, req))
            .count();
        if on_link as u32 >= self.limits.per_link {
            return Ok(Some(Block::Link));
        }
        match fleet.check_target(&req.to, vm.demand, &vm.requires) {
            Ok(()) => Ok(None),
            Err(PlaceError::Full { .. }) => Ok(Some(Block::Room)),
            Err(e) => Err(e),
        }
    }

    /// Cancels the lowest-priority running migration that holds what
    /// `req` needs, if one ranks below it and none is already cancelled
    /// for it.
    fn preempt(&mut self, req: &Request, block: &Block, fleet: &Fleet) -> Option<MigrationId> {
        if self
            .running
            .iter()
            .any(|r| r.cancelled_for.as_ref() == Some(&req.id))
        {
            return None;
        }
        let holds = |r: &Request| match block {
            Block::Host(h) => involves(r, h),
            Block::Link => same_link(r, req),
            Block::Room => r.to == req.to && frees_enough(fleet, r, req),
            Block::Vm => r.vm == req.vm,
        };
        let victim = self
            .running
            .iter_mut()
            .filter(|r| r.cancelled_for.is_none() && r.req.reason < req.reason && holds(&r.req))
            .min_by_key(|r| r.req.reason)?;
        victim.cancelled_for = Some(req.id.clone());
        Some(victim.req.id.clone())
    }
}

fn involves(r: &Request, h: &HostId) -> bool {
    &r.from == h || &r.to == h
}

fn same_link(a: &Request, b: &Request) -> bool {
    (a.from == b.from && a.to == b.to) || (a.from == b.to && a.to == b.from)
}

/// Whether cancelling `victim` (releasing its reservation) makes room for `req`.
fn frees_enough(fleet: &Fleet, victim: &Request, req: &Request) -> bool {
    let (Some(free), Some(v), Some(r)) =
        (fleet.free(&req.to), fleet.vm(&victim.vm), fleet.vm(&req.vm))
    else {
        return false;
    };
    r.demand.memory_mib <= free.memory_mib + v.demand.memory_mib
        && r.demand.vcpus <= free.vcpus + v.demand.vcpus
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::tests::{host, vm};

    fn req(n: u32, f: &Fleet, vm: usize, to: &str, reason: MigrationReason) -> Request {
        let v = &f.vms()[vm];
        Request {
            id: MigrationId::new(format!("mig-{n}")).unwrap(),
            vm: v.id,
            from: v.host.clone(),
            to: HostId::new(to).unwrap(),
            reason,
        }
    }

    #[test]
    fn higher_priority_goes_first_and_limits_hold() {
        let mut f = Fleet::new(
            vec![host("a", "eu", 65536, 64), host("b", "eu", 65536, 64)],
            vec![vm("a", 1024, 1), vm("a", 1024, 1), vm("a", 1024, 1)],
        );
        let mut q = Queue::new(Limits::default());
        q.push(req(1, &f, 0, "b", MigrationReason::Rebalance));
        q.push(req(2, &f, 1, "b", MigrationReason::Maintenance));
        q.push(req(3, &f, 2, "b", MigrationReason::Maintenance));
        // One per link: the first maintenance request starts; the
        // rebalance waits (it cannot preempt anything).
        let steps = q.admit(&mut f);
        assert_eq!(steps, [Step::Start(MigrationId::new("mig-2").unwrap())]);
        assert_eq!(q.pending().count(), 2);
        q.end(&MigrationId::new("mig-2").unwrap(), &mut f, true, 5);
        assert_eq!(
            q.admit(&mut f),
            [Step::Start(MigrationId::new("mig-3").unwrap())]
        );
    }

    /// Hosts a and c roomy, b with room for one of the two VMs (on a and c).
    fn small_b() -> Fleet {
        Fleet::new(
            vec![
                host("a", "eu", 65536, 64),
                host("b", "eu", 4096, 64),
                host("c", "eu", 65536, 64),
            ],
            vec![vm("a", 3072, 1), vm("c", 3072, 1)],
        )
    }

    #[test]
    fn an_evacuation_preempts_a_rebalance_that_holds_its_room() {
        let mut f = small_b();
        let limits = Limits {
            per_host: 4,
            per_link: 4,
        };
        let mut q = Queue::new(limits);
        q.push(req(1, &f, 0, "b", MigrationReason::Rebalance));
        assert_eq!(q.admit(&mut f).len(), 1);
        // b's room is reserved by the rebalance: the evacuation cancels it
        // and waits for it to roll back.
        q.push(req(2, &f, 1, "b", MigrationReason::Evacuation));
        let mig1 = MigrationId::new("mig-1").unwrap();
        let mig2 = MigrationId::new("mig-2").unwrap();
        assert_eq!(
            q.admit(&mut f),
            [Step::Cancel {
                victim: mig1.clone(),
                for_: mig2.clone()
            }]
        );
        // Not cancelled twice while it rolls back.
        assert!(q.admit(&mut f).is_empty());
        q.end(&mig1, &mut f, false, 9);
        assert_eq!(q.admit(&mut f), [Step::Start(mig2)]);
        assert_eq!(f.vms()[0].host.as_str(), "a", "the rebalanced VM stayed");
    }

    #[test]
    fn a_rebuilt_queue_remembers_what_runs_and_what_was_cancelled() {
        let mut f = small_b();
        let rebalance = req(1, &f, 0, "b", MigrationReason::Rebalance);
        f.start_migration(&rebalance.vm, &rebalance.to).unwrap();
        let evacuation = req(2, &f, 1, "b", MigrationReason::Evacuation);
        // A pass that has not cancelled it yet does.
        let mut q = Queue::new(Limits::default());
        q.resume(rebalance.clone(), None);
        q.push(evacuation.clone());
        assert!(matches!(q.admit(&mut f)[..], [Step::Cancel { .. }]));
        // A later pass that knows it was cancelled waits for it.
        let mut q = Queue::new(Limits::default());
        q.resume(rebalance, Some(evacuation.id.clone()));
        q.push(evacuation);
        assert!(q.admit(&mut f).is_empty());
    }

    #[test]
    fn a_request_against_the_vms_labels_is_refused() {
        let mut f = Fleet::new(
            vec![host("a", "eu", 65536, 64), host("us1", "us", 65536, 64)],
            vec![vm("a", 1024, 1)],
        );
        let mut pinned = f.vms()[0].clone();
        pinned.requires = crate::fleet::tests::eu();
        let mut f2 = Fleet::new(
            vec![host("a", "eu", 65536, 64), host("us1", "us", 65536, 64)],
            vec![pinned],
        );
        let mut q = Queue::new(Limits::default());
        q.push(req(1, &f2, 0, "us1", MigrationReason::Manual));
        let steps = q.admit(&mut f2);
        let [Step::Refuse { error, .. }] = steps.as_slice() else {
            panic!("{steps:?}")
        };
        assert!(error.to_string().contains("region=eu"), "{error}");
        // The unpinned twin may go.
        q.push(req(2, &f, 0, "us1", MigrationReason::Manual));
        assert!(matches!(q.admit(&mut f)[0], Step::Start(_)));
    }
}
