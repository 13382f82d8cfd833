//! The invariants of the workspace that no compiler checks, as one test
//! (`cargo test -p xtask tidy`, part of `cargo xtask test`), in the manner of
//! rust-analyzer's `xtask/src/tidy.rs`:
//! - the libraries read no environment variable: `std::env::var` and
//!   `var_os` appear only in the binaries' one reader
//!   (`crates/cmr-cli/src/env.rs`), in xtask, and in test and benchmark
//!   harnesses;
//! - the network files name no kernel (they go through `backend.rs`);
//! - every `unsafe` block has a `// SAFETY:` comment right above it (clippy's
//!   `undocumented_unsafe_blocks` checks the same at the lint level);
//! - every source file opens with a `//!` doc;
//! - each crate depends on the workspace crates that ARCHITECTURE.md's
//!   dependency table allows, and on no other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where ARCHITECTURE.md's dependency table starts and ends.
pub const DEPS_BEGIN: &str = "<!-- dependency rules: checked by xtask/src/tidy.rs -->";
pub const DEPS_END: &str = "<!-- end of dependency rules -->";

/// The workspace crates, by package name and folder.
pub const CRATES: [(&str, &str); 8] = [
    ("cmr-kernels", "crates/cmr-kernels"),
    ("cmr-data", "crates/cmr-data"),
    ("cmr-models", "crates/cmr-models"),
    ("cmr-loss", "crates/cmr-loss"),
    ("cmr-train", "crates/cmr-train"),
    ("cmr-cli", "crates/cmr-cli"),
    ("xtask", "xtask"),
    ("cmr-tests", "tests"),
];

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The problems found in the workspace at `root`, one line each.
pub fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (_, dir) in CRATES {
        for file in rust_files(&root.join(dir)) {
            let rel = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .to_string_lossy()
                .replace('\\', "/");
            let Ok(text) = std::fs::read_to_string(&file) else {
                problems.push(format!("{rel}: not readable as UTF-8"));
                continue;
            };
            check_file(&rel, &text, &mut problems);
        }
    }
    check_dependencies(root, &mut problems);
    problems
}

/// The checks of one source file (`rel`: its path from the root).
pub fn check_file(rel: &str, text: &str, problems: &mut Vec<String>) {
    let harness =
        rel.contains("/tests/") || rel.starts_with("tests/") || rel.contains("/benches/") || rel.ends_with("build.rs");
    let may_read_env = harness || rel.starts_with("xtask/") || rel == "crates/cmr-cli/src/env.rs";
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let code = code_of(line);
        let code = code.as_str();
        if !may_read_env && (code.contains("env::var(") || code.contains("env::var_os(")) {
            problems.push(format!(
                "{rel}:{}: reads the environment (only crates/cmr-cli/src/env.rs, xtask and test harnesses may)",
                i + 1
            ));
        }
        if code.contains("unsafe {") && !has_safety_comment(&lines, i) {
            problems.push(format!(
                "{rel}:{}: an `unsafe` block without a `// SAFETY:` comment",
                i + 1
            ));
        }
    }
    let network = ["segnet.rs", "unet.rs", "unet3plus.rs"]
        .iter()
        .any(|n| rel == format!("crates/cmr-models/src/{n}"));
    if network && (text.contains("cmr_kernels") || text.contains("fast::")) {
        problems.push(format!("{rel}: a network names a kernel (go through crate::backend)"));
    }
    let in_src = rel.contains("/src/") || rel.starts_with("src/");
    if in_src && !harness && !text.trim_start().starts_with("//!") {
        problems.push(format!("{rel}: no `//!` module doc at the top"));
    }
}

/// The code of a line: string literals emptied, a trailing `//` comment cut.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut in_string = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_string => {
                chars.next();
            }
            '"' => {
                in_string = !in_string;
                out.push(c);
            }
            '/' if !in_string && chars.peek() == Some(&'/') => break,
            _ if in_string => {}
            _ => out.push(c),
        }
    }
    out
}

/// Whether the `unsafe {` on line `i` has `// SAFETY:` on it or in the
/// comment lines right above it (attributes and the start of the statement
/// may stand between).
fn has_safety_comment(lines: &[&str], i: usize) -> bool {
    if lines[i].contains("SAFETY:") {
        return true;
    }
    let mut j = i;
    while j > 0 {
        j -= 1;
        let t = lines[j].trim();
        if t.contains("SAFETY:") {
            return true;
        }
        // still the comment above, an attribute, or the statement's own
        // earlier lines (`let x =` then `unsafe {` on the next)
        let continues = t.starts_with("//")
            || t.starts_with("#[")
            || !(t.ends_with(';') || t.ends_with('{') || t.ends_with('}') || t.is_empty());
        if !continues {
            return false;
        }
    }
    false
}

