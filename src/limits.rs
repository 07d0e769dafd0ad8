//! Bounds on what one statement may ask of the planner, checked on its tokens before
//! any tree is built.
//!
//! Owns: the estimate of a statement's expression depth. SQL parsers build chains such
//! as `1+1+...+1` or `a = 1 OR a = 2 OR ...` iteratively, but every pass over the
//! resulting tree (rewrites, planning, optimizing, even dropping it) recurses once per
//! level, so a long enough chain overflows any stack. The estimate here is an upper
//! bound of that depth computed in one pass over the tokens, so a statement is refused
//! (54001, as PostgreSQL's `max_stack_depth`) before the tree exists.
//! Must never: under-estimate. Every token that could add a level (operators, and
//! keywords, which may be infix operators such as `AT TIME ZONE` or `IS`) counts one;
//! only commas and clause keywords (which cannot continue an expression) end a chain,
//! and a parenthesised part adds its own deepest chain to the chain around it.
//! Pure: no IO.

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Error, Result};

/// Keywords that start a clause: an expression cannot continue across them (a
/// subquery that holds them is inside parentheses, which are counted separately).
const CLAUSE_KEYWORDS: &[Keyword] = &[
    Keyword::SELECT,
    Keyword::FROM,
    Keyword::WHERE,
    Keyword::GROUP,
    Keyword::HAVING,
    Keyword::ORDER,
    Keyword::LIMIT,
    Keyword::OFFSET,
    Keyword::UNION,
    Keyword::INTERSECT,
    Keyword::EXCEPT,
    Keyword::VALUES,
    Keyword::WITH,
    Keyword::INSERT,
    Keyword::INTO,
    Keyword::JOIN,
    Keyword::ON,
    Keyword::WINDOW,
];

/// What one pass over a statement's tokens tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// An upper bound of the deepest expression (all statements), in levels.
    pub depth: usize,
    /// The largest `$n` (0 if none).
    pub highest_param: usize,
}

/// The [`Bounds`] of `sql`; None if the text does not tokenize (the parser then
/// reports it properly).
pub fn bounds(sql: &str) -> Option<Bounds> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let mut highest_param = 0usize;
    // One frame per open parenthesis or bracket: (chain so far, deepest chain seen).
    let mut stack: Vec<(usize, usize)> = vec![(0, 0)];
    let mut deepest = 0usize;
    for t in &tokens {
        let top = stack.last_mut().expect("the outermost frame is never popped");
        match t {
            Token::Whitespace(_) | Token::EOF => {}
            Token::Comma => {
                top.1 = top.1.max(top.0);
                top.0 = 0;
            }
            Token::SemiColon => {
                let (cur, max) = *top;
                deepest = deepest.max(cur.max(max));
                stack.truncate(1);
                stack[0] = (0, 0);
            }
            Token::LParen | Token::LBracket => {
                // A bracket is also a subscript, one level of its own.
                if matches!(t, Token::LBracket) {
                    top.0 += 1;
                }
                stack.push((0, 0));
            }
            Token::RParen | Token::RBracket => {
                if stack.len() > 1 {
                    let (cur, max) = stack.pop().expect("checked");
                    let parent = stack.last_mut().expect("checked");
                    parent.0 += cur.max(max) + 1;
                }
            }
            Token::Word(w) if w.keyword == Keyword::NoKeyword => {}
            Token::Word(w) if CLAUSE_KEYWORDS.contains(&w.keyword) && w.quote_style.is_none() => {
                top.1 = top.1.max(top.0);
                top.0 = 0;
            }
            Token::Word(_) => top.0 += 1,
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::Period => {}
            Token::Placeholder(p) => {
                if let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                    highest_param = highest_param.max(n);
                }
            }
            _ => top.0 += 1,
        }
        let top = stack.last().expect("never empty");
        deepest = deepest.max(top.0);
    }
    // Unclosed parentheses: count what is open (the parser will refuse the text).
    let open: usize = stack.iter().map(|(c, m)| (*c).max(*m) + 1).sum();
    Some(Bounds { depth: deepest.max(open), highest_param })
}

/// An upper bound of the deepest expression in `sql`, in levels (see [`bounds`]).
pub fn depth_estimate(sql: &str) -> Option<usize> {
    bounds(sql).map(|b| b.depth)
}

/// Refuses `sql` if its expressions may be deeper than `depth_max` levels (54001) or it
/// has more than `params_max` parameters (54000).
pub fn check(sql: &str, depth_max: usize, params_max: usize) -> Result<()> {
    let Some(b) = bounds(sql) else { return Ok(()) };
    if b.depth > depth_max {
        return Err(Error::TooComplex(format!(
            "expressions nest about {} levels deep, more than expression_depth_max ({depth_max}); \
             use IN (...) instead of long OR chains, or split the statement",
            b.depth
        )));
    }
    check_params(b.highest_param, params_max)
}

