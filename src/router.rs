//! The router: which pipeline runs each fragment of a query.
//!
//! Owns: the choice among a shard's replicas under a routing [`Policy`], and the reason
//! for it. Pure and deterministic: no IO, no clock, no locks, no hidden randomness; its
//! input is a [`LoadSnapshot`] taken by the caller (live counters, the balancer's learned
//! weights, the forecaster's predicted rates) and a sequence number that stands in for
//! randomness (round robin, power of two). Must never: pick a pipeline that does not
//! hold the shard, or a pipeline the caller excluded (one that already failed this
//! fragment), or an unavailable one.
//!
//! # Policies
//! - `round_robin`: the replicas in turn (the sequence number modulo their count).
//! - `least_in_flight` (the default): the fewest requests in flight (running + queued); ties by the
//!   shard map's preference order (highest affinity first), which spreads ties.
//! - `power_of_two`: two replicas drawn from the sequence number, the one with fewer
//!   in flight (Mitzenmacher's two choices).
//! - `predictive`: the lowest predicted completion time, below; near-equal scores
//!   (within [`TIE_TOLERANCE`]) are a tie, and one of the tied replicas is drawn from
//!   the sequence number. Drawn rather than by preference: with several gateways, a
//!   tie broken the same way everywhere sends every gateway's request to one replica
//!   at once (each sees only its own requests there). See the README for how it
//!   compares with the others in `tidemark simulate` and on a real node.
//!
//! # The predictive score
//! For a candidate pipeline `p` with `c` slots, `n` requests in flight or queued, a
//! learned service-time weight `w` (its recent service time over the fleet's median,
//! from `balancer`), a forecast arrival rate `λ` (fragments per second the forecaster
//! expects at `p` in the current bucket) and the fragment's expected service time `S`
//! (seconds, the fleet's median service time times `w`), of which a share `u` arrives
//! where this gateway's live counts do not show it:
//!
//! ```text
//! live     = n                     requests already there (as this gateway sees them)
//! forecast = t · u · λ · S         requests expected while this one runs, unseen here
//! score    = w · (1 + (live + forecast) / c)
//! ```
//!
//! `score` is the fragment's expected completion time in units of the median service
//! time: a pipeline sharing its `c` slots among `k` requests finishes each in about
//! `S · max(1, k/c)`; the smooth form `S · (1 + k/c)` keeps preferring the emptier of
//! two pipelines below saturation (as join-the-shortest-queue does) and multiplies by
//! the pipeline's own service time, so a pipeline that runs slower (a noisy neighbour,
//! a cold cache, a slow disk) is given less in proportion, as C3 does with its
//! service-time estimate. The forecast term adds the load that will arrive during the
//! fragment and that this gateway cannot see: other gateways' fragments (a node's live
//! counts of a peer's pipeline are its own requests only). What passes through the
//! gateway is left out (`u = 0` for a pipeline of this node, whose counters every
//! gateway's fragments move, and for a single gateway), because the router sees it in
//! `n`; counting it again is a static bias against busy pipelines. Two other ways were
//! tried in `tidemark simulate` and lost to `least_in_flight`: the whole forecast
//! (`u = 1`, the bias) and the forecast beyond the gateway's own measured rate (a
//! pipeline that got less than its forecast share looked busier, got less still: a
//! positive feedback). With `g` gateways `u = (g−1)/g` of the total forecast (the
//! simulation), or on a node, for a peer's pipeline, the number of peers times this
//! node's own forecast there (other gateways assumed alike).
//!
//! `t` is the trust in that pipeline's forecast: 1 when `system.forecast_accuracy`
//! shows its next-bucket forecasts beating weekly seasonal naive, 0 otherwise (no
//! forecast yet, too few points, or worse than naive). With `t = 0` and `w = 1` the
//! score is ordered as `least_in_flight`, so predictive routing degrades to a sound
//! reactive policy when forecasts are missing or wrong, and to join-the-shortest-queue
//! weighted by service time when only the feedback is known.

use crate::shard_map::{PipelineId, ShardId, ShardMap};

