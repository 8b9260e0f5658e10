//! Replays every fuzz target's committed corpus (`fuzz/corpus/<target>/`) and
//! saved crashes (`fuzz/regressions/<target>/`) on stable, so `cargo test` keeps
//! what fuzzing found fixed. A target without corpus fails, and so does a
//! `fuzz/fuzz_targets/` file this crate does not know (or the other way round).

use std::collections::BTreeSet;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sarde_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files below `dir` (none when it does not exist), in name order.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_fuzz_target_is_known_here() {
    let on_disk: BTreeSet<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let known: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        on_disk, known,
        "fuzz/fuzz_targets/ and sarde_fuzz_targets::TARGETS must name the same targets"
    );
    let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for name in &known {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}

#[test]
fn every_corpus_and_regression_replays_without_a_panic() {
    let mut failures = Vec::new();
    let mut empty = Vec::new();
    for (name, target) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        if corpus.is_empty() {
            empty.push(*name);
        }
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        let started = std::time::Instant::now();
        for path in corpus.iter().chain(&regressions) {
            let data = match fs::read(path) {
                Ok(data) => data,
                // A fuzzer running on the corpus replaces inputs with smaller ones.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", path.display()),
            };
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
        // Shown with --nocapture: which corpus makes the replay slow.
        eprintln!(
            "{name}: {} inputs in {:.1?}",
            corpus.len() + regressions.len(),
            started.elapsed()
        );
    }
    assert!(
        empty.is_empty(),
        "targets without a committed corpus in fuzz/corpus/: {empty:?}"
    );
    assert!(failures.is_empty(), "inputs that panic: {failures:#?}");
}
