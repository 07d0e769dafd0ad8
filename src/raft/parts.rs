//! Parts that span several log entries: a shard's rows of one statement that are too
//! many for one entry are staged, entry by entry, and stored together when the part's
//! last entry is applied, so a part is all-or-nothing however many entries it takes.
//!
//! Pure and deterministic: every replica applies the same log, so every replica stages,
//! completes and drops the same parts. A part's entries are proposed one after the
//! other by one gateway through one leader; a part is dropped (and its last entry then
//! stores nothing and answers `aborted`) when
//! - an entry arrives out of sequence (a gap: an entry was lost with a leader, or a
//!   re-send after an unknown outcome repeated one);
//! - an entry of a later term is applied (its leader changed: the gateway's next entry
//!   can no longer follow on in sequence from the same leader's log);
//! - [`IDLE_ENTRIES_MAX`] entries have been applied since its latest entry, or an
//!   `Abort` entry names it (the leader proposes one for a part idle for
//!   [`IDLE_MS_MAX`] of its own time: its gateway is gone), which bounds what a stalled
//!   or crashed writer can hold.
//!
//! The durable state a replica records while parts are open is the state from before
//! the earliest open part began ([`Staging::safe`]): after a crash the log is
//! re-applied from there, which stages the part again from its first entry. Entries
//! applied after that point are re-applied too, which is harmless: a record stored once
//! counts as a duplicate the second time, alike on every replica.
//!
//! Owns: the open parts of one group and their rule. Must never: let a part complete
//! without every one of its entries, in order, from one term.

use serde::{Deserialize, Serialize};

/// A part is dropped once this many entries have been applied since its latest one.
pub const IDLE_ENTRIES_MAX: u64 = 10_000;
/// A leader proposes to drop a part whose latest entry it applied this long ago.
pub const IDLE_MS_MAX: u64 = 30_000;

/// Where an entry sits in a part of several entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Chosen by the writer, distinct among its concurrent parts.
    pub id: u64,
    /// 0 for the first entry, then one more for each.
    pub seq: u32,
    /// Whether this entry ends the part.
    pub last: bool,
}

struct Open<T, S> {
    id: u64,
    term: u64,
    first_index: u64,
    latest_index: u64,
    next_seq: u32,
    /// When its latest entry was applied here (the caller's clock, milliseconds).
    touched_ms: u64,
    /// The group's state before the part's first entry.
    before: S,
    payloads: Vec<T>,
}

/// What an entry of a part did.
#[derive(Debug, PartialEq, Eq)]
pub enum Staged<T> {
    /// Kept until the part's last entry.
    Held,
    /// The part's last entry: every payload of the part, in order.
    Complete(Vec<T>),
    /// Not in sequence (or its part was dropped): nothing of the part is stored. For a
    /// last entry, the writer is told; an earlier entry just drops the part.
    Broken,
}

/// The open parts of one group, in the order they began.
pub struct Staging<T, S> {
    open: Vec<Open<T, S>>,
}

impl<T, S> Default for Staging<T, S> {
    fn default() -> Self {
        Staging { open: Vec::new() }
    }
}

impl<T, S: Clone> Staging<T, S> {
    /// Called for every entry before it is applied: drops the parts that can no longer
    /// complete (an older term than `term`, or idle for too long at `index`).
    pub fn before_entry(&mut self, term: u64, index: u64) {
        self.open.retain(|p| p.term >= term && index.saturating_sub(p.latest_index) <= IDLE_ENTRIES_MAX);
    }

    /// An entry of part `part`, at `term`/`index`, carrying `payload`; `state` is the
    /// group's state before this entry; `now_ms` the caller's clock.
    pub fn stage(&mut self, part: Part, term: u64, index: u64, state: &S, payload: T, now_ms: u64) -> Staged<T> {
        let at = self.open.iter().position(|p| p.id == part.id);
        if part.seq == 0 {
            if let Some(i) = at {
                // The same id again from its start: the writer's earlier try is over.
                self.open.remove(i);
            }
            if part.last {
                return Staged::Complete(vec![payload]);
            }
            self.open.push(Open { id: part.id, term, first_index: index, latest_index: index, next_seq: 1, touched_ms: now_ms, before: state.clone(), payloads: vec![payload] });
            return Staged::Held;
        }
        let Some(i) = at else { return Staged::Broken };
        let p = &mut self.open[i];
        if p.term != term || p.next_seq != part.seq {
            self.open.remove(i);
            return Staged::Broken;
        }
        p.payloads.push(payload);
        p.next_seq += 1;
        p.latest_index = index;
        p.touched_ms = now_ms;
        if part.last {
            return Staged::Complete(self.open.remove(i).payloads);
        }
        Staged::Held
    }

    /// The state to record as durable: from before the earliest open part, or `None`
    /// when no part is open (the current state is safe).
    pub fn safe(&self) -> Option<&S> {
        self.open.iter().min_by_key(|p| p.first_index).map(|p| &p.before)
    }

    /// Drops part `id` (an `Abort` entry); whether it was open.
    pub fn abort(&mut self, id: u64) -> bool {
        let before = self.open.len();
        self.open.retain(|p| p.id != id);
        self.open.len() != before
    }

