//! The layers stay visible: every module uses only its own layer and the
//! layers below it, and no files use each other in a circle, inside a
//! layer or across. Read from the source, so a new `use` that reaches
//! upwards or closes a circle fails here with the files involved.
//!
//! A file uses another when it names a path into it: `use crate::…`,
//! an inline `crate::…::item`, or `super::…` (test modules left out). A
//! path ends in the deepest module file it names (`crate::mirror::JobError`
//! is `src/mirror/mod.rs`, even if `mod.rs` only re-exports it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. A module may use its own layer and the ones before it.
const LAYERS: &[&str] = &[
    "model",
    "telemetry",
    "config",
    "etcd",
    "check",
    "mirror",
    "ha",
    "ops",
    "cli",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file below `src` (`src/mirror/mod.rs` is
/// `["mirror"]`, `src/model/lease_book/tests.rs` is `["model",
/// "lease_book", "tests"]`).
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// The file a module path names: the deepest existing module file.
fn file_of(src: &Path, module: &[String]) -> Option<PathBuf> {
    let mut found = None;
    let mut dir = src.to_path_buf();
    for segment in module {
        let file = dir.join(format!("{segment}.rs"));
        let nested = dir.join(segment).join("mod.rs");
        if file.is_file() {
            found = Some(file);
        } else if nested.is_file() {
            found = Some(nested);
        } else {
            break;
        }
        dir = dir.join(segment);
    }
    found
}

/// The code without its test modules (their `super::*` is the file
/// itself) and without comments (a doc link is no use).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let base = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(&format!("{base}{p}")))
        .collect()
}

/// Every module path the text names, as segments after `crate` (`super`
/// resolved against `module`).
fn paths(text: &str, module: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let segments = |path: &str| -> Vec<String> {
        path.split("::")
            .map(|s| s.split(" as ").next().unwrap_or(s).to_string())
            .take_while(|s| s.chars().all(|c| c.is_alphanumeric() || c == '_') && !s.is_empty())
            .collect()
    };
    let mut found = Vec::new();
    let mut rest = text;
    // `use` statements, braces and all.
    while let Some(at) = rest.find("use ") {
        let statement = &rest[at + 4..];
        let Some(end) = statement.find(';') else {
            break;
        };
        let tree = &statement[..end];
        rest = &statement[end..];
        if !(tree.starts_with("crate::") || tree.starts_with("super::")) {
            continue;
        }
        for path in expand(tree) {
            found.push(path);
        }
    }
    // Inline paths.
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let tail: String = rest[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        // `crate::a::{b, c}` is a use tree, read above.
        if !tail.ends_with("::") {
            found.push(tail);
        }
        rest = &rest[at + "crate::".len()..];
    }
    // Paths through a child module the file declares (`mod writer;` and
    // then `writer::DestWriter`).
    let children: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))?;
            rest.strip_suffix(';').map(str::to_string)
        })
        .collect();
    for child in &children {
        let needle = format!("{child}::");
        let mut rest = text;
        while let Some(at) = rest.find(&needle) {
            let before = rest[..at].chars().next_back();
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                let tail: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                found.push(format!("self::{tail}"));
            }
            rest = &rest[at + needle.len()..];
        }
    }
    found
        .into_iter()
        .filter_map(|path| {
            let parts = segments(&path);
            match parts.first().map(String::as_str) {
                Some("crate") => Some(parts[1..].to_vec()),
                Some("self") => {
                    let mut base = module.to_vec();
                    base.extend(parts[1..].iter().cloned());
                    Some(base)
                }
                Some("super") => {
                    // A `mod.rs` is its directory's module: its super is above it.
                    let mut base = module.to_vec();
                    let ups = parts.iter().take_while(|p| *p == "super").count();
                    let _ = is_mod_file;
                    for _ in 0..ups {
                        base.pop()?;
                    }
                    base.extend(parts[ups..].iter().cloned());
                    Some(base)
                }
                _ => None,
            }
        })
        .collect()
}

