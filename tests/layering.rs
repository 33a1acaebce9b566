//! The crate's layering, checked on its sources (see the crate docs in `src/lib.rs`):
//!
//! - `contract` and `crd` are the bottom: they use no other module of the crate;
//! - `core` uses only `crd` and `contract`;
//! - no module uses a module that uses it back, directly or through others.
//!
//! A module is a top-level module of the crate: `src/x.rs` and everything under `src/x/`.
//! A module uses another when one of its files names it in a `crate::` path (`use`
//! declarations, paths in code, and doc links alike). `src/lib.rs` is the root;
//! `src/main.rs` and its `simulate` module are the binary, above everything, and the
//! only sources that may use the simulated cluster (`testrunner_sim`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The bottom: modules that use no other module of the crate.
const BOTTOM: &[&str] = &["contract", "crd"];
/// What the core may use.
const CORE_USES: &[&str] = &["contract", "crd"];

/// The binary's files: the library does not include them.
const BINARY: &[&str] = &["main.rs", "simulate.rs"];

/// Module name to the modules it uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level module a file of `src/` belongs to; `None` for the crate root and the
/// binary.
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    if first == "lib.rs" || BINARY.contains(&first) {
        return None;
    }
    Some(first.strip_suffix(".rs").unwrap_or(first).to_string())
}

/// The names that follow `crate::` in `text`, the heads of grouped paths
/// (`crate::{a::X, b}`) included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        // `$crate::` in macros, `mycrate::`: not this crate's paths.
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at its top-level commas.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        names.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("src/ is readable").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module graph of the sources under `src`.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut texts: Vec<(String, String)> = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src/");
        if let Some(module) = module_of(relative) {
            let text = std::fs::read_to_string(&file).expect("a source file is readable");
            texts.push((module, text));
        }
    }
    let modules: BTreeSet<String> = texts.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = Graph::new();
    for (module, text) in texts {
        let uses = graph.entry(module.clone()).or_default();
        for name in crate_paths(&text) {
            if name != module && modules.contains(&name) {
                uses.insert(name);
            }
        }
    }
    graph
}

/// A loop in `graph`, as the modules along it (the first repeated at the end).
fn find_loop(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        module: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(module) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|m| m == module).expect("on the path");
                let mut cycle = path[from..].to_vec();
                cycle.push(module.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(module.to_string(), Mark::Open);
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(module.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|m| visit(graph, m, &mut marks, &mut Vec::new()))
}

/// What is wrong with the layering of `graph`: one sentence a problem.
fn problems(graph: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for bottom in BOTTOM {
        for used in graph.get(*bottom).into_iter().flatten() {
            out.push(format!("{bottom} is at the bottom but uses {used}"));
        }
    }
    for used in graph.get("core").into_iter().flatten() {
        if !CORE_USES.contains(&used.as_str()) {
            out.push(format!(
                "core uses {used}: it may use only {}",
                CORE_USES.join(" and ")
            ));
        }
    }
    if let Some(cycle) = find_loop(graph) {
        out.push(format!("import loop: {}", cycle.join(" -> ")));
    }
    out
}

fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(m, uses)| {
            let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
            format!("  {m} -> {}\n", uses.join(", "))
        })
        .collect()
}

#[test]
fn the_crate_is_layered_without_loops() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    for module in ["contract", "core", "crd", "worker", "broker", "controller"] {
        assert!(graph.contains_key(module), "no module {module} in {src:?}");
    }
    let problems = problems(&graph);
    assert!(
        problems.is_empty(),
        "{}\n\nmodules and what they use:\n{}",
        problems.join("\n"),
        render(&graph)
    );
}

#[test]
fn only_the_binary_uses_the_simulated_cluster() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let library: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| {
            let name = f.strip_prefix(&src).expect("under src/").to_str();
            !name.is_some_and(|n| BINARY.contains(&n))
        })
        .collect();
    assert!(library.len() > 20, "library sources found: {library:?}");
    let users: Vec<&PathBuf> = library
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("a source file is readable")
                .contains("testrunner_sim")
        })
        .collect();
    assert!(
        users.is_empty(),
        "library sources that use the simulated cluster: {users:?}"
    );
}

#[test]
fn paths_are_read_in_every_form() {
    let text = "use crate::core::{self, Plan};\n\
                use crate::{contract::Report, crd::{A, B}, metrics};\n\
                /// See [`crate::pods::REPORT_INTERVAL`].\n\
                let x = crate::broker::connect(); $crate::ignored; mycrate::ignored2;\n\
                use crate::{\n    alerts,\n};";
    let names: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(
        names,
        [
            "alerts", "broker", "contract", "core", "crd", "metrics", "pods"
        ]
    );
    assert_eq!(
        module_of(Path::new("core/crash.rs")).as_deref(),
        Some("core")
    );
    assert_eq!(module_of(Path::new("worker.rs")).as_deref(), Some("worker"));
    assert_eq!(module_of(Path::new("lib.rs")), None);
}

#[test]
fn loops_and_upward_uses_are_found() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g = Graph::new();
        for (from, to) in edges {
            g.entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            g.entry(to.to_string()).or_default();
        }
        g
    };
    let good = graph(&[
        ("controller", "core"),
        ("controller", "pods"),
        ("pods", "core"),
        ("core", "crd"),
        ("core", "contract"),
        ("worker", "broker"),
        ("broker", "contract"),
    ]);
    assert_eq!(problems(&good), Vec::<String>::new());
    let looped = graph(&[
        ("worker", "broker"),
        ("broker", "metrics"),
        ("metrics", "worker"),
    ]);
    assert_eq!(
        problems(&looped),
        ["import loop: broker -> metrics -> worker -> broker"]
    );
    let upward = graph(&[("core", "pods"), ("contract", "crd")]);
    assert_eq!(
        problems(&upward),
        [
            "contract is at the bottom but uses crd",
            "core uses pods: it may use only contract and crd"
        ]
    );
}
