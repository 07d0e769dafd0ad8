//! Read-your-writes tokens: per shard, the log index that a session's acknowledged
//! writes reached in that shard's Raft group.
//!
//! A write's part in shard `s` is acknowledged once the entry at index `i` of group `s`
//! is committed and applied; every replica applies the same entry at the same index, so
//! a replica whose group `s` has applied index `i` holds that part. A session merges
//! the positions of each of its writes (the highest index per shard); a read on that
//! session first waits until this node's replica of every shard in the token has
//! applied up to it. The token is text so that it can travel between connections
//! (`SHOW tidemark.write_token` on the writer, `SET tidemark.read_after = '...'` on
//! the reader): `t1:` then `shard=index` pairs separated by commas, shards ascending
//! (`t1:3=120,7=88`); the empty token is `t1:` (or the empty string).
//!
//! Owns: the token, its text form and merging. Pure: no IO, no clock.
//! Must never: lower a shard's index when merging (a session's token only grows).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use parking_lot::Mutex;

use crate::shard_map::ShardId;

const PREFIX: &str = "t1:";
/// Shards one token names at most (a token from `SET` is a client's text: bounded, so
/// that a connection cannot hold an unbounded map).
pub const TOKEN_SHARDS_MAX: usize = 65_536;

/// Per shard, the log index the writes reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteToken(BTreeMap<ShardId, u64>);

impl WriteToken {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Notes that a write reached `index` in `shard`.
    pub fn note(&mut self, shard: ShardId, index: u64) {
        let at = self.0.entry(shard).or_insert(index);
        *at = (*at).max(index);
    }

    /// The highest index of either token, per shard.
    pub fn merge(&mut self, other: &WriteToken) {
        for (s, i) in &other.0 {
            self.note(*s, *i);
        }
    }

    /// The part of the token that names `shards`.
    pub fn only(&self, shards: &std::collections::BTreeSet<ShardId>) -> WriteToken {
        WriteToken(self.0.iter().filter(|(s, _)| shards.contains(s)).map(|(s, i)| (*s, *i)).collect())
    }

    /// The index the writes reached in `shard`, if any.
    pub fn index_of(&self, shard: ShardId) -> Option<u64> {
        self.0.get(&shard).copied()
    }

    /// (shard, index) pairs, shards ascending.
    pub fn iter(&self) -> impl Iterator<Item = (ShardId, u64)> + '_ {
        self.0.iter().map(|(s, i)| (*s, *i))
    }

    /// The shards whose index `applied` (this replica's applied index of a shard, if
    /// it has the shard) does not reach yet: (shard, wanted, applied).
    pub fn unmet(&self, applied: impl Fn(ShardId) -> Option<u64>) -> Vec<(ShardId, u64, Option<u64>)> {
        self.iter()
            .filter_map(|(s, want)| {
                let have = applied(s);
                (have.is_none_or(|h| h < want)).then_some((s, want, have))
            })
            .collect()
    }
}

impl fmt::Display for WriteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        for (n, (s, i)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{s}={i}")?;
        }
        Ok(())
    }
}

/// Why a token's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid write token {text:?}: {why} (expected the text of SHOW tidemark.write_token, such as 't1:3=120,7=88')")]
pub struct BadToken {
    pub text: String,
    pub why: &'static str,
}

impl FromStr for WriteToken {
    type Err = BadToken;

    fn from_str(text: &str) -> Result<WriteToken, BadToken> {
        let bad = |why| BadToken { text: text.to_string(), why };
        let t = text.trim();
        if t.is_empty() {
            return Ok(WriteToken::default());
        }
        let body = t.strip_prefix(PREFIX).ok_or_else(|| bad("it does not start with t1:"))?;
        let mut token = WriteToken::default();
        for pair in body.split(',').filter(|p| !p.trim().is_empty()) {
            let (s, i) = pair.split_once('=').ok_or_else(|| bad("a pair is not shard=index"))?;
            let s: ShardId = s.trim().parse().map_err(|_| bad("a shard is not a number"))?;
            let i: u64 = i.trim().parse().map_err(|_| bad("an index is not a number"))?;
            token.note(s, i);
            if token.0.len() > TOKEN_SHARDS_MAX {
                return Err(bad("it names more shards than any cluster has"));
            }
        }
        Ok(token)
    }
}

/// A connection's token, shared by its statements (writes merge into it, reads wait
/// for it, `SET tidemark.read_after` merges a token from elsewhere into it).
#[derive(Debug, Default)]
pub struct TokenCell(Mutex<WriteToken>);

impl TokenCell {
    pub fn merge(&self, t: &WriteToken) {
        if !t.is_empty() {
            self.0.lock().merge(t);
        }
    }

    pub fn get(&self) -> WriteToken {
        self.0.lock().clone()
    }

    pub fn clear(&self) {
        *self.0.lock() = WriteToken::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each line of `testdata/write_token.txt`: `text -> canonical` or `text -> error`.
    #[test]
    fn fixture() {
        let text = include_str!("../testdata/write_token.txt");
        let mut checked = 0;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (input, want) = line.split_once("->").unwrap_or_else(|| panic!("no -> in {line:?}"));
            let input = input.trim().trim_matches('\'');
            let want = want.trim();
            match input.parse::<WriteToken>() {
                Ok(t) => assert_eq!(t.to_string(), want, "{line}"),
                Err(e) => assert_eq!(want, "error", "{line}: refused with {e}"),
            }
            checked += 1;
        }
        assert!(checked >= 10, "fixture has {checked} cases");
    }

    #[test]
    fn a_token_naming_too_many_shards_is_refused() {
        let pairs: Vec<String> = (0..=TOKEN_SHARDS_MAX).map(|s| format!("{s}=1")).collect();
        let text = format!("t1:{}", pairs.join(","));
        assert!(text.parse::<WriteToken>().is_err());
        let text = format!("t1:{}", pairs[..TOKEN_SHARDS_MAX].join(","));
        assert_eq!(text.parse::<WriteToken>().unwrap().iter().count(), TOKEN_SHARDS_MAX);
    }

    #[test]
    fn merging_keeps_the_highest_index_and_unmet_names_the_lagging_shards() {
        let mut a: WriteToken = "t1:1=5,2=9".parse().unwrap();
        a.merge(&"t1:2=4,3=7".parse().unwrap());
        assert_eq!(a.to_string(), "t1:1=5,2=9,3=7");
        let applied = |s: ShardId| match s {
            1 => Some(5),
            2 => Some(8),
            _ => None,
        };
        assert_eq!(a.unmet(applied), vec![(2, 9, Some(8)), (3, 7, None)]);
        let cell = TokenCell::default();
        cell.merge(&a);
        cell.merge(&"t1:1=2".parse().unwrap());
        assert_eq!(cell.get(), a);
        cell.clear();
        assert!(cell.get().is_empty());
    }
}
