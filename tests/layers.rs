//! The layers stay visible: every module uses only the layers below it, so
//! there are no module cycles. Read from the source, so a new `use` that
//! reaches upwards fails here with the file and the line.

use std::path::Path;

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

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a file name");
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = LAYERS.iter().position(|l| *l == top) else {
            violations.push(format!(
                "{}: module {top} is in no layer",
                relative.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read file");
        for (number, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                checked += 1;
                match LAYERS.iter().position(|l| *l == name) {
                    Some(used) if used > own => violations.push(format!(
                        "{}:{}: {top} uses {name}, a layer above it",
                        relative.display(),
                        number + 1
                    )),
                    _ => {}
                }
            }
        }
    }
    assert!(
        checked > 100,
        "the scan found too few uses ({checked}) to mean anything"
    );
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.join("\n")
    );
}