    /// Parts whose latest entry was applied more than `max_ms` before `now_ms`.
    pub fn idle(&self, now_ms: u64, max_ms: u64) -> Vec<u64> {
        self.open.iter().filter(|p| now_ms.saturating_sub(p.touched_ms) > max_ms).map(|p| p.id).collect()
    }

    /// Forgets every open part (a snapshot replaced the group's state; the entries after
    /// it are applied again).
    pub fn clear(&mut self) {
        self.open.clear();
    }

    /// Open parts, and the payloads they hold.
    pub fn held(&self) -> (usize, usize) {
        (self.open.len(), self.open.iter().map(|p| p.payloads.len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a log written as text and returns what each entry did. One entry per
    /// line: `term index` then `part ID SEQ WORD [last]` (WORD: the payload), `abort
    /// ID`, `idle MAX` (the parts idle for more than MAX at this index, taken as the
    /// clock), or `other` (an entry that is not of a part). The state before an entry
    /// is its index less one.
    fn run(log: &str) -> (Vec<String>, Staging<String, u64>) {
        let mut s = Staging::default();
        let mut out = Vec::new();
        for line in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let (term, index): (u64, u64) = (w[0].parse().unwrap(), w[1].parse().unwrap());
            s.before_entry(term, index);
            let r = match w[2] {
                "part" => {
                    let part = Part { id: w[3].parse().unwrap(), seq: w[4].parse().unwrap(), last: w.get(6) == Some(&"last") };
                    match s.stage(part, term, index, &(index - 1), w[5].to_string(), index) {
                        Staged::Held => "held".to_string(),
                        Staged::Complete(p) => format!("complete {}", p.join(",")),
                        Staged::Broken => "broken".to_string(),
                    }
                }
                "abort" => format!("abort {}", s.abort(w[3].parse().unwrap())),
                "idle" => format!("idle {:?}", s.idle(index, w[3].parse().unwrap())),
                _ => "applied".to_string(),
            };
            out.push(format!("{r}; safe {}", s.safe().map_or("-".into(), |v| v.to_string())));
        }
        (out, s)
    }

    #[test]
    fn a_part_completes_with_all_its_entries_in_order() {
        let (out, s) = run("
            1 1 part 7 0 a
            1 2 other
            1 3 part 7 1 b
            1 4 part 7 2 c last
            1 5 other");
        assert_eq!(out, ["held; safe 0", "applied; safe 0", "held; safe 0", "complete a,b,c; safe -", "applied; safe -"]);
        assert_eq!(s.held(), (0, 0));
    }

    #[test]
    fn the_safe_state_is_from_before_the_earliest_open_part() {
        let (out, _) = run("
            1 10 part 1 0 a
            1 11 part 2 0 x
            1 12 part 1 1 b last
            1 13 part 2 1 y
            1 14 part 2 2 z last");
        assert_eq!(out, ["held; safe 9", "held; safe 9", "complete a,b; safe 10", "held; safe 10", "complete x,y,z; safe -"]);
    }

    #[test]
    fn a_gap_or_a_repeat_breaks_the_part() {
        let (out, _) = run("
            1 1 part 1 0 a
            1 2 part 1 2 c last
            1 3 part 2 0 a
            1 4 part 2 1 b
            1 5 part 2 1 b
            1 6 part 2 2 c last");
        assert_eq!(out, ["held; safe 0", "broken; safe -", "held; safe 2", "held; safe 2", "broken; safe -", "broken; safe -"]);
    }

    #[test]
    fn a_new_term_drops_the_older_terms_parts() {
        // Entry 2 of the part came through the next leader: it cannot follow on.
        let (out, _) = run("
            1 1 part 1 0 a
            2 2 other
            2 3 part 1 1 b last");
        assert_eq!(out, ["held; safe 0", "applied; safe -", "broken; safe -"]);
    }

    #[test]
    fn a_part_idle_for_too_long_is_dropped() {
        // Dropped once more than IDLE_ENTRIES_MAX entries follow its latest one.
        let (out, _) = run(&format!("1 1 part 1 0 a\n1 {} part 1 1 b last", 2 + IDLE_ENTRIES_MAX));
        assert_eq!(out, ["held; safe 0", "broken; safe -"]);
        let (out, _) = run(&format!("1 1 part 1 0 a\n1 {} part 1 1 b last", 1 + IDLE_ENTRIES_MAX));
        assert_eq!(out, ["held; safe 0", "complete a,b; safe -"]);
    }

    #[test]
    fn a_part_that_starts_again_replaces_the_earlier_try() {
        let (out, _) = run("
            1 1 part 1 0 a
            1 2 part 1 0 a2
            1 3 part 1 1 b last");
        assert_eq!(out, ["held; safe 0", "held; safe 1", "complete a2,b; safe -"]);
    }

    #[test]
    fn an_abort_or_idleness_drops_the_part() {
        let (out, _) = run("
            1 1 part 1 0 a
            1 2 part 2 0 x
            1 5 idle 3
            1 6 abort 1
            1 7 abort 1
            1 8 part 1 1 b last
            1 9 part 2 1 y last");
        assert_eq!(out, ["held; safe 0", "held; safe 0", "idle [1]; safe 0", "abort true; safe 1", "abort false; safe 1", "broken; safe 1", "complete x,y; safe -"]);
    }

    #[test]
    fn a_one_entry_part_completes_at_once() {
        let (out, _) = run("1 1 part 3 0 a last");
        assert_eq!(out, ["complete a; safe -"]);
    }
}
