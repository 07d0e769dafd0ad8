//! Router v1: which pipeline runs each fragment of a query.
//!
//! Owns: the choice among a shard's replicas, and the reason for it. Pure: no IO, no
//! clock, no locks; its input is a [`LoadSnapshot`] taken by the caller. Must never:
//! pick a pipeline that does not hold the shard, or a pipeline the caller excluded
//! (one that already failed this fragment).
//!
//! v1 rule: the replica with the fewest requests in flight (running + queued), ties
//! broken by the shard map's preference order (highest affinity first), which spreads
//! ties across pipelines instead of always picking the lowest id. A query's fragments
//! are routed one after another against a private copy of the snapshot that counts the
//! query's own earlier picks, so one query's fragments spread out as well.
//! The snapshot already carries `predicted` load and a feedback `weight` per pipeline;
//! the predictive balancer (later issue) fills them and changes only [`score`].

use crate::shard_map::{PipelineId, ShardId, ShardMap};

/// The load of one pipeline as the router sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PipelineLoad {
    pub id: PipelineId,
    /// Fragments the pipeline runs at once.
    pub slots: u32,
    pub in_flight: u32,
    pub queued: u32,
    /// Forecast load (requests per bucket); 0 until the balancer fills it.
    pub predicted: f64,
    /// Feedback weight from observed latency; 1.0 = nominal.
    pub weight: f64,
    /// False when the pipeline is known to be down (its node unreachable).
    pub available: bool,
}

impl PipelineLoad {
    pub fn idle(id: PipelineId, slots: u32) -> PipelineLoad {
        PipelineLoad { id, slots, in_flight: 0, queued: 0, predicted: 0.0, weight: 1.0, available: true }
    }
}

/// Every pipeline's load at one instant, sorted by id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSnapshot {
    loads: Vec<PipelineLoad>,
}

impl LoadSnapshot {
    pub fn new(mut loads: Vec<PipelineLoad>) -> LoadSnapshot {
        loads.sort_by_key(|l| l.id);
        loads.dedup_by_key(|l| l.id);
        LoadSnapshot { loads }
    }

    pub fn get(&self, id: PipelineId) -> Option<&PipelineLoad> {
        self.loads.binary_search_by_key(&id, |l| l.id).ok().map(|i| &self.loads[i])
    }

    fn get_mut(&mut self, id: PipelineId) -> Option<&mut PipelineLoad> {
        self.loads.binary_search_by_key(&id, |l| l.id).ok().map(|i| &mut self.loads[i])
    }
}

/// Why the router chose what it chose (shown by EXPLAIN and system.routing_decisions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    OnlyReplica,
    FewestInFlight,
    /// Several replicas had the fewest; the shard map's preference decided.
    TieByPreference,
    /// No replica is available (none placed, all down or excluded).
    NoReplica,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OnlyReplica => "only replica",
            Reason::FewestInFlight => "fewest in flight",
            Reason::TieByPreference => "tie, shard-map preference",
            Reason::NoReplica => "no replica available",
        }
    }
}

/// One candidate as it was scored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub id: PipelineId,
    pub in_flight: u32,
    pub queued: u32,
    pub score: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub shard: ShardId,
    pub choice: Option<PipelineId>,
    /// In shard-map preference order.
    pub candidates: Vec<Candidate>,
    pub reason: Reason,
}

/// Lower is better. v1: requests in flight (running + queued).
pub fn score(load: &PipelineLoad) -> f64 {
    (load.in_flight + load.queued) as f64
}

