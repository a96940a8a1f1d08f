//! Which VMs should move where: the policy trait, the default load
//! balancer, and draining a host.

use crate::fleet::{Fleet, PlaceError};
use std::collections::HashMap;
use tern_proto::{HostId, HostState, MigrationReason, VmId};

/// One migration a policy asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The VM.
    pub vm: VmId,
    /// Where it runs.
    pub from: HostId,
    /// Where it should go.
    pub to: HostId,
    /// Why (its priority in the queue).
    pub reason: MigrationReason,
}

/// Decides which VMs should move where. Runs on a copy of the fleet: the
/// plans it returns already reserve their targets' room there, so one pass
/// never sends two VMs into the same last gap.
pub trait Policy: Send + Sync {
    /// The migrations to queue now (`now`: seconds on the caller's clock).
    fn plan(&self, fleet: &Fleet, now: u64) -> Vec<Plan>;
}

/// The default policy: a host whose pressure (memory or vCPUs allocated,
/// or its cores' busy fraction) is above `threshold` sheds VMs to the least
/// loaded hosts that fit them, until it is back under; a target is only
/// chosen if it stays `margin` below the threshold afterwards, so load is
/// never just passed along. A VM that moved less than `cooldown_secs` ago
/// stays, and no host takes part in more than `max_per_host` migrations.
#[derive(Clone, Debug)]
pub struct LoadBalance {
    /// Pressure above which a host sheds VMs (0.85: 85 %).
    pub threshold: f64,
    /// How far under the threshold a target must stay.
    pub margin: f64,
    /// Seconds a VM stays put after it moved.
    pub cooldown_secs: u64,
    /// Migrations one host takes part in at once.
    pub max_per_host: u32,
}

impl Default for LoadBalance {
    fn default() -> Self {
        Self {
            threshold: 0.85,
            margin: 0.10,
            cooldown_secs: 600,
            max_per_host: 2,
        }
    }
}

impl Policy for LoadBalance {
    fn plan(&self, fleet: &Fleet, now: u64) -> Vec<Plan> {
        let mut f = fleet.clone();
        let mut hot: Vec<(f64, HostId)> = f
            .hosts()
            .filter(|h| h.state == HostState::Active)
            .map(|h| (f.pressure_settled(&h.id), h.id.clone()))
            .filter(|(p, _)| *p > self.threshold)
            .collect();
        hot.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut pass = Pass {
            f: &mut f,
            planned: HashMap::new(),
            plans: Vec::new(),
        };
        for (_, host) in hot {
            self.shed(&mut pass, &host, now);
        }
        pass.plans
    }
}

/// One balancing pass over a working copy of the fleet, where every
/// planned move is applied at once so later decisions see it.
struct Pass<'a> {
    f: &'a mut Fleet,
    /// Moves planned per host (either end) in this pass.
    planned: HashMap<HostId, u32>,
    plans: Vec<Plan>,
}

impl Pass<'_> {
    /// Migrations `host` takes part in, running and planned.
    fn busy(&self, host: &HostId) -> u32 {
        self.f.migrations_at(host) + self.planned.get(host).copied().unwrap_or(0)
    }
}

impl LoadBalance {
    /// Moves VMs off `host` until it is under the threshold, it reached
    /// its migration limit, or nothing fits anywhere.
    fn shed(&self, pass: &mut Pass<'_>, host: &HostId, now: u64) {
        // Biggest first: fewest moves to get under the threshold.
        let mut candidates: Vec<(u64, VmId)> = pass
            .f
            .vms_on(host)
            .filter(|v| !v.migrating)
            .filter(|v| {
                v.last_moved
                    .is_none_or(|t| now.saturating_sub(t) >= self.cooldown_secs)
            })
            .map(|v| (v.demand.memory_mib, v.id))
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let limit = self.threshold - self.margin;
        for (_, vm) in candidates {
            if pass.f.pressure_settled(host) <= self.threshold
                || pass.busy(host) >= self.max_per_host
            {
                return;
            }
            let Ok(to) = pass.f.target_for_move(&vm, limit) else {
                continue;
            };
            if pass.busy(&to) >= self.max_per_host || pass.f.start_migration(&vm, &to).is_err() {
                continue;
            }
            pass.f.end_migration(&vm, &to, true, now);
            *pass.planned.entry(host.clone()).or_default() += 1;
            *pass.planned.entry(to.clone()).or_default() += 1;
            pass.plans.push(Plan {
                vm,
                from: host.clone(),
                to,
                reason: MigrationReason::Rebalance,
            });
        }
    }
}

