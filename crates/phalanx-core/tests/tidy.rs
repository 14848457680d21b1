//! Style checks run as ordinary tests: every source file opens with a `//!`
//! header, and the core stays pure (no I/O, clock, randomness, threads or
//! hash maps whose iteration order would differ between replicas).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn every_source_file_opens_with_a_module_comment() {
    let mut files = Vec::new();
    for krate in std::fs::read_dir(crates_dir()).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    assert!(files.len() > 10);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("//!"), "{} does not open with a //! comment", file.display());
    }
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let mut files = Vec::new();
    rust_files(&crates_dir().join("phalanx-core/src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Comments may name what the code must not use.
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let text = code;
        for banned in [
            "HashMap",
            "HashSet",
            "tokio",
            "std::time",
            "SystemTime",
            "Instant",
            "rand::",
            "std::fs",
            "std::net",
            "std::thread",
        ] {
            assert!(!text.contains(banned), "{} uses {banned}", file.display());
        }
    }
}