/// Chooses among `replicas` (preference order) for `shard`, skipping `excluded`
/// pipelines and pipelines that are unavailable or missing from the snapshot.
pub fn route(shard: ShardId, replicas: &[PipelineId], snapshot: &LoadSnapshot, excluded: &[PipelineId]) -> Decision {
    let mut candidates = Vec::with_capacity(replicas.len());
    let mut best: Option<(f64, usize)> = None;
    let mut ties = 0;
    for id in replicas {
        let Some(load) = snapshot.get(*id) else { continue };
        if !load.available || excluded.contains(id) {
            continue;
        }
        let s = score(load);
        candidates.push(Candidate { id: *id, in_flight: load.in_flight, queued: load.queued, score: s });
        match best {
            Some((b, _)) if s > b => {}
            Some((b, _)) if s == b => ties += 1,
            _ => {
                best = Some((s, candidates.len() - 1));
                ties = 0;
            }
        }
    }
    let (choice, reason) = match best {
        None => (None, Reason::NoReplica),
        Some((_, i)) if candidates.len() == 1 => (Some(candidates[i].id), Reason::OnlyReplica),
        Some((_, i)) if ties > 0 => (Some(candidates[i].id), Reason::TieByPreference),
        Some((_, i)) => (Some(candidates[i].id), Reason::FewestInFlight),
    };
    Decision { shard, choice, candidates, reason }
}

/// Routes one query's fragments (one per shard, in the given order), counting each
/// pick as one more request in flight for the picks that follow.
pub fn route_all(shards: &[ShardId], map: &ShardMap, snapshot: &LoadSnapshot) -> Vec<Decision> {
    let mut view = snapshot.clone();
    shards
        .iter()
        .map(|s| {
            let d = route(*s, map.replicas_of(*s), &view, &[]);
            if let Some(l) = d.choice.and_then(|c| view.get_mut(c)) {
                l.in_flight += 1;
            }
            d
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_loads(words: &[&str]) -> LoadSnapshot {
        LoadSnapshot::new(
            words
                .iter()
                .map(|w| {
                    // id=in_flight[+queued][!down]
                    let (id, rest) = w.split_once('=').expect("id=load");
                    let down = rest.ends_with('!');
                    let rest = rest.trim_end_matches('!');
                    let (f, q) = rest.split_once('+').unwrap_or((rest, "0"));
                    let mut l = PipelineLoad::idle(id.parse().unwrap(), 4);
                    l.in_flight = f.parse().unwrap();
                    l.queued = q.parse().unwrap();
                    l.available = !down;
                    l
                })
                .collect(),
        )
    }

    /// `testdata/router.txt`: `loads ...` sets the snapshot; `route REPLICAS [- EXCLUDED]
    /// => CHOICE REASON` checks one decision.
    #[test]
    fn router_fixture() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/router.txt")).unwrap();
        let mut snapshot = LoadSnapshot::default();
        let mut checked = 0;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[0] {
                "loads" => snapshot = parse_loads(&words[1..]),
                "route" => {
                    let (lhs, rhs) = line["route".len()..].split_once("=>").expect("=>");
                    let (reps, excl) = lhs.split_once(" - ").unwrap_or((lhs, ""));
                    let ids = |s: &str| s.split_whitespace().map(|p| p.parse::<PipelineId>().unwrap()).collect::<Vec<_>>();
                    let d = route(7, &ids(reps), &snapshot, &ids(excl));
                    let (want_choice, want_reason) = rhs.trim().split_once(' ').expect("choice reason");
                    let got_choice = d.choice.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
                    assert_eq!((got_choice.as_str(), d.reason.as_str()), (want_choice, want_reason.trim()), "line {}: {line}", n + 1);
                    checked += 1;
                }
                other => panic!("line {}: unknown directive {other}", n + 1),
            }
        }
        assert!(checked >= 6);
    }

    #[test]
    fn a_query_spreads_its_own_fragments() {
        let pipes: Vec<PipelineId> = (0..4).map(|i| PipelineId::new(1, i)).collect();
        let map = ShardMap::build(8, 4, &pipes);
        let snap = LoadSnapshot::new(pipes.iter().map(|p| PipelineLoad::idle(*p, 4)).collect());
        let shards: Vec<ShardId> = (0..8).collect();
        let decisions = route_all(&shards, &map, &snap);
        let mut per = std::collections::BTreeMap::new();
        for d in &decisions {
            *per.entry(d.choice.unwrap()).or_insert(0) += 1;
        }
        assert_eq!(per.len(), 4, "{per:?}");
        assert!(per.values().all(|c| *c == 2), "{per:?}");
    }
}