/// How the router chooses among a shard's replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    RoundRobin,
    /// The default until predictive routing wins the comparison (`tidemark simulate`).
    #[default]
    LeastInFlight,
    PowerOfTwo,
    Predictive,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::RoundRobin, Policy::LeastInFlight, Policy::PowerOfTwo, Policy::Predictive];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastInFlight => "least_in_flight",
            Policy::PowerOfTwo => "power_of_two",
            Policy::Predictive => "predictive",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// The load of one pipeline as the router sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PipelineLoad {
    pub id: PipelineId,
    /// Fragments the pipeline runs at once.
    pub slots: u32,
    pub in_flight: u32,
    pub queued: u32,
    /// Forecast fragment arrivals per second at this pipeline now (0 when unknown).
    pub forecast_rate: f64,
    /// Trust in that forecast: 1 when it beats seasonal naive, else 0.
    pub forecast_trust: f64,
    /// How much of the forecast arrives where this gateway's live counts do not show
    /// it: 0 when every request to the pipeline passes through here (one gateway, or
    /// a pipeline of this node), `(g−1)/g` when `g` gateways share the forecast load
    /// and each sees its own; 1 (the default) counts the whole forecast.
    pub unseen: f64,
    /// Learned service-time weight (this pipeline's service time over the fleet's
    /// median); 1.0 = nominal.
    pub weight: f64,
    /// The fleet's median service time of one fragment, in seconds (0 when unknown).
    pub service_s: f64,
    /// False when the pipeline is known to be down (its node unreachable).
    pub available: bool,
}

impl PipelineLoad {
    pub fn idle(id: PipelineId, slots: u32) -> PipelineLoad {
        PipelineLoad {
            id,
            slots,
            in_flight: 0,
            queued: 0,
            forecast_rate: 0.0,
            forecast_trust: 0.0,
            unseen: 1.0,
            weight: 1.0,
            service_s: 0.0,
            available: true,
        }
    }

    /// Requests there now (running + queued).
    pub fn live(&self) -> f64 {
        (self.in_flight + self.queued) as f64
    }

    /// Requests expected to arrive while one more fragment runs here and that this
    /// gateway does not see (trusted forecasts only).
    pub fn forecast_part(&self) -> f64 {
        self.forecast_trust * self.unseen.max(0.0) * self.forecast_rate.max(0.0) * self.service_s.max(0.0) * self.weight
    }

    /// The predictive score (see the module docs): expected completion time in units of
    /// the fleet's median service time.
    pub fn predicted_score(&self) -> f64 {
        self.weight * (1.0 + (self.live() + self.forecast_part()) / self.slots.max(1) as f64)
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

    pub fn get_mut(&mut self, id: PipelineId) -> Option<&mut PipelineLoad> {
        self.loads.binary_search_by_key(&id, |l| l.id).ok().map(|i| &mut self.loads[i])
    }

    pub fn loads(&self) -> &[PipelineLoad] {
        &self.loads
    }

    /// Every load, in id order, to change in place (the ids stay).
    pub fn loads_mut(&mut self) -> &mut [PipelineLoad] {
        &mut self.loads
    }
}

/// Predictive scores within this fraction of the best one (of 1, when the best is
/// below 1) are ties.
pub const TIE_TOLERANCE: f64 = 1e-9;

/// Why the router chose what it chose (shown by EXPLAIN and system.routing_decisions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    OnlyReplica,
    FewestInFlight,
    /// Several replicas had the best score; the shard map's preference decided.
    TieByPreference,
    RoundRobin,
    /// The fewer in flight of two drawn replicas.
    PowerOfTwo,
    /// The lowest predicted completion time.
    LowestPredicted,
    /// Several replicas had the lowest predicted completion time (within
    /// [`TIE_TOLERANCE`]); one was drawn from the sequence number.
    TieDrawn,
    /// No replica is available (none placed, all down or excluded).
    NoReplica,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OnlyReplica => "only replica",
            Reason::FewestInFlight => "fewest in flight",
            Reason::TieByPreference => "tie, shard-map preference",
            Reason::RoundRobin => "round robin",
            Reason::PowerOfTwo => "fewer in flight of two drawn",
            Reason::LowestPredicted => "lowest predicted completion",
            Reason::TieDrawn => "tie, drawn",
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
    /// The forecast part of the predictive score (requests expected during the fragment).
    pub forecast: f64,
    pub weight: f64,
    /// The policy's score (lower is better).
    pub score: f64,
}