/// Plans moving every VM off `host` (which the caller marks draining or
/// down first, so nothing lands on it): each to the least loaded host with
/// room and the labels it requires. A VM that fits nowhere is returned
/// with the reason, and stays.
pub fn drain(
    fleet: &Fleet,
    host: &HostId,
    reason: MigrationReason,
) -> (Vec<Plan>, Vec<(VmId, PlaceError)>) {
    let mut f = fleet.clone();
    let vms: Vec<VmId> = f
        .vms_on(host)
        .filter(|v| !v.migrating)
        .map(|v| v.id)
        .collect();
    let (mut plans, mut stuck) = (Vec::new(), Vec::new());
    for vm in vms {
        match f
            .target_for_move(&vm, f64::INFINITY)
            .and_then(|to| f.start_migration(&vm, &to).map(|()| to))
        {
            Ok(to) => plans.push(Plan {
                vm,
                from: host.clone(),
                to,
                reason,
            }),
            Err(e) => stuck.push((vm, e)),
        }
    }
    (plans, stuck)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::tests::{eu, host, vm};
    use crate::fleet::Vm;

    fn pinned(mut v: Vm) -> Vm {
        v.requires = eu();
        v
    }

    #[test]
    fn a_hot_host_sheds_to_the_least_loaded_hosts_that_fit() {
        // a: 90 % of memory allocated; b idle; c nearly full.
        let vms = vec![
            vm("a", 4096, 1),
            vm("a", 2048, 1),
            vm("a", 1024, 1),
            vm("a", 2048, 1),
            vm("c", 7000, 1),
        ];
        let f = Fleet::new(
            vec![
                host("a", "eu", 10240, 16),
                host("b", "eu", 8192, 16),
                host("c", "eu", 8192, 16),
            ],
            vms,
        );
        let plans = LoadBalance::default().plan(&f, 1000);
        assert!(!plans.is_empty());
        for p in &plans {
            assert_eq!(p.from.as_str(), "a");
            assert_eq!(p.to.as_str(), "b", "c is nearly full");
            assert_eq!(p.reason, MigrationReason::Rebalance);
        }
    }

    #[test]
    fn load_already_leaving_is_not_shed_twice() {
        // a: 4 x 1000 of 4096 MiB (98 %); one VM is on its way to b.
        let vms: Vec<Vm> = (0..4).map(|_| vm("a", 1000, 1)).collect();
        let leaving = vms[0].id;
        let mut f = Fleet::new(
            vec![host("a", "eu", 4096, 16), host("b", "eu", 4096, 16)],
            vms,
        );
        f.start_migration(&leaving, &HostId::new("b").unwrap())
            .unwrap();
        assert!(
            LoadBalance::default().plan(&f, 1000).is_empty(),
            "a is at 73 % once the move in flight commits"
        );
    }

    #[test]
    fn pinned_vms_never_leave_their_region_and_cooldowns_hold() {
        let mut moved = vm("a", 4096, 1);
        moved.last_moved = Some(900);
        let vms = vec![pinned(vm("a", 4096, 1)), moved];
        let f = Fleet::new(
            vec![host("a", "eu", 8192, 16), host("us1", "us", 65536, 64)],
            vms,
        );
        // The pinned VM has nowhere in its region to go; the other moved
        // 100 s ago (cooldown 600 s).
        assert!(LoadBalance::default().plan(&f, 1000).is_empty());
        let later = LoadBalance::default().plan(&f, 2000);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].to.as_str(), "us1");
        assert!(f.vm(&later[0].vm).unwrap().requires.is_empty());
    }

    #[test]
    fn draining_moves_everything_that_fits_and_says_what_does_not() {
        let vms = vec![pinned(vm("a", 2048, 2)), vm("a", 2048, 2), vm("a", 9000, 2)];
        let mut f = Fleet::new(
            vec![
                host("a", "eu", 16384, 16),
                host("b", "eu", 4096, 16),
                host("us1", "us", 4096, 16),
            ],
            vms,
        );
        let a = HostId::new("a").unwrap();
        f.set_state(&a, HostState::Draining);
        let (plans, stuck) = drain(&f, &a, MigrationReason::Maintenance);
        assert_eq!(plans.len(), 2);
        assert_eq!(stuck.len(), 1);
        assert!(matches!(stuck[0].1, PlaceError::NoRoom { .. }));
        let pinned_plan = plans
            .iter()
            .find(|p| !f.vm(&p.vm).unwrap().requires.is_empty())
            .unwrap();
        assert_eq!(pinned_plan.to.as_str(), "b");
    }
}
