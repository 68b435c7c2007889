//! Replays every file of `corpus/<target>/` through its target function (on stable, without libFuzzer),
//! so the seeds and every regression input stay passing.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The corpus lives in files; the pure-crate I/O ban (clippy.toml) does not apply to this test.
#![allow(clippy::disallowed_methods)]

use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (name, target) in dps_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name} has no seed corpus");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", file.display());
        }
        println!("{name}: {} inputs", files.len());
        total += files.len();
    }
    println!("{total} corpus inputs passed");
}
