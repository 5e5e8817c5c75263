//! Pure planning of map updates: which service ids, which backend slots, which VIPs change
//! between what is installed and what is desired. No I/O, unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, SERVICE_PORT_WORDS};

use crate::model::{Backend, Frontend, VirtualService};

/// What the maps hold for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Service id (stable for the life of the frontend).
    pub id: u32,
    /// Backends by slot.
    pub slots: Vec<Backend>,
}

/// Every frontend the maps hold.
pub type InstalledSet = BTreeMap<Frontend, Installed>;

/// One write or delete to the maps, in the order it must be applied: backend slots before the
/// service value that makes them reachable, and tail slots deleted after the count shrank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Zero the per-service counters of a (re)used id.
    ResetStats { id: u32 },
    /// Write backend `slot` of service `id`.
    SetBackend {
        id: u32,
        slot: u32,
        backend: Backend,
    },
    /// Write the service value (id and backend count) for `frontend`.
    SetService {
        frontend: Frontend,
        id: u32,
        count: u32,
    },
    /// Delete the service key of `frontend` (new flows stop at once).
    DeleteService { frontend: Frontend },
    /// Delete backend `slot` of service `id`.
    DeleteBackend { id: u32, slot: u32 },
    /// Set the number of services on `vip` (0 deletes it).
    SetVip { vip: Ipv4Addr, services: u32 },
}

/// Why a desired set cannot be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "frontend {0:?} appears twice in the desired services; merge them into one VirtualService"
    )]
    DuplicateFrontend(Frontend),
    #[error(
        "service {frontend:?} has {count} backends, more than the data plane's {MAX_BACKENDS_PER_SERVICE}; reduce its endpoints"
    )]
    TooManyBackends { frontend: Frontend, count: usize },
    #[error("more than {MAX_SERVICES} services; the data plane has no free service id")]
    TooManyServices,
}

/// New slot layout for a service going from `old` slots to the `desired` backends, moving as
/// little as possible: backends that stay keep their slot; new backends fill holes, then are
/// appended; remaining holes are filled by moving the last backend into them.
pub fn plan_slots(old: &[Backend], desired: &[Backend]) -> Vec<Backend> {
    let mut seen = BTreeSet::new();
    let desired: Vec<Backend> = desired
        .iter()
        .copied()
        .filter(|b| seen.insert(*b))
        .collect();
    let wanted: BTreeSet<Backend> = desired.iter().copied().collect();
    let mut slots: Vec<Option<Backend>> = old
        .iter()
        .map(|b| wanted.contains(b).then_some(*b))
        .collect();
    let present: BTreeSet<Backend> = slots.iter().flatten().copied().collect();
    let mut additions = desired.iter().filter(|b| !present.contains(b)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match additions.next() {
            Some(b) => *slot = Some(b),
            None => break,
        }
    }
    slots.extend(additions.map(Some));
    // Fill the remaining holes from the tail.
    loop {
        while matches!(slots.last(), Some(None)) {
            slots.pop();
        }
        let Some(hole) = slots.iter().position(Option::is_none) else {
            break;
        };
        let last = slots.pop().flatten();
        slots[hole] = last;
    }
    slots.into_iter().flatten().collect()
}

/// The operations that take the maps from `installed` to `desired`, and the new installed set.
pub fn plan(
    installed: &InstalledSet,
    desired: &[VirtualService],
) -> Result<(Vec<Op>, InstalledSet), PlanError> {
    let mut wanted: BTreeMap<Frontend, &VirtualService> = BTreeMap::new();
    for service in desired {
        if wanted.insert(service.frontend, service).is_some() {
            return Err(PlanError::DuplicateFrontend(service.frontend));
        }
        if service.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(PlanError::TooManyBackends {
                frontend: service.frontend,
                count: service.backends.len(),
            });
        }
    }
    let mut ops = Vec::new();
    let mut next = InstalledSet::new();
    // Removals first, so their ids are free for additions.
    for (frontend, current) in installed {
        if !wanted.contains_key(frontend) {
            ops.push(Op::DeleteService {
                frontend: *frontend,
            });
            for slot in 0..current.slots.len() as u32 {
                ops.push(Op::DeleteBackend {
                    id: current.id,
                    slot,
                });
            }
        }
    }
    let mut used: BTreeSet<u32> = installed
        .iter()
        .filter(|(f, _)| wanted.contains_key(f))
        .map(|(_, i)| i.id)
        .collect();
    for (frontend, service) in &wanted {
        match installed.get(frontend) {
            Some(current) => {
                let slots = plan_slots(&current.slots, &service.backends);
                for (slot, backend) in slots.iter().enumerate() {
                    if current.slots.get(slot) != Some(backend) {
                        ops.push(Op::SetBackend {
                            id: current.id,
                            slot: slot as u32,
                            backend: *backend,
                        });
                    }
                }
                if slots.len() != current.slots.len() {
                    ops.push(Op::SetService {
                        frontend: *frontend,
                        id: current.id,
                        count: slots.len() as u32,
                    });
                }
                for slot in slots.len()..current.slots.len() {
                    ops.push(Op::DeleteBackend {
                        id: current.id,
                        slot: slot as u32,
                    });
                }
                next.insert(
                    *frontend,
                    Installed {
                        id: current.id,
                        slots,
                    },
                );
            }
            None => {
                let id = (0..MAX_SERVICES)
                    .find(|id| !used.contains(id))
                    .ok_or(PlanError::TooManyServices)?;
                used.insert(id);
                let slots = plan_slots(&[], &service.backends);
                ops.push(Op::ResetStats { id });
                for (slot, backend) in slots.iter().enumerate() {
                    ops.push(Op::SetBackend {
                        id,
                        slot: slot as u32,
                        backend: *backend,
                    });
                }
                ops.push(Op::SetService {
                    frontend: *frontend,
                    id,
                    count: slots.len() as u32,
                });
                next.insert(*frontend, Installed { id, slots });
            }
        }
    }
    let vip_counts = |set: &InstalledSet| {
        let mut counts: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for frontend in set.keys() {
            *counts.entry(frontend.vip).or_default() += 1;
        }
        counts
    };
    let (before, after) = (vip_counts(installed), vip_counts(&next));
    for vip in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let (b, a) = (
            before.get(vip).copied().unwrap_or(0),
            after.get(vip).copied().unwrap_or(0),
        );
        if a != b {
            ops.push(Op::SetVip {
                vip: *vip,
                services: a,
            });
        }
    }
    Ok((ops, next))
}

