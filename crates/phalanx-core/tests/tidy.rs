//! Style checks run as ordinary tests (after rust-analyzer's `tidy`): every
//! source file of every crate opens with a `//!` header, and the core stays
//! pure: no I/O, clock, randomness, threads, async runtime, or hash maps
//! whose iteration order would differ between replicas; and a stored
//! record's field left out when empty is its last (the snapshot format reads
//! fields by position).
//!
//! The purity check reads code, not prose: comments and string literals are
//! dropped first, and names are matched as whole identifiers, so a comment
//! may say what the code must not use and `operand` is not `rand`.

use std::path::{Path, PathBuf};

/// Identifiers the core must not name.
const BANNED_NAMES: [&str; 8] = ["HashMap", "HashSet", "tokio", "SystemTime", "Instant", "rand", "async", "await"];
/// Modules of `std` the core must not use, as `std::x` or inside `std::{...}`.
const BANNED_STD_MODULES: [&str; 5] = ["time", "fs", "net", "thread", "process"];
/// Dependencies the core must not have.
const BANNED_DEPENDENCIES: [&str; 6] = ["tokio", "rand", "getrandom", "futures", "redb", "openraft"];

fn workspace_crates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crates")
}

fn core_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crates/*/src/**/*.rs`; a crate without a `src` directory is skipped.
fn workspace_sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut crates: Vec<PathBuf> =
        std::fs::read_dir(workspace_crates()).unwrap().map(|entry| entry.unwrap().path()).collect();
    crates.sort();
    for krate in crates {
        let src = krate.join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    files
}

#[derive(Debug, PartialEq)]
enum Token {
    Name(String),
    /// `::`
    Path,
    Open,
    Close,
    Other,
}

/// Splits Rust source into names and the punctuation the checks need,
/// skipping comments, string literals and character literals.
fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\''), or a lifetime ('a).
            if at(i + 1) == '\\' {
                // Past the quote, the backslash and the escaped character.
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let raw = matches!(word.as_str(), "r" | "br" | "cr")
                && (at(i) == '"' || (at(i) == '#' && matches!(at(i + 1), '"' | '#')));
            if !raw {
                out.push(Token::Name(word));
                continue;
            }
            // A raw string: r"...", r#"..."#, br#"..."#, any number of #.
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            while i < chars.len() && !(chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                i += 1;
            }
            i += 1 + hashes;
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token::Path);
            i += 2;
        } else {
            out.push(match c {
                '{' => Token::Open,
                '}' => Token::Close,
                _ if c.is_whitespace() => {
                    i += 1;
                    continue;
                }
                _ => Token::Other,
            });
            i += 1;
        }
    }
    out
}

/// What a source file uses that the core must not.
fn impurities(source: &str) -> Vec<String> {
    let tokens = tokens(source);
    let name = |i: usize| match tokens.get(i) {
        Some(Token::Name(name)) => Some(name.as_str()),
        _ => None,
    };
    let mut found = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let Token::Name(word) = token else { continue };
        if BANNED_NAMES.contains(&word.as_str()) {
            found.push(word.clone());
        }
        if word != "std" || tokens.get(i + 1) != Some(&Token::Path) {
            continue;
        }
        match tokens.get(i + 2) {
            Some(Token::Name(module)) if BANNED_STD_MODULES.contains(&module.as_str()) => {
                found.push(format!("std::{module}"));
            }
            Some(Token::Open) => {
                // `use std::{fs, io::Read}`: the first name of each item, at any depth.
                let mut depth = 0;
                for j in i + 2..tokens.len() {
                    match &tokens[j] {
                        Token::Open => depth += 1,
                        Token::Close => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Token::Name(module)
                            if depth == 1
                                && BANNED_STD_MODULES.contains(&module.as_str())
                                && name(j - 1).is_none()
                                && tokens[j - 1] != Token::Path =>
                        {
                            found.push(format!("std::{module}"));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    found
}

#[test]
fn every_source_file_opens_with_a_module_comment() {
    let files = workspace_sources();
    assert!(files.iter().any(|f| f.ends_with("phalanx-core/src/lib.rs")), "the walk found the core");
    let missing: Vec<String> = files
        .iter()
        .filter(|file| !std::fs::read_to_string(file).unwrap().starts_with("//!"))
        .map(|file| file.display().to_string())
        .collect();
    assert!(missing.is_empty(), "these files do not open with a //! comment: {missing:#?}");
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let mut files = Vec::new();
    rust_files(&core_dir().join("src"), &mut files);
    assert!(!files.is_empty());
    let mut found = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        // Braces balance only if no code was mistaken for a literal or a comment.
        let tokens = tokens(&source);
        let opened = tokens.iter().filter(|t| **t == Token::Open).count();
        let closed = tokens.iter().filter(|t| **t == Token::Close).count();
        assert_eq!(opened, closed, "{}: the tokenizer lost its place", file.display());
        for what in impurities(&source) {
            found.push(format!("{} uses {what}", file.display()));
        }
    }
    assert!(found.is_empty(), "the core must stay pure: {found:#?}");
}

#[test]
fn the_core_depends_on_no_runtime() {
    let manifest = std::fs::read_to_string(core_dir().join("Cargo.toml")).unwrap();
    let mut section = String::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section != "[dependencies]" {
            continue;
        }
        let dependency = line.split(['=', '.', ' ']).next().unwrap_or("");
        assert!(!BANNED_DEPENDENCIES.contains(&dependency), "phalanx-core depends on {dependency}");
    }
}

/// The checker itself: prose and strings are not code, whole names only.
#[test]
fn the_purity_check_reads_code_not_prose() {
    let clean = r##"
        //! No HashMap here, nor std::time.
        /* block /* nested HashSet */ comment */
        use std::collections::BTreeMap;
        let operand = "tokio and rand in a string \" still a string";
        let raw = r#"std::fs"#; let bytes = br#"{"rand": 1}"#; let byte = b'"';
        let quote = '"'; let escaped = '\''; fn f<'a>(x: &'a str) {}
        let random_name = Instant_like; let randomness = 1;
    "##;
    assert_eq!(impurities(clean), Vec::<String>::new());
    let dirty = r#"
        use std::collections::HashMap;
        use std::{fs, io::Read};
        use std::{collections::{BTreeMap, HashSet}, net::TcpStream};
        let now = std::time::SystemTime::now();
        let x: u8 = rand::random();
        async fn f() {}
    "#;
    assert_eq!(
        impurities(dirty),
        ["HashMap", "std::fs", "std::net", "HashSet", "std::time", "SystemTime", "rand", "async"]
    );
}

/// The snapshot format (MessagePack, `phalanx-server`'s `store.rs`) writes
/// a record's fields by position: a field left out when empty
/// (`skip_serializing_if`) shifts every field after it, and the snapshot
/// then reads wrong values without an error. So only a record's last field
/// may be skipped (a field appended with `#[serde(default)]` reads back).
#[test]
fn a_field_skipped_when_empty_is_its_records_last() {
    let mut sources = Vec::new();
    rust_files(&core_dir().join("src"), &mut sources);
    let mut misplaced = Vec::new();
    for path in sources {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let code = |line: &str| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with("//")
        };
        for (at, line) in lines.iter().enumerate() {
            if !code(line) || !line.contains("skip_serializing_if") {
                continue;
            }
            // The field is the first line of code after its attributes.
            let field = (at + 1..lines.len()).find(|&i| code(lines[i]) && !lines[i].trim().starts_with("#["));
            let next = field.and_then(|field| (field + 1..lines.len()).find(|&i| code(lines[i])));
            if !next.is_some_and(|next| lines[next].trim().starts_with('}')) {
                misplaced.push(format!("{}:{}", path.display(), field.map_or(at, |f| f) + 1));
            }
        }
    }
    assert!(misplaced.is_empty(), "fields skipped when empty that are not their record's last: {misplaced:?}");
}
