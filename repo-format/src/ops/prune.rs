//! Retention: plan which snapshots go (per agent and source), then apply the plan.

use chrono::{DateTime, TimeZone, Utc};

use crate::error::Result;
use crate::id::Id;
use crate::repofile::snapshot::Snapshot;
use crate::repository::Repository;
use crate::retention::{self, Policy, Reason};

/// One snapshot's fate.
#[derive(Clone, Debug)]
pub struct Decision {
    /// The snapshot.
    pub id: Id,
    /// Its content.
    pub snapshot: Snapshot,
    /// Why it stays, or `None` if it goes.
    pub keep: Option<Reason>,
}

/// The decision for every snapshot, grouped by (agent, source), each group oldest first.
pub fn plan<Tz: TimeZone>(repo: &Repository, policy: &Policy, now: DateTime<Utc>, tz: &Tz) -> Result<Vec<Decision>> {
    plan_each(repo, &|_, _| Some(policy.clone()), now, tz)
}

/// The same with a policy per group: `policy_for(agent, source)`; a group without one keeps
/// every snapshot.
pub fn plan_each<Tz: TimeZone>(
    repo: &Repository,
    policy_for: &dyn Fn(&str, &str) -> Option<Policy>,
    now: DateTime<Utc>,
    tz: &Tz,
) -> Result<Vec<Decision>> {
    let mut snaps = repo.snapshots()?;
    snaps.sort_by(|a, b| a.1.group().cmp(&b.1.group()).then(a.1.time_ns.cmp(&b.1.time_ns)));
    let mut out = Vec::with_capacity(snaps.len());
    for group in snaps.chunk_by(|a, b| a.1.group() == b.1.group()) {
        let Some(policy) = policy_for(&group[0].1.agent, &group[0].1.source) else {
            out.extend(group.iter().map(|(id, s)| Decision {
                id: *id,
                snapshot: s.clone(),
                keep: Some(Reason { rule: "no policy".into(), n: 0 }),
            }));
            continue;
        };
        let times: Vec<DateTime<Utc>> = group.iter().map(|(_, s)| s.time()).collect();
        for ((id, s), keep) in group.iter().zip(retention::plan(&times, &policy, now, tz)) {
            out.push(Decision { id: *id, snapshot: s.clone(), keep });
        }
    }
    Ok(out)
}

/// Remove the snapshots the plan lets go; returns how many. Their data stays until `compact`.
pub fn apply(repo: &Repository, plan: &[Decision]) -> Result<usize> {
    let mut n = 0;
    for d in plan.iter().filter(|d| d.keep.is_none()) {
        repo.delete_snapshot(&d.id)?;
        n += 1;
    }
    Ok(n)
}