impl Candidate {
    /// `pipeline=score` with the parts of a predictive score, for EXPLAIN and
    /// system.routing_decisions.
    pub fn describe(&self, policy: Policy) -> String {
        match policy {
            Policy::Predictive => format!(
                "{}={:.3}(live={} forecast={:.2} weight={:.2})",
                self.id,
                self.score,
                self.in_flight + self.queued,
                self.forecast,
                self.weight
            ),
            _ => format!("{}={}", self.id, self.score),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub shard: ShardId,
    pub policy: Policy,
    pub choice: Option<PipelineId>,
    /// In shard-map preference order.
    pub candidates: Vec<Candidate>,
    pub reason: Reason,
}

impl Decision {
    pub fn candidates_text(&self) -> String {
        self.candidates.iter().map(|c| c.describe(self.policy)).collect::<Vec<_>>().join(" ")
    }
}

/// A well-mixed 64-bit value of `x` (splitmix64), the router's only source of
/// "randomness": the same inputs give the same choice.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Two distinct candidates of `n` (at least 2), drawn from `seq` and `shard`.
fn two_of(seq: u64, shard: ShardId, n: usize) -> (usize, usize) {
    let r = mix(seq ^ (shard as u64).rotate_left(32));
    let a = (r % n as u64) as usize;
    let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
    (a, b)
}

/// Least in flight (v1): kept as the name of the reactive default for callers that
/// have no policy (the write buffer's fragment, retries without one).
pub fn route(shard: ShardId, replicas: &[PipelineId], snapshot: &LoadSnapshot, excluded: &[PipelineId]) -> Decision {
    route_with(Policy::LeastInFlight, 0, shard, replicas, snapshot, excluded)
}

/// Chooses among `replicas` (preference order) for `shard` under `policy`, skipping
/// `excluded` pipelines and pipelines that are unavailable or missing from the
/// snapshot. `seq` drives round robin and the power-of-two draw.
pub fn route_with(
    policy: Policy,
    seq: u64,
    shard: ShardId,
    replicas: &[PipelineId],
    snapshot: &LoadSnapshot,
    excluded: &[PipelineId],
) -> Decision {
    let mut candidates = Vec::with_capacity(replicas.len());
    for id in replicas {
        let Some(load) = snapshot.get(*id) else { continue };
        if !load.available || excluded.contains(id) {
            continue;
        }
        let score = match policy {
            Policy::Predictive => load.predicted_score(),
            _ => load.live(),
        };
        candidates.push(Candidate {
            id: *id,
            in_flight: load.in_flight,
            queued: load.queued,
            forecast: load.forecast_part(),
            weight: load.weight,
            score,
        });
    }
    let n = candidates.len();
    let (choice, reason) = match (policy, n) {
        (_, 0) => (None, Reason::NoReplica),
        (_, 1) => (Some(0), Reason::OnlyReplica),
        (Policy::RoundRobin, _) => (Some((seq % n as u64) as usize), Reason::RoundRobin),
        (Policy::PowerOfTwo, _) => {
            let (a, b) = two_of(seq, shard, n);
            let pick = if candidates[b].score < candidates[a].score { b } else { a };
            (Some(pick), Reason::PowerOfTwo)
        }
        (Policy::Predictive, _) => {
            // Near-equal scores are ties (a forecast split evenly gives replicas scores
            // that differ only by rounding); among them one is drawn from `seq`, as
            // every gateway would otherwise break the same tie the same way and send
            // its requests to one replica together.
            let best = candidates.iter().map(|c| c.score).fold(f64::INFINITY, f64::min);
            let tol = TIE_TOLERANCE * best.abs().max(1.0);
            let tied: Vec<usize> = (0..n).filter(|i| candidates[*i].score <= best + tol).collect();
            if tied.len() > 1 {
                let pick = tied[(mix(seq ^ (shard as u64).rotate_left(32)) % tied.len() as u64) as usize];
                (Some(pick), Reason::TieDrawn)
            } else {
                (Some(tied[0]), Reason::LowestPredicted)
            }
        }
        (Policy::LeastInFlight, _) => {
            let mut best = 0;
            let mut ties = 0;
            for i in 1..n {
                if candidates[i].score < candidates[best].score {
                    best = i;
                    ties = 0;
                } else if candidates[i].score == candidates[best].score {
                    ties += 1;
                }
            }
            let reason = if ties > 0 { Reason::TieByPreference } else { Reason::FewestInFlight };
            (Some(best), reason)
        }
    };
    Decision { shard, policy, choice: choice.map(|i| candidates[i].id), candidates, reason }
}

/// Routes one query's fragments (one per shard, in the given order), counting each
/// pick as one more request in flight for the picks that follow.
pub fn route_all(shards: &[ShardId], map: &ShardMap, snapshot: &LoadSnapshot) -> Vec<Decision> {
    route_all_with(Policy::LeastInFlight, 0, shards, map, snapshot)
}

/// [`route_all`] under `policy`; fragment i uses sequence number `seq + i`.
pub fn route_all_with(policy: Policy, seq: u64, shards: &[ShardId], map: &ShardMap, snapshot: &LoadSnapshot) -> Vec<Decision> {
    let mut view = snapshot.clone();
    shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let d = route_with(policy, seq.wrapping_add(i as u64), *s, map.replicas_of(*s), &view, &[]);
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

    /// `ID=IN_FLIGHT[+QUEUED][*WEIGHT][~RATE|?RATE][!]`: `~` a trusted forecast of RATE
    /// fragments/s, `?` an untrusted one, `!` unavailable; every pipeline has 4 slots
    /// and the fleet's median service time is `service_s`.
    fn parse_loads(words: &[&str], service_s: f64) -> LoadSnapshot {
        LoadSnapshot::new(
            words
                .iter()
                .map(|w| {
                    let (id, rest) = w.split_once('=').expect("id=load");
                    let mut l = PipelineLoad::idle(id.parse().unwrap(), 4);
                    l.service_s = service_s;
                    let mut rest = rest.to_string();
                    if rest.ends_with('!') {
                        l.available = false;
                        rest.pop();
                    }
                    if let Some(i) = rest.find('@') {
                        l.unseen = rest[i + 1..].parse().unwrap();
                        rest.truncate(i);
                    }
                    if let Some(i) = rest.find(['~', '?']) {
                        l.forecast_trust = if rest[i..].starts_with('~') { 1.0 } else { 0.0 };
                        l.forecast_rate = rest[i + 1..].parse().unwrap();
                        rest.truncate(i);
                    }
                    if let Some(i) = rest.find('*') {
                        l.weight = rest[i + 1..].parse().unwrap();
                        rest.truncate(i);
                    }
                    let (f, q) = rest.split_once('+').unwrap_or((&rest, "0"));
                    l.in_flight = f.parse().unwrap();
                    l.queued = q.parse().unwrap();
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
        let mut policy = Policy::LeastInFlight;
        let mut seq = 0u64;
        let mut service_s = 0.01;
        let mut checked = 0;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[0] {
                "loads" => snapshot = parse_loads(&words[1..], service_s),
                "policy" => policy = Policy::parse(words[1]).expect("a policy"),
                "seq" => seq = words[1].parse().unwrap(),
                "service_ms" => service_s = words[1].parse::<f64>().unwrap() / 1000.0,
                "route" => {
                    let (lhs, rhs) = line["route".len()..].split_once("=>").expect("=>");
                    let (reps, excl) = lhs.split_once(" - ").unwrap_or((lhs, ""));
                    let ids = |s: &str| s.split_whitespace().map(|p| p.parse::<PipelineId>().unwrap()).collect::<Vec<_>>();
                    let d = route_with(policy, seq, 7, &ids(reps), &snapshot, &ids(excl));
                    let (want_choice, want_reason) = rhs.trim().split_once(' ').expect("choice reason");
                    let got_choice = d.choice.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
                    assert_eq!((got_choice.as_str(), d.reason.as_str()), (want_choice, want_reason.trim()), "line {}: {line}", n + 1);
                    checked += 1;
                }
                other => panic!("line {}: unknown directive {other}", n + 1),
            }
        }
        assert!(checked >= 20, "{checked} checks");
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
