//! Simulated fleets for benchmarks and tests: hosts of a few sizes in two
//! regions, VMs of a few shapes (a tenth pinned to a region), and skewed
//! load so a rebalancing pass has work to do.

use crate::fleet::{Demand, Fleet, Host, Vm};
use tern_proto::{Capacity, HostId, HostLoad, HostState, Labels, VmId};

/// A small deterministic generator (xorshift64*), so runs compare.
pub struct Rng(u64);

impl Rng {
    /// Seeded (0 is replaced: xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn region(i: u64) -> Labels {
    let r = if i.is_multiple_of(2) { "eu" } else { "us" };
    [("region".to_string(), r.to_string())].into()
}

/// `n` hosts: 256 or 512 GiB, 64 or 128 vCPUs, half in each region, all
/// lightly loaded (see [`heat`]).
pub fn hosts(n: usize, rng: &mut Rng) -> Vec<Host> {
    (0..n as u64)
        .map(|i| {
            let big = rng.below(2) == 1;
            Host {
                id: HostId::new(format!("host-{i}")).expect("valid"),
                state: HostState::Active,
                labels: region(i),
                capacity: Capacity {
                    memory_mib: if big { 512 << 10 } else { 256 << 10 },
                    vcpus: if big { 128 } else { 64 },
                },
                load: HostLoad {
                    cpu: 0.2,
                    ..HostLoad::default()
                },
            }
        })
        .collect()
}

/// A VM shape: 1-16 GiB, 1-4 vCPUs; one in ten pinned to a region.
pub fn demand(rng: &mut Rng) -> (Demand, Labels) {
    let memory_mib = 1024 << rng.below(5);
    let vcpus = 1 << rng.below(3);
    let requires = if rng.below(10) == 0 {
        region(rng.below(2))
    } else {
        Labels::new()
    };
    (Demand { memory_mib, vcpus }, requires)
}

/// Places `vms` VMs one by one into `fleet`; returns how many found no room.
pub fn fill(fleet: &mut Fleet, vms: usize, rng: &mut Rng) -> usize {
    let mut refused = 0;
    for _ in 0..vms {
        let (d, requires) = demand(rng);
        match fleet.place(d, &requires) {
            Ok(host) => fleet.add_vm(Vm {
                id: VmId::new(),
                host,
                demand: d,
                requires,
                migrating: false,
                last_moved: None,
            }),
            Err(_) => refused += 1,
        }
    }
    refused
}

/// Makes one host in ten busy (its cores 95 % used, as its heartbeat
/// would say once its VMs got busy); returns how many.
pub fn heat(fleet: &mut Fleet, rng: &mut Rng) -> usize {
    let ids: Vec<HostId> = fleet.hosts().map(|h| h.id.clone()).collect();
    let mut n = 0;
    for id in ids {
        if rng.below(10) == 0 {
            let load = HostLoad {
                cpu: 0.95,
                ..fleet.host(&id).expect("listed").load
            };
            fleet.set_load(&id, load);
            n += 1;
        }
    }
    n
}

/// Whether every host holds no more than its capacity (VMs and
/// reservations) and every VM runs on a host with the labels it requires.
pub fn check(fleet: &Fleet) -> Result<(), String> {
    for h in fleet.hosts() {
        let (used, reserved) = fleet.usage(&h.id).expect("known host");
        if used.memory_mib + reserved.memory_mib > h.capacity.memory_mib
            || used.vcpus + reserved.vcpus > h.capacity.vcpus
        {
            return Err(format!("{} over capacity: {used:?} + {reserved:?}", h.id));
        }
    }
    for v in fleet.vms() {
        let h = fleet.host(&v.host).ok_or(format!("{} on no host", v.id))?;
        if !tern_proto::labels_satisfy(&h.labels, &v.requires) {
            return Err(format!("{} on {} against its labels", v.id, h.id));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LoadBalance, Policy};
    use proptest::prelude::*;

    /// Applies a policy's plans as completed migrations.
    fn apply(f: &mut Fleet, plans: &[crate::Plan]) {
        for p in plans {
            f.start_migration(&p.vm, &p.to).expect("a plan fits");
            f.end_migration(&p.vm, &p.to, true, 1);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn placement_and_rebalancing_never_overfill_or_break_labels(
            seed: u64, hosts_n in 1usize..40, vms_n in 0usize..800,
        ) {
            let mut rng = super::Rng::new(seed);
            let mut f = Fleet::new(hosts(hosts_n, &mut rng), Vec::new());
            fill(&mut f, vms_n, &mut rng);
            heat(&mut f, &mut rng);
            prop_assert_eq!(check(&f), Ok(()));
            let plans = LoadBalance::default().plan(&f, 10_000);
            apply(&mut f, &plans);
            prop_assert_eq!(check(&f), Ok(()));
            for p in &plans {
                prop_assert_ne!(&p.from, &p.to);
            }
        }
    }

    #[test]
    #[ignore = "slow in debug builds: 1,000 hosts, 20,000 VMs (the bench times it)"]
    fn a_thousand_hosts_and_twenty_thousand_vms_stay_within_capacity() {
        let mut rng = super::Rng::new(7);
        let mut f = Fleet::new(hosts(1000, &mut rng), Vec::new());
        assert_eq!(fill(&mut f, 20_000, &mut rng), 0);
        assert!(heat(&mut f, &mut rng) > 0);
        let plans = LoadBalance::default().plan(&f, 10_000);
        assert!(!plans.is_empty(), "a tenth of the hosts run hot");
        apply(&mut f, &plans);
        check(&f).unwrap();
    }
}