/// The workspace crates each crate's `Cargo.toml` depends on (normal and
/// build dependencies; dev-dependencies are the tests' business).
fn workspace_dependencies(root: &Path, dir: &str) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(root.join(dir).join("Cargo.toml")) else {
        return Vec::new();
    };
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut deps = Vec::new();
    for section in ["dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(section).and_then(|v| v.as_table()) {
            deps.extend(t.keys().filter(|k| CRATES.iter().any(|(name, _)| name == k)).cloned());
        }
    }
    deps.sort();
    deps
}

/// ARCHITECTURE.md's table: `| crate | may depend on |`, names in
/// backticks, `—` for none.
pub fn dependency_rules(doc: &str) -> Option<BTreeMap<String, Vec<String>>> {
    let start = doc.find(DEPS_BEGIN)? + DEPS_BEGIN.len();
    let end = doc.find(DEPS_END)?;
    let mut rules = BTreeMap::new();
    for line in doc[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [name, allowed] = cells[..] else { continue };
        let name = name.trim_matches('`');
        if !CRATES.iter().any(|(c, _)| *c == name) {
            continue; // the header and its rule
        }
        let mut allowed: Vec<String> = allowed
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty() && s != "—")
            .collect();
        allowed.sort();
        rules.insert(name.to_string(), allowed);
    }
    Some(rules)
}

fn check_dependencies(root: &Path, problems: &mut Vec<String>) {
    let Ok(doc) = std::fs::read_to_string(root.join("ARCHITECTURE.md")) else {
        problems.push("ARCHITECTURE.md: not readable".into());
        return;
    };
    let Some(rules) = dependency_rules(&doc) else {
        problems.push(format!(
            "ARCHITECTURE.md: no dependency table between {DEPS_BEGIN} and {DEPS_END}"
        ));
        return;
    };
    for (name, dir) in CRATES {
        let Some(allowed) = rules.get(name) else {
            problems.push(format!("ARCHITECTURE.md: the dependency table has no row for {name}"));
            continue;
        };
        for dep in workspace_dependencies(root, dir) {
            if !allowed.contains(&dep) {
                problems.push(format!(
                    "{dir}/Cargo.toml: {name} depends on {dep}, which ARCHITECTURE.md does not allow"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn tidy() {
        let problems = check(&root());
        assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
    }

    /// Each check finds what it looks for (so that a clean workspace is
    /// not a check that sees nothing).
    #[test]
    fn each_check_fires() {
        let mut p = Vec::new();
        check_file(
            "crates/cmr-train/src/x.rs",
            "fn f() { let v = std::env::var(\"X\"); }\n",
            &mut p,
        );
        assert_eq!(p.len(), 2, "{p:?}"); // reads the environment, no doc
        p.clear();
        check_file(
            "crates/cmr-kernels/src/x.rs",
            "//! Doc.\nfn f() {\n    let v = unsafe { g() };\n}\n",
            &mut p,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("SAFETY"));
        p.clear();
        check_file(
            "crates/cmr-kernels/src/x.rs",
            "//! Doc.\nfn f() {\n    // SAFETY: g has no precondition.\n    let v = unsafe { g() };\n}\n",
            &mut p,
        );
        assert!(p.is_empty(), "{p:?}");
        check_file(
            "crates/cmr-models/src/unet.rs",
            "//! Doc.\nuse cmr_kernels::conv2d;\n",
            &mut p,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        p.clear();
        check_file(
            "crates/cmr-cli/src/env.rs",
            "//! Doc.\nfn f() { std::env::var(\"X\"); }\n",
            &mut p,
        );
        check_file(
            "crates/cmr-data/tests/t.rs",
            "fn f() { std::env::var(\"X\"); }\n",
            &mut p,
        );
        assert!(p.is_empty(), "{p:?}");
        let doc = format!(
            "{DEPS_BEGIN}\n| crate | may depend on |\n|---|---|\n| `cmr-loss` | `cmr-kernels` |\n| `cmr-data` | — |\n{DEPS_END}"
        );
        let rules = dependency_rules(&doc).unwrap();
        assert_eq!(rules["cmr-loss"], ["cmr-kernels"]);
        assert!(rules["cmr-data"].is_empty());
    }
}