/// Entries a SELECT list may have, as in PostgreSQL (`MaxTupleAttributeNumber`).
/// DataFusion plans a projection in time quadratic in its width (8,000 entries take
/// seconds), so a wider one is refused (54011) rather than planned.
pub const TARGET_LIST_ENTRIES_MAX: usize = 1664;

/// Refuses a statement whose SELECT lists (at any level) are wider than
/// [`TARGET_LIST_ENTRIES_MAX`]. Runs on a parsed statement whose depth was bounded by
/// [`check_depth`], so its recursion is bounded too.
pub fn check_target_lists(stmt: &datafusion::sql::sqlparser::ast::Statement) -> Result<()> {
    use datafusion::sql::sqlparser::ast::{Query, SetExpr, Visit, Visitor};
    use std::ops::ControlFlow;
    struct Widest;
    impl Visitor for Widest {
        type Break = usize;
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<usize> {
            let mut bodies = vec![q.body.as_ref()];
            while let Some(b) = bodies.pop() {
                match b {
                    SetExpr::Select(s) if s.projection.len() > TARGET_LIST_ENTRIES_MAX => return ControlFlow::Break(s.projection.len()),
                    SetExpr::SetOperation { left, right, .. } => {
                        bodies.push(left);
                        bodies.push(right);
                    }
                    _ => {}
                }
            }
            ControlFlow::Continue(())
        }
    }
    match stmt.visit(&mut Widest) {
        ControlFlow::Break(got) => Err(Error::TooManyColumns { max: TARGET_LIST_ENTRIES_MAX, got }),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Refuses a statement with more than `params_max` parameters; `highest` is the
/// largest `$n` it uses.
fn check_params(highest: usize, params_max: usize) -> Result<()> {
    if highest > params_max {
        return Err(Error::ProgramLimit(format!(
            "the statement has {highest} parameters, more than statement_params_max ({params_max})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(op: &str, n: usize) -> String {
        let terms: Vec<String> = (0..n).map(|i| format!("x = {i}")).collect();
        format!("select * from t where {}", terms.join(&format!(" {op} ")))
    }

    #[test]
    fn chains_count_every_link() {
        let plus = format!("select {}", vec!["1"; 2000].join("+"));
        assert!(depth_estimate(&plus).unwrap() >= 1999);
        assert!(depth_estimate(&chain("OR", 2000)).unwrap() >= 1999);
        // Chains continued across parentheses, CASE and AT TIME ZONE still add up.
        let mixed: Vec<&str> = vec!["(1+1)", "CASE WHEN true THEN 1 END", "1"];
        let s = format!("select {}", mixed.iter().cycle().take(3000).cloned().collect::<Vec<_>>().join(" + "));
        assert!(depth_estimate(&s).unwrap() >= 2999);
        let tz = format!("select now(){}", " AT TIME ZONE 'UTC'".repeat(1000));
        assert!(depth_estimate(&tz).unwrap() >= 1000);
        let nested = format!("select {}1{}", "(".repeat(500), ")".repeat(500));
        assert!(depth_estimate(&nested).unwrap() >= 500);
    }

    #[test]
    fn wide_but_shallow_statements_stay_low() {
        let values: Vec<String> = (0..10_000).map(|i| format!("('r{i}', 'acct', -1.5)")).collect();
        let insert = format!("insert into usage (record_id, entity_id, quantity) values {}", values.join(", "));
        assert!(depth_estimate(&insert).unwrap() < 20, "{}", depth_estimate(&insert).unwrap());
        let list: Vec<String> = (0..10_000).map(|i| format!("'a{i}'")).collect();
        let inlist = format!("select sum(quantity) from usage where entity_id in ({}) and event_time >= now() - interval '1 day'", list.join(","));
        assert!(depth_estimate(&inlist).unwrap() < 20);
        let cols: Vec<String> = (0..5_000).map(|i| format!("a{i} + 1 AS c{i}")).collect();
        assert!(depth_estimate(&format!("select {} from t", cols.join(", "))).unwrap() < 10);
    }

    #[test]
    fn refusals_carry_54001() {
        assert_eq!(check(&chain("OR", 3000), 1000, 10).unwrap_err().sqlstate(), "54001");
        assert!(check(&chain("OR", 10), 1000, 10).is_ok());
        assert_eq!(bounds("select $1, $65535, $3").unwrap().highest_param, 65535);
        assert_eq!(check("select $1, $65535, $3", 1000, 65534).unwrap_err().sqlstate(), "54000");
        assert_eq!(check_params(65536, 65535).unwrap_err().sqlstate(), "54000");
        let parse = |sql: &str| datafusion::sql::sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap().remove(0);
        let wide: Vec<String> = (0..2000).map(|i| format!("${}", i + 1)).collect();
        let e = check_target_lists(&parse(&format!("select 1 union all select {}", wide.join(",")))).unwrap_err();
        assert_eq!(e.sqlstate(), "54011");
        assert!(check_target_lists(&parse(&format!("select {}", wide[..1664].join(",")))).is_ok());
    }
}