struct Graph {
    /// file → files it uses (relative to src).
    edges: BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    uses: usize,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    let mut uses = 0;
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src").to_path_buf();
        let module = module_of(&relative);
        let is_mod_file = relative.ends_with("mod.rs");
        let text = std::fs::read_to_string(&file).expect("read file");
        let mut targets = BTreeSet::new();
        for path in paths(&code_of(&text), &module, is_mod_file) {
            uses += 1;
            if let Some(target) = file_of(&src, &path) {
                let target = target.strip_prefix(&src).expect("under src").to_path_buf();
                if target != relative {
                    targets.insert(target);
                }
            }
        }
        edges.insert(relative, targets);
    }
    Graph { edges, uses }
}

fn layer_of(file: &Path) -> String {
    file.components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .map(|s| s.trim_end_matches(".rs").to_string())
        .expect("a file name")
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let graph = graph();
    let mut violations = Vec::new();
    for (file, targets) in &graph.edges {
        let own = layer_of(file);
        if own == "lib" || own == "main" {
            continue;
        }
        let Some(own_index) = LAYERS.iter().position(|l| *l == own) else {
            violations.push(format!("{}: module {own} is in no layer", file.display()));
            continue;
        };
        for target in targets {
            let used = layer_of(target);
            if let Some(used_index) = LAYERS.iter().position(|l| *l == used) {
                if used_index > own_index {
                    violations.push(format!(
                        "{}: {own} uses {} in {used}, a layer above it",
                        file.display(),
                        target.display()
                    ));
                }
            }
        }
    }
    assert!(
        graph.uses > 300,
        "the scan found too few uses ({}) to mean anything",
        graph.uses
    );
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.join("\n")
    );
}

/// Strongly connected components of more than one file (Tarjan).
fn circles(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct State<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        next: usize,
        found: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a PathBuf) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        let edges = state.edges;
        for target in edges.get(node).into_iter().flatten() {
            let Some((target, _)) = edges.get_key_value(target) else {
                continue;
            };
            if !state.index.contains_key(target) {
                visit(state, target);
                let low = state.low[node].min(state.low[target]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(target) {
                let low = state.low[node].min(state.index[target]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member.clone());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.found.push(component);
            }
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for node in edges.keys() {
        if !state.index.contains_key(node) {
            visit(&mut state, node);
        }
    }
    state.found
}

#[test]
fn no_files_use_each_other_in_a_circle() {
    let graph = graph();
    let found = circles(&graph.edges);
    assert!(
        found.is_empty(),
        "files that use each other in a circle (move what they share into a file both use):\n{}",
        found
            .iter()
            .map(|c| c
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" <-> "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The test itself finds what it is for: a circle of two files, a circle
/// through a re-export, a use tree with nested braces and `super::`.
#[test]
fn the_scan_sees_circles_and_use_trees() {
    assert_eq!(
        expand("crate::mirror::{context::JobContext, error::{JobError, Action}}"),
        vec![
            "crate::mirror::context::JobContext",
            "crate::mirror::error::JobError",
            "crate::mirror::error::Action"
        ]
    );
    let module = vec!["mirror".to_string(), "leases".to_string()];
    assert_eq!(
        paths(
            "use super::JobError;\nfn f() { crate::model::keys::x(); }",
            &module,
            false
        ),
        vec![
            vec!["mirror".to_string(), "JobError".to_string()],
            vec!["model".to_string(), "keys".to_string(), "x".to_string()]
        ]
    );
    let file = |s: &str| PathBuf::from(s);
    let edges = BTreeMap::from([
        (file("a.rs"), BTreeSet::from([file("b.rs")])),
        (file("b.rs"), BTreeSet::from([file("c.rs")])),
        (file("c.rs"), BTreeSet::from([file("a.rs")])),
        (file("d.rs"), BTreeSet::from([file("a.rs")])),
    ]);
    assert_eq!(
        circles(&edges),
        vec![vec![file("a.rs"), file("b.rs"), file("c.rs")]]
    );
    assert!(circles(&BTreeMap::from([(
        file("a.rs"),
        BTreeSet::from([file("b.rs")])
    )]))
    .is_empty());
}
