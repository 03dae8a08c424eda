//! The import graph between src/'s top-level modules has no cycles (issue 15:
//! "no import cycles between worlds"). Read from the source: every
//! `crate::x` path outside comments and unit-test modules is an edge.
//! `cargo test --test module_graph -- --nocapture` prints the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_file() {
        out.push(p.to_path_buf());
    } else {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() || e.extension().is_some_and(|x| x == "rs") {
                rust_files(&e, out);
            }
        }
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if name != "lib" && name != "main" {
            let mut files = Vec::new();
            rust_files(&p, &mut files);
            mods.insert(name, files);
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, files) in &mods {
        let deps = edges.entry(m.clone()).or_default();
        for f in files {
            let text = std::fs::read_to_string(f).unwrap();
            // Unit tests (`#[cfg(test)] mod tests { .. }`, at any depth) may
            // reach anywhere: skip them by counting braces.
            let (mut test_cfg, mut depth) = (false, 0usize);
            for line in text.lines() {
                let code = line.split("//").next().unwrap();
                if depth > 0 {
                    depth = (depth + code.matches('{').count()).saturating_sub(code.matches('}').count());
                    continue;
                }
                if code.trim() == "#[cfg(test)]" {
                    test_cfg = true;
                    continue;
                }
                if std::mem::take(&mut test_cfg) && code.trim_start().starts_with("mod ") && code.contains('{') {
                    depth = code.matches('{').count();
                    continue;
                }
                for (i, _) in code.match_indices("crate::") {
                    let dep: String =
                        code[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if &dep != m && mods.contains_key(&dep) {
                        deps.insert(dep);
                    }
                }
            }
        }
    }
    edges
}

/// A path from `to` back to `from`, if any.
fn path_back(edges: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![(to.to_string(), vec![to.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((n, path)) = stack.pop() {
        if n == from {
            return Some(path);
        }
        if seen.insert(n.clone()) {
            for d in &edges[&n] {
                let mut p = path.clone();
                p.push(d.clone());
                stack.push((d.clone(), p));
            }
        }
    }
    None
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let edges = graph();
    assert!(edges.len() > 10 && edges["app"].contains("pipeline"), "the scan found the modules: {edges:?}");
    let mut cycles = Vec::new();
    for (m, deps) in &edges {
        println!("{m} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(", "));
        for d in deps {
            if let Some(back) = path_back(&edges, m, d) {
                cycles.push(format!("{m} -> {}", back.join(" -> ")));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles between top-level modules:\n{}", cycles.join("\n"));
}
