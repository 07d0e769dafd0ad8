//! Test support: the directive files under `testdata/` that the pure cores' tests read.
//!
//! Owns: the common line format (`#` comments, blank lines, `directive words... [=>
//! expected]`). Only compiled for tests.

/// One directive: its 1-based line number, its words before `=>`, and what follows
/// `=>` (the expectation), if anything.
pub struct Directive {
    pub line: usize,
    pub text: String,
    pub words: Vec<String>,
    pub want: Option<String>,
}

/// The directives of `testdata/<name>`.
pub fn directives(name: &str) -> Vec<Directive> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let (lhs, want) = line.split_once("=>").map(|(a, b)| (a.trim(), Some(b.trim().to_string()))).unwrap_or((line, None));
            Some(Directive { line: n + 1, text: line.to_string(), words: lhs.split_whitespace().map(String::from).collect(), want })
        })
        .collect()
}
