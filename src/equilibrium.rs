//! Where balanced routing sends a forecast load: each pipeline's expected arrival rate
//! when every shard's traffic is split among its replicas so that the replicas' loads
//! are as even as they can be (water-filling).
//!
//! Owns: that split. Pure and deterministic: no IO, no clock.
//!
//! Why it exists: a forecast of the load *at a pipeline* is a forecast of a routing
//! outcome, not of demand. A forecaster trained on a pipeline's own history (the
//! forecaster's `pipeline` scope on a node) learns what the router did, and under a
//! load-aware router that is close to this balanced split: a pipeline that holds a hot
//! shard gets less of its other shards' traffic. Splitting each shard's rate evenly
//! among its replicas instead (what `tidemark simulate` did before) overstates the
//! pipelines that hold hot shards and understates the others by a fixed amount, which
//! the predictive score then adds as a static bias: with several gateways all of them
//! shun the same pipelines and crowd the rest.
//!
//! # The split
//! Minimize `Σ_p L_p² / c_p` (loads `L_p` relative to capacities `c_p`) over the
//! shares `x_{s,p} ≥ 0` with `Σ_p x_{s,p} = r_s` for each shard `s` over its replicas.
//! The problem is convex; block coordinate descent solves it: for one shard at a time,
//! take its share off, then pour its rate onto its replicas up to a common level `h` of
//! load per capacity (`x_p = c_p · max(0, h − L_p / c_p)`, the water-filling step),
//! and sweep over all shards `passes` times. At the optimum, a shard's traffic goes
//! only to its least-loaded replicas, all at one level: exactly what join-the-shortest-
//! queue routing tends to. Cost: `passes · Σ_s |replicas(s)| · log |replicas(s)|`.

/// Expected arrivals per second at each of `capacity.len()` pipelines when each shard
/// `s` (rate `shard_rates[s]`, replicas `replicas[s]` as pipeline indexes) is split
/// evenly by load per capacity. A shard with no replica contributes nothing; an index
/// out of range is ignored.
pub fn balanced_rates(shard_rates: &[f64], replicas: &[Vec<usize>], capacity: &[f64], passes: usize) -> Vec<f64> {
    let n = capacity.len();
    let cap: Vec<f64> = capacity.iter().map(|c| if c.is_finite() && *c > 0.0 { *c } else { 1.0 }).collect();
    let mut load = vec![0.0; n];
    // Each shard's share per replica, starting from the even split.
    let mut share: Vec<Vec<f64>> = shard_rates
        .iter()
        .zip(replicas)
        .map(|(r, reps)| {
            let held = reps.iter().filter(|p| **p < n).count();
            let r = if r.is_finite() { r.max(0.0) } else { 0.0 };
            reps.iter()
                .map(|p| {
                    if *p >= n {
                        return 0.0;
                    }
                    let x = r / held as f64;
                    load[*p] += x;
                    x
                })
                .collect()
        })
        .collect();
    let mut level: Vec<(f64, usize)> = Vec::new();
    for _ in 0..passes {
        for (s, reps) in replicas.iter().enumerate() {
            let r: f64 = share[s].iter().sum();
            if r <= 0.0 || reps.len() < 2 {
                continue;
            }
            for (i, p) in reps.iter().enumerate() {
                if *p < n {
                    load[*p] -= share[s][i];
                }
            }
            // Pour r onto the replicas, lowest load per capacity first.
            level.clear();
            level.extend(reps.iter().enumerate().filter(|(_, p)| **p < n).map(|(i, p)| (load[*p] / cap[*p], i)));
            level.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (mut filled_cap, mut h, mut rest) = (0.0, 0.0, r);
            for (k, (u, i)) in level.iter().enumerate() {
                filled_cap += cap[reps[*i]];
                // The first k+1 replicas are at level u; raising them to the next
                // replica's level takes `room` (all of the rest, after the last).
                let next = level.get(k + 1).map(|(v, _)| *v).unwrap_or(f64::INFINITY);
                let room = (next - u) * filled_cap;
                if rest <= room {
                    h = u + rest / filled_cap;
                    break;
                }
                rest -= room;
            }
            for (i, p) in reps.iter().enumerate() {
                share[s][i] = if *p < n { cap[*p] * (h - load[*p] / cap[*p]).max(0.0) } else { 0.0 };
            }
            // The shares sum to r up to rounding; rescale so that no rate is lost.
            let sum: f64 = share[s].iter().sum();
            if sum > 0.0 {
                for (i, p) in reps.iter().enumerate() {
                    share[s][i] *= r / sum;
                    if *p < n {
                        load[*p] += share[s][i];
                    }
                }
            }
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/equilibrium.txt`: `capacities C...; shard R on P,P,...; ... => L0 L1 ...`
    /// (loads to two decimals after 50 passes).
    #[test]
    fn fixtures() {
        for d in crate::fixture::directives("equilibrium.txt") {
            let mut capacity = Vec::new();
            let mut rates = Vec::new();
            let mut replicas = Vec::new();
            for part in d.text.split("=>").next().unwrap().split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                match words.as_slice() {
                    ["capacities", cs @ ..] => capacity = cs.iter().map(|c| c.parse().unwrap()).collect(),
                    ["shard", r, "on", ps] => {
                        rates.push(r.parse().unwrap());
                        replicas.push(ps.split(',').map(|p| p.parse().unwrap()).collect());
                    }
                    other => panic!("line {}: {other:?}", d.line),
                }
            }
            let got = balanced_rates(&rates, &replicas, &capacity, 50);
            let got: Vec<String> = got.iter().map(|l| format!("{l:.2}")).collect();
            assert_eq!(got.join(" "), d.want.clone().unwrap(), "line {}: {}", d.line, d.text);
        }
    }

    #[test]
    fn no_rate_is_lost_and_shares_stay_on_replicas() {
        // 300 shards with Zipf-like rates over 40 pipelines, 3 replicas each.
        let n = 40;
        let rates: Vec<f64> = (0..300).map(|s| 1000.0 / (s as f64 + 1.0).powf(1.1)).collect();
        let replicas: Vec<Vec<usize>> = (0..300).map(|s| (0..3).map(|k| (s * 7 + k * 13) % n).collect()).collect();
        let loads = balanced_rates(&rates, &replicas, &vec![4.0; n], 30);
        let total: f64 = rates.iter().sum();
        assert!((loads.iter().sum::<f64>() - total).abs() < 1e-6 * total);
        // More even than the even split per shard.
        let even = balanced_rates(&rates, &replicas, &vec![4.0; n], 0);
        let spread = |l: &[f64]| l.iter().copied().fold(0.0, f64::max) / (l.iter().sum::<f64>() / l.len() as f64);
        assert!(spread(&loads) < spread(&even), "{} vs {}", spread(&loads), spread(&even));
        // A pipeline no shard names gets nothing.
        let replicas2: Vec<Vec<usize>> = replicas.iter().map(|r| r.iter().map(|p| p % (n - 1)).collect()).collect();
        assert_eq!(balanced_rates(&rates, &replicas2, &vec![4.0; n], 30)[n - 1], 0.0);
    }
}