/// The words of `XLB_SERVICE_PORTS` for `installed`: bit `port % 64` of word `port / 64` set
/// for every frontend's port.
pub fn service_port_words(installed: &InstalledSet) -> Vec<u64> {
    let mut words = vec![0u64; SERVICE_PORT_WORDS as usize];
    for frontend in installed.keys() {
        words[usize::from(frontend.port / 64)] |= 1 << (frontend.port % 64);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn be(n: u8) -> Backend {
        Backend {
            ip: Ipv4Addr::new(203, 0, 113, n),
            port: 30080,
        }
    }

    fn fe(n: u8) -> Frontend {
        Frontend {
            vip: Ipv4Addr::new(198, 51, 100, n),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn vs(f: Frontend, backends: &[Backend]) -> VirtualService {
        VirtualService {
            frontend: f,
            backends: backends.to_vec(),
            owner: "default/web".into(),
        }
    }

    #[test]
    fn unchanged_backends_keep_their_slots() {
        assert_eq!(
            plan_slots(&[be(1), be(2), be(3)], &[be(3), be(1), be(2)]),
            vec![be(1), be(2), be(3)]
        );
    }

    #[test]
    fn removed_backend_hole_is_filled_by_the_last() {
        assert_eq!(
            plan_slots(&[be(1), be(2), be(3), be(4)], &[be(1), be(3), be(4)]),
            vec![be(1), be(4), be(3)]
        );
    }

    #[test]
    fn new_backend_fills_a_hole_first() {
        assert_eq!(
            plan_slots(&[be(1), be(2), be(3)], &[be(1), be(5), be(3)]),
            vec![be(1), be(5), be(3)]
        );
        assert_eq!(
            plan_slots(&[be(1)], &[be(1), be(2), be(2)]),
            vec![be(1), be(2)]
        );
    }

    #[test]
    fn applying_the_same_set_twice_changes_nothing() {
        let desired = [vs(fe(1), &[be(1), be(2)]), vs(fe(2), &[be(3)])];
        let (ops, installed) = plan(&InstalledSet::new(), &desired).unwrap();
        assert!(ops.contains(&Op::SetService {
            frontend: fe(1),
            id: 0,
            count: 2
        }));
        assert!(ops.contains(&Op::SetService {
            frontend: fe(2),
            id: 1,
            count: 1
        }));
        let (ops, again) = plan(&installed, &desired).unwrap();
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(again, installed);
    }

    #[test]
    fn removing_a_backend_writes_one_slot_and_the_count() {
        let (_, installed) =
            plan(&InstalledSet::new(), &[vs(fe(1), &[be(1), be(2), be(3)])]).unwrap();
        let (ops, _) = plan(&installed, &[vs(fe(1), &[be(1), be(3)])]).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::SetBackend {
                    id: 0,
                    slot: 1,
                    backend: be(3)
                },
                Op::SetService {
                    frontend: fe(1),
                    id: 0,
                    count: 2
                },
                Op::DeleteBackend { id: 0, slot: 2 },
            ]
        );
    }

    #[test]
    fn ids_are_stable_and_reused_after_removal() {
        let (_, installed) = plan(
            &InstalledSet::new(),
            &[vs(fe(1), &[be(1)]), vs(fe(2), &[be(2)])],
        )
        .unwrap();
        let (ops, installed) = plan(&installed, &[vs(fe(2), &[be(2)])]).unwrap();
        assert!(ops.contains(&Op::DeleteService { frontend: fe(1) }));
        assert!(ops.contains(&Op::SetVip {
            vip: fe(1).vip,
            services: 0
        }));
        assert_eq!(installed[&fe(2)].id, 1);
        let (_, installed) = plan(&installed, &[vs(fe(2), &[be(2)]), vs(fe(3), &[be(2)])]).unwrap();
        assert_eq!(installed[&fe(2)].id, 1);
        assert_eq!(installed[&fe(3)].id, 0);
    }

    #[test]
    fn duplicate_frontends_are_refused() {
        let err = plan(
            &InstalledSet::new(),
            &[vs(fe(1), &[be(1)]), vs(fe(1), &[be(2)])],
        )
        .unwrap_err();
        assert_eq!(err, PlanError::DuplicateFrontend(fe(1)));
    }

    #[test]
    fn service_port_words_set_one_bit_a_port() {
        let (_, installed) = plan(&InstalledSet::new(), &[vs(fe(1), &[be(1)])]).unwrap();
        let port = fe(1).port;
        let words = service_port_words(&installed);
        assert_eq!(words.len(), SERVICE_PORT_WORDS as usize);
        assert_eq!(words[usize::from(port / 64)], 1 << (port % 64));
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
        assert!(
            service_port_words(&InstalledSet::new())
                .iter()
                .all(|w| *w == 0)
        );
    }
}
